//! `bulwark run` benchmark: what a whole tool call costs, and what the micro-VM costs a
//! compute-bound tool. Run with `make bench` (or `cargo bench -p bulwark-tests --bench run`
//! after `make guest`). It measures and prints; it never asserts on time.
//!
//! 1. `bulwark run examples/hello.wat`, whole process (spawn to exit) with a warm compile cache,
//!    `BULWARK_BENCH_RUNS` runs (default 20): min, median, max; beside it, interleaved, the same
//!    call with `--isolation wasm` and a native process that prints the same line
//!    (`/usr/bin/printf`); then the same number of `bulwark run --json` runs for the median of
//!    bulwark's own breakdown (compile, vm_start, call, total), the VMM's peak RSS, and KVM's
//!    counts of VM exits and page faults (first touches) per call.
//! 2. The same call with the VMM confined and with `--no-confine`, in pairs: the cost of the
//!    confinement on a whole call.
//! 3. The compute tool (`tests/tools/compute`: SHA-256 rounds and a sort over
//!    `BULWARK_BENCH_COMPUTE_MIB` MiB, default 8) built natively, under
//!    `bulwark run --isolation vm` and under `bulwark run --isolation wasm`,
//!    `BULWARK_BENCH_COMPUTE_RUNS` runs each (default 5, interleaved so load drifts hit all three
//!    alike): medians of the tool's own compute time and of the whole process, and the vm/wasm
//!    and vm/native ratios. All runs must print the same digest and checksum, or the benchmark
//!    panics: that is a correctness check, not a timing one. A `bulwark` without `--isolation`
//!    runs the VM case with its default isolation and skips the wasm case, saying so.
//!
//! 4. Language runtimes (`build/runtimes`): CPython `-c 'print(1+1)'` and QuickJS
//!    `-e 'console.log(1+1)'`, whole process in the VM and with `--isolation wasm`,
//!    `BULWARK_BENCH_COMPUTE_RUNS` runs each, interleaved, with the VM call's `--json` breakdown,
//!    the VMM's peak RSS, and KVM's counts of VM exits and page faults.
//!
//! A `bulwark run` that fails panics with its output.
//!
//! `BULWARK_CLI` overrides the `bulwark` binary (default: the one next to this bench).

// A benchmark step that fails panics with its message, as a test would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::bench::{env_count, ms};
use bulwark_tests::*;

fn bulwark() -> PathBuf {
    workspace_binary("bulwark", "BULWARK_CLI")
}

/// Min, median and max.
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn median(v: Vec<f64>) -> f64 {
    summary(v).1
}

/// Runs `cmd` to the end with stdin closed and returns its wall time and output.
fn timed_raw(cmd: &mut Command, what: &str) -> (Duration, Output) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    (started.elapsed(), out)
}

/// Panics with the output of `what` unless it succeeded.
fn check_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stderr: {} stdout: {}",
        out.status,
        stderr(out),
        stdout(out)
    );
}

/// Runs `cmd` like [`timed_raw`]; panics with its output when it fails.
fn timed(cmd: &mut Command, what: &str) -> (Duration, Output) {
    let (wall, out) = timed_raw(cmd, what);
    check_success(&out, what);
    (wall, out)
}

/// Runs `bulwark run` with `args` (compile cache in `cache`) and returns its wall time and output;
/// panics with its output when it fails.
fn bulwark_run(cache: &std::path::Path, args: &[String]) -> (Duration, Output) {
    bulwark_run_with(cache, args, None)
}

/// [`bulwark_run`] with `vmm` as the VMM (`BULWARK_VMM`) when given.
fn bulwark_run_with(
    cache: &std::path::Path,
    args: &[String],
    vmm: Option<&std::path::Path>,
) -> (Duration, Output) {
    let what = format!("bulwark run {}", args.join(" "));
    let mut cmd = Command::new(bulwark());
    cmd.arg("run")
        .args(args)
        .env("BULWARK_CACHE_DIR", cache)
        .env("BULWARK_GUEST", guest_image());
    if let Some(vmm) = vmm {
        cmd.env("BULWARK_VMM", vmm);
    }
    timed(&mut cmd, &what)
}

/// The number after `"key":` inside the `"timings_us"` object of `bulwark run --json` output.
fn json_timing_us(json: &str, key: &str) -> Option<u64> {
    let start = json.rfind("\"timings_us\":{")?;
    let object = &json[start..];
    let object = &object[..object.find('}')?];
    let pattern = format!("\"{key}\":");
    let rest = &object[object.find(&pattern)? + pattern.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Whether this `bulwark run` has the `--isolation` option.
fn has_isolation_flag() -> bool {
    let out = Command::new(bulwark())
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
    stdout(&out).contains("--isolation")
}

fn bench_hello(cache: &std::path::Path, runs: usize) {
    let hello = repo_root().join("examples/hello.wat").display().to_string();
    let expected = "hello from a Bulwark micro-VM\n";
    let plain = [hello.clone()];
    let (_, out) = bulwark_run(cache, &plain); // warm-up: fills the compile cache
    assert_eq!(stdout(&out), expected, "hello.wat printed something else");

    let wasm = ["--isolation".to_owned(), "wasm".to_owned(), hello.clone()];
    let (_, out) = bulwark_run(cache, &wasm); // warm-up: the host artifact
    assert_eq!(
        stdout(&out),
        expected,
        "hello.wat printed something else in wasm"
    );
    let (mut walls, mut wasm_walls, mut native_walls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (wall, out) = bulwark_run(cache, &plain);
        assert_eq!(stdout(&out), expected, "hello.wat printed something else");
        walls.push(ms(wall));
        let (wall, out) = bulwark_run(cache, &wasm);
        assert_eq!(
            stdout(&out),
            expected,
            "hello.wat printed something else in wasm"
        );
        wasm_walls.push(ms(wall));
        let (wall, out) = timed(
            Command::new("/usr/bin/printf").arg(expected),
            "native printf",
        );
        assert_eq!(stdout(&out), expected);
        native_walls.push(ms(wall));
    }

    let json_args = ["--json".to_owned(), hello];
    let keys = ["compile", "vm_start", "call", "total"];
    let mut breakdown: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
    let mut json_walls = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let (wall, out) = bulwark_run(cache, &json_args);
        json_walls.push(ms(wall));
        let json = stdout(&out);
        rss.push(vmm_figures(&json));
        for (key, samples) in keys.iter().zip(&mut breakdown) {
            let us = json_timing_us(&json, key)
                .unwrap_or_else(|| panic!("no timings_us.{key} in `bulwark run --json`: {json}"));
            samples.push(ms(Duration::from_micros(us)));
        }
    }

    let (min, med, max) = summary(walls);
    let (wmin, wmed, wmax) = summary(wasm_walls);
    let (nmin, nmed, nmax) = summary(native_walls);
    println!(
        "bulwark run examples/hello.wat, warm compile cache, {runs} runs (+1 warm-up), interleaved"
    );
    println!(
        "  vm, whole process               min {min:7.2} ms  median {med:7.2} ms  max {max:7.2} ms   (target: median < 5 ms)"
    );
    println!(
        "  --isolation wasm                min {wmin:7.2} ms  median {wmed:7.2} ms  max {wmax:7.2} ms"
    );
    println!(
        "  native (/usr/bin/printf)        min {nmin:7.2} ms  median {nmed:7.2} ms  max {nmax:7.2} ms"
    );
    let medians: Vec<String> = keys
        .iter()
        .zip(breakdown)
        .map(|(key, samples)| format!("{key} {:.2} ms", median(samples)))
        .collect();
    println!(
        "  --json timings_us, medians      {}   (whole process {:.2} ms)",
        medians.join("  "),
        median(json_walls),
    );
    println!("  --json, medians                 {}", vmm_line(&rss));
}

/// The number under top-level `key` of `bulwark run --json` output.
fn json_number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let at = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("no {key} in `bulwark run --json`: {json}"));
    let digits: String = json[at + pattern.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<f64>().expect("a number")
}

/// The VMM's figures from `bulwark run --json`: peak RSS in MiB, VM exits, page faults.
fn vmm_figures(json: &str) -> [f64; 3] {
    [
        json_number(json, "vmm_peak_rss_kib") / 1024.0,
        json_number(json, "vm_exits"),
        json_number(json, "vm_page_faults"),
    ]
}

/// "VMM peak RSS .. MiB, .. VM exits, .. page faults" from medians of [`vmm_figures`].
fn vmm_line(samples: &[[f64; 3]]) -> String {
    let m = |i: usize| median(samples.iter().map(|s| s[i]).collect());
    format!(
        "VMM peak RSS {:.1} MiB, {:.0} VM exits, {:.0} page faults (KVM's counts)",
        m(0),
        m(1),
        m(2)
    )
}

/// The cost of the VMM's confinement on a whole tool call: `bulwark run examples/hello.wat`
/// with the VMM confined (its default) and with `--no-confine`, run in pairs. Both go through
/// the same one-line `sh` wrapper (`exec bulwark-vmm [--no-confine] "$@"`), so the wrapper's
/// own cost is in both and the paired difference is the confinement's.
fn bench_confinement(cache: &std::path::Path, runs: usize) {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("bench-confinement");
    let vmm = vmm_binary();
    let wrapper = |name: &str, flag: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexec '{}' {flag} \"$@\"\n", vmm.display()),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
        path
    };
    let confined = wrapper("vmm-confined", "");
    let unconfined = wrapper("vmm-unconfined", "--no-confine");
    let hello = [repo_root().join("examples/hello.wat").display().to_string()];
    let expected = "hello from a Bulwark micro-VM\n";
    let one = |vmm: &std::path::Path| {
        let (wall, out) = bulwark_run_with(cache, &hello, Some(vmm));
        assert_eq!(stdout(&out), expected, "hello.wat printed something else");
        ms(wall)
    };
    one(&confined);
    one(&unconfined);
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..runs {
        with.push(one(&confined));
        without.push(one(&unconfined));
    }
    let deltas: Vec<f64> = with.iter().zip(&without).map(|(a, b)| a - b).collect();
    let (cmin, cmed, cmax) = summary(with);
    let (umin, umed, umax) = summary(without);
    let (dmin, dmed, dmax) = summary(deltas);
    println!();
    println!(
        "bulwark run examples/hello.wat, VMM confined vs --no-confine, {runs} pairs (same sh wrapper)"
    );
    println!("  confined        min {cmin:7.2} ms  median {cmed:7.2} ms  max {cmax:7.2} ms");
    println!("  --no-confine    min {umin:7.2} ms  median {umed:7.2} ms  max {umax:7.2} ms");
    println!(
        "  difference, pair by pair   min {dmin:+.2} ms  median {dmed:+.2} ms  max {dmax:+.2} ms   (target: median < +0.5 ms)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// What one compute run printed and cost.
struct ComputeRun {
    /// `mib=... rounds=... sha256=... sorted_checksum=...`, which must be the same everywhere.
    result: String,
    /// The tool's own compute time.
    tool_ms: f64,
    /// Spawn to exit.
    wall_ms: f64,
}

/// Reads the tool's `compute: ...` line.
fn parse_compute(out: &Output, wall: Duration, what: &str) -> ComputeRun {
    let text = stdout(out);
    let line = text
        .lines()
        .find(|l| l.starts_with("compute: "))
        .unwrap_or_else(|| panic!("{what} printed no `compute:` line: {text:?}"));
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{what}: no {name}= in {line:?}"))
    };
    let result = format!(
        "mib={} rounds={} sha256={} sorted_checksum={}",
        field("mib"),
        field("rounds"),
        field("sha256"),
        field("sorted_checksum")
    );
    let tool_ms = field("millis")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: millis in {line:?}: {e}"));
    ComputeRun {
        result,
        tool_ms,
        wall_ms: ms(wall),
    }
}

/// One way to run the compute tool.
struct Mode {
    name: &'static str,
    run: Box<dyn Fn() -> ComputeRun>,
    samples: Vec<ComputeRun>,
}

fn bench_compute(cache: &std::path::Path, runs: usize) {
    let mib = env_count("BULWARK_BENCH_COMPUTE_MIB", 8);
    let native = built("compute-native");
    let wasm = built("compute.wasm").display().to_string();
    // The tool holds the data twice (bytes and u32 words) plus slack for the allocator.
    let limits = [
        "--timeout".to_owned(),
        "120s".to_owned(),
        "--max-memory".to_owned(),
        format!("{}MiB", 64 + 4 * mib),
    ];
    let vm_ram = ["--mem-mib".to_owned(), (512 + 4 * mib).to_string()];
    let isolation = has_isolation_flag();
    let tool_args = [wasm, mib.to_string()];

    let mut modes = vec![Mode {
        name: "native (compute-native)",
        run: Box::new(move || {
            let what = "compute-native";
            let (wall, out) = timed(Command::new(&native).arg(mib.to_string()), what);
            parse_compute(&out, wall, what)
        }),
        samples: Vec::new(),
    }];
    let bulwark_mode = |name: &'static str, flags: Vec<String>| {
        let cache = cache.to_path_buf();
        let args: Vec<String> = flags.into_iter().chain(tool_args.clone()).collect();
        Mode {
            name,
            run: Box::new(move || {
                let (wall, out) = bulwark_run(&cache, &args);
                parse_compute(&out, wall, &format!("bulwark run {}", args.join(" ")))
            }),
            samples: Vec::new(),
        }
    };
    let vm_flags = if isolation {
        vec!["--isolation".to_owned(), "vm".to_owned()]
    } else {
        Vec::new()
    };
    let fuel = ["--fuel".to_owned(), "1000000000000".to_owned()];
    let vm_args: Vec<String> = vm_flags
        .into_iter()
        .chain(limits.clone())
        .chain(vm_ram)
        .collect();
    modes.push(bulwark_mode(
        if isolation {
            "bulwark run --isolation vm"
        } else {
            "bulwark run (VM, default)"
        },
        vm_args.clone(),
    ));
    let wasm_args: Vec<String> = ["--isolation".to_owned(), "wasm".to_owned()]
        .into_iter()
        .chain(limits)
        .collect();
    if isolation {
        modes.push(bulwark_mode(
            "bulwark run --isolation wasm",
            wasm_args.clone(),
        ));
    }
    modes.push(bulwark_mode(
        "  vm with --fuel",
        vm_args.into_iter().chain(fuel.clone()).collect(),
    ));
    if isolation {
        modes.push(bulwark_mode(
            "  wasm with --fuel",
            wasm_args.into_iter().chain(fuel).collect(),
        ));
    }

    // One warm-up each (fills the compile cache and the page cache), then interleaved runs.
    let reference = (modes[0].run)().result;
    for mode in &modes[1..] {
        let result = (mode.run)().result;
        assert_eq!(
            result, reference,
            "{} computed something else than the native build",
            mode.name
        );
    }
    for _ in 0..runs {
        for mode in &mut modes {
            let run = (mode.run)();
            assert_eq!(
                run.result, reference,
                "{} computed something else than the native build",
                mode.name
            );
            mode.samples.push(run);
        }
    }

    println!();
    println!(
        "compute tool: {mib} MiB of data, SHA-256 rounds and a sort of {} u32, {runs} runs each (+1 warm-up), interleaved",
        (mib << 20) / 4
    );
    println!("  every run printed {reference}");
    println!(
        "  {:<30} {:>26}   {:>26}",
        "", "tool's own time (compute)", "whole process"
    );
    println!(
        "  {:<30} {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}",
        "", "min", "median", "max", "min", "median", "max"
    );
    let mut tool_medians = Vec::new();
    let mut wall_medians = Vec::new();
    for mode in &modes {
        let (tmin, tmed, tmax) = summary(mode.samples.iter().map(|s| s.tool_ms).collect());
        let (wmin, wmed, wmax) = summary(mode.samples.iter().map(|s| s.wall_ms).collect());
        println!(
            "  {:<30} {tmin:8.1} {tmed:8.1} {tmax:8.1}   {wmin:8.1} {wmed:8.1} {wmax:8.1}   ms",
            mode.name
        );
        tool_medians.push(tmed);
        wall_medians.push(wmed);
    }
    let ratio = |a: usize, b: usize, label: &str, target: &str| {
        println!(
            "  ratio {label:<24} compute {:.3}   whole process {:.3}{target}",
            tool_medians[a] / tool_medians[b],
            wall_medians[a] / wall_medians[b]
        );
    };
    if isolation {
        ratio(1, 2, "vm / wasm", "   (target: <= 1.05)");
    } else {
        println!(
            "  --isolation wasm: skipped, this bulwark has no --isolation option yet (vm/wasm ratio not measured)"
        );
    }
    ratio(1, 0, "vm / native", "   (target: <= 1.5)");
    if isolation {
        ratio(2, 0, "wasm / native", "");
        ratio(3, 0, "vm --fuel / native", "");
        ratio(4, 0, "wasm --fuel / native", "");
    } else {
        ratio(2, 0, "vm --fuel / native", "");
    }
}

/// A language runtime's smallest call, `bulwark run` whole process, in the VM and with
/// `--isolation wasm`, interleaved: CPython `-c 'print(1+1)'` and QuickJS `-e 'console.log(1+1)'`
/// (`build/runtimes`, from `images/runtimes.sh`). These use the user's own compile cache (not
/// the benchmark's scratch one) so CPython is not compiled again (~30 s) on every run. Also
/// prints the medians of `--json`'s breakdown of the VM calls.
fn bench_runtimes(runs: usize) {
    let cases = [
        (
            "python -c 'print(1+1)'   (targets: vm median <= 50 ms, vm/wasm <= 1.2, VMM RSS <= 64 MiB)",
            "runtimes/python.wasm",
            ["-c", "print(1+1)"],
        ),
        (
            "quickjs -e 'console.log(1+1)'   (target: vm median <= 15 ms)",
            "runtimes/quickjs.wasm",
            ["-e", "console.log(1+1)"],
        ),
    ];
    let run = |isolation: &str, module: &std::path::Path, args: &[&str], json: bool| {
        let mut cmd = Command::new(bulwark());
        cmd.arg("run")
            .args(["--isolation", isolation, "--timeout", "300s"])
            .args(json.then_some("--json"))
            .arg(module)
            .args(args)
            .env("BULWARK_GUEST", guest_image());
        let (wall, out) = timed(
            &mut cmd,
            &format!("bulwark run {isolation} {}", module.display()),
        );
        if !json {
            assert_eq!(
                stdout(&out),
                "2\n",
                "{} printed something else",
                module.display()
            );
        }
        (ms(wall), stdout(&out))
    };
    println!(
        "language runtimes, whole process, warm compile cache (~/.cache/bulwark), {runs} runs each (+1 warm-up), interleaved"
    );
    for (name, file, args) in cases {
        let module = build_dir().join(file);
        if !module.is_file() {
            println!(
                "  {name}: skipped, {} is missing (make guest)",
                module.display()
            );
            continue;
        }
        // Warm-up: compiles each target once if the cache does not have it yet.
        run("vm", &module, &args, false);
        run("wasm", &module, &args, false);
        let (mut vm, mut wasm) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            vm.push(run("vm", &module, &args, false).0);
            wasm.push(run("wasm", &module, &args, false).0);
        }
        let keys = ["call", "guest_load", "guest_instantiate", "guest_run"];
        let mut breakdown: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
        let mut rss = Vec::new();
        for _ in 0..runs {
            let json = run("vm", &module, &args, true).1;
            rss.push(vmm_figures(&json));
            for (key, samples) in keys.iter().zip(&mut breakdown) {
                let us = json_timing_us(&json, key).unwrap_or_else(|| {
                    panic!("no timings_us.{key} in `bulwark run --json`: {json}")
                });
                samples.push(ms(Duration::from_micros(us)));
            }
        }
        let (vmin, vmed, vmax) = summary(vm);
        let (wmin, wmed, wmax) = summary(wasm);
        println!("  {name}");
        println!("    vm     min {vmin:8.1} ms  median {vmed:8.1} ms  max {vmax:8.1} ms");
        println!("    wasm   min {wmin:8.1} ms  median {wmed:8.1} ms  max {wmax:8.1} ms");
        println!("    ratio vm / wasm (medians) {:.2}", vmed / wmed);
        let medians: Vec<String> = keys
            .iter()
            .zip(breakdown)
            .map(|(key, samples)| format!("{key} {:.1} ms", median(samples)))
            .collect();
        println!("    vm --json medians: {}", medians.join("  "));
        println!("    vm --json medians: {}", vmm_line(&rss));
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` of this target runs nothing.
    if !std::env::args().any(|a| a == "--bench") || !kvm_available() {
        return;
    }
    let runs = env_count("BULWARK_BENCH_RUNS", 20);
    let compute_runs = env_count("BULWARK_BENCH_COMPUTE_RUNS", 5);
    let cache = scratch_dir("bench-run").join("cache");
    println!("load average before: {}", loadavg());
    bench_hello(&cache, runs);
    bench_confinement(&cache, runs);
    bench_compute(&cache, compute_runs);
    bench_runtimes(compute_runs);
    println!("load average after: {}", loadavg());
    let _ = std::fs::remove_dir_all(cache.parent().unwrap_or(&cache));
}
