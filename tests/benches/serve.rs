//! `bulwark serve` benchmark: what a call costs through the HTTP API from the warm pool, how many
//! calls a second the machine serves, what a pooled VM costs in memory, and a soak. Run with
//! `make bench` (or `cargo bench -p bulwark-tests --bench serve` after `make guest`). It measures
//! and prints; the soak checks correctness (every call answered once, with the right outcome; no
//! VMM left), never time.
//!
//! 1. hello (`examples/hello.wat`, uploaded once) through `POST /v1/runs` over the Unix socket,
//!    `BULWARK_BENCH_RUNS` calls (default 200), each after the pool is full again ("paced": the
//!    pool's refill does not compete with the call), and as many back to back; p50, p90 and max
//!    of the client's whole request, and the medians of the server's own parts (`vm_start`:
//!    taking a pooled VM and mapping the module; `call`: request to answer over vsock; the
//!    guest's load + instantiate + run). Beside it, interleaved, `bulwark run examples/hello.wat`
//!    as a whole process. The same with the pool on huge pages, and with reuse for one tenant
//!    (paced: each call after the last one's VM was reset and kept; the reset's time too).
//! 2. Throughput: `BULWARK_BENCH_THROUGHPUT_CALLS` hello calls (default 300) at concurrency 1, 4
//!    and 16 (a 429 is retried after 5 ms and counted).
//! 3. Memory: the resident set of each ready pooled VMM, and of the server.
//! 4. Soak: `BULWARK_BENCH_SOAK` calls (default 10000) at concurrency 32, a mix of hello, a trap,
//!    a 100 ms timeout and a tool that floods stdout past its `max_output`. Panics if a call is
//!    lost, answered twice or answered wrongly, or if a VMM outlives the server; prints the
//!    server's RSS along the way (it should stay flat).
//!
//! `BULWARK_CLI` overrides the `bulwark` binary (default: the one next to this bench).

// Figures are printed as floats; a count above 2^52 is not a concern here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulwark_tests::bench::{env_count, ms};
use bulwark_tests::http::{self, Server};
use bulwark_tests::wat;
use bulwark_tests::*;
use serde_json::{Value, json};

/// The value at `percent` of the sorted samples.
fn quantile(v: &mut [f64], percent: usize) -> f64 {
    assert!(!v.is_empty(), "no samples");
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) * percent / 100]
}

/// A server with `args` (and no Python or JavaScript pool: [`Server::start`]).
fn start(cache: &Path, args: &[&str]) -> Server {
    let socket = http::socket_dir("bench-serve").join("api.sock");
    Server::start(&socket, cache, args)
}

fn wait_pool_full(socket: &Path) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = http::json(socket, "GET", "/v1/pool", None).unwrap().json();
        if pool["ready"] == pool["target"] {
            return;
        }
        assert!(Instant::now() < until, "the pool does not fill: {pool}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One call; 429s are retried. Returns the answer and the 429s met.
fn call(socket: &Path, body: &Value) -> (Value, usize) {
    let mut busy = 0;
    loop {
        let a = http::json(socket, "POST", "/v1/runs", Some(body)).unwrap();
        if a.status == 429 {
            busy += 1;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        assert_eq!(a.status, 200, "{a:?}");
        return (a.json(), busy);
    }
}

fn us(v: &Value, key: &str) -> f64 {
    v["timings_us"][key].as_f64().unwrap_or(0.0)
}

/// Resident set of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One way of serving hello for [`latency`].
struct Mode {
    /// What the figures are of.
    label: &'static str,
    /// `bulwark serve`'s arguments.
    args: &'static [&'static str],
    /// Whether calls name a tenant (and the server reuses VMs).
    tenant: bool,
}

/// The modes [`latency`] measures, side by side: the default pool (small pages), a pool on
/// huge pages, and reuse for one tenant.
const MODES: [Mode; 3] = [
    Mode {
        label: "warm pool of 2, small pages (the default)",
        args: &["--pool", "2"],
        tenant: false,
    },
    Mode {
        label: "warm pool of 2, huge pages (--pool-pages huge)",
        args: &["--pool", "2", "--pool-pages", "huge"],
        tenant: false,
    },
    Mode {
        label: "reuse for one tenant (--reuse, \"tenant\" in each call)",
        args: &["--pool", "2", "--reuse"],
        tenant: true,
    },
];

/// Waits until the server is ready for the next call of `mode`: its pool full, and with reuse a
/// VM reset and kept; returns the last reset's time in the VMM then, in µs.
fn wait_ready(socket: &Path, mode: &Mode, calls_so_far: usize) -> Option<f64> {
    wait_pool_full(socket);
    if !mode.tenant || calls_so_far == 0 {
        return None;
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = http::json(socket, "GET", "/v1/pool", None).unwrap().json();
        if pool["reuse"]["idle"] == 1 {
            return pool["reuse"]["last_reset_us"].as_f64();
        }
        assert!(Instant::now() < until, "no VM kept: {pool}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn latency(cache: &Path, module: &Value, runs: usize, mode: &Mode, with_cli: bool) {
    let mut args = mode.args.to_vec();
    args.extend(["--max-concurrent", "8"]);
    let server = start(cache, &args);
    let mut hello = module.clone();
    if mode.tenant {
        hello["tenant"] = json!("bench");
    }
    // Warm: the module is compiled, the pool full (with reuse: the tenant's VM started).
    call(&server.socket, &hello);
    let mut paced = Vec::new();
    let mut back_to_back = Vec::new();
    let (mut vm_start, mut vm_call, mut guest) = (Vec::new(), Vec::new(), Vec::new());
    let mut resets = Vec::new();
    let mut cli = Vec::new();
    for i in 0..runs {
        resets.extend(wait_ready(&server.socket, mode, i + 1));
        let t = Instant::now();
        let (a, _) = call(&server.socket, &hello);
        paced.push(ms(t.elapsed()));
        assert_eq!(a["stdout"], "hello from a Bulwark micro-VM\n", "{a}");
        assert_eq!(a["reused"], json!(mode.tenant), "{a}");
        vm_start.push(us(&a, "vm_start"));
        vm_call.push(us(&a, "call"));
        guest.push(us(&a, "guest_load") + us(&a, "guest_instantiate") + us(&a, "guest_run"));
    }
    for i in 0..runs {
        let t = Instant::now();
        call(&server.socket, &hello);
        back_to_back.push(ms(t.elapsed()));
        if with_cli && i % 10 == 0 {
            // `bulwark run`, interleaved, whole process.
            let t = Instant::now();
            let out = Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
                .args(["run", "examples/hello.wat"])
                .current_dir(repo_root())
                .env("BULWARK_GUEST", guest_image())
                .env("BULWARK_CACHE_DIR", cache)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            cli.push(ms(t.elapsed()));
            assert!(out.status.success());
        }
    }
    println!(
        "== hello through the API (Unix socket), {}: {runs} calls each",
        mode.label
    );
    println!(
        "  paced (ready):      p50 {:.3} ms  p90 {:.3} ms  max {:.3} ms",
        quantile(&mut paced, 50),
        quantile(&mut paced, 90),
        quantile(&mut paced, 100)
    );
    println!(
        "    server's parts (medians): vm_start {:.0} µs, call {:.0} µs, of which in the guest {:.0} µs",
        quantile(&mut vm_start, 50),
        quantile(&mut vm_call, 50),
        quantile(&mut guest, 50)
    );
    if !resets.is_empty() {
        println!(
            "    reset after each call, in the VMM (off the call's path): p50 {:.0} µs, max {:.0} µs",
            quantile(&mut resets, 50),
            quantile(&mut resets, 100)
        );
    }
    println!(
        "  back to back:       p50 {:.3} ms  p90 {:.3} ms  max {:.3} ms",
        quantile(&mut back_to_back, 50),
        quantile(&mut back_to_back, 90),
        quantile(&mut back_to_back, 100)
    );
    if with_cli {
        println!(
            "  bulwark run (whole process, {} runs interleaved): p50 {:.3} ms",
            cli.len(),
            quantile(&mut cli, 50)
        );
        let ready = vmm_children(server.child.id());
        let rss: Vec<u64> = ready.iter().filter_map(|&p| rss_kib(p)).collect();
        println!(
            "== memory: {} ready pooled VMMs, RSS {:?} KiB each; the server {} KiB",
            ready.len(),
            rss,
            rss_kib(server.child.id()).unwrap_or(0)
        );
    }
}

fn throughput(cache: &Path, hello: &Value, calls: usize) {
    println!("== throughput: {calls} hello calls");
    for concurrency in [1usize, 4, 16] {
        let server = start(
            cache,
            &[
                "--pool",
                "4",
                "--max-concurrent",
                &concurrency.max(4).to_string(),
            ],
        );
        call(&server.socket, hello);
        wait_pool_full(&server.socket);
        let next = AtomicUsize::new(0);
        let busy = AtomicUsize::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < calls {
                        let (a, b) = call(&server.socket, hello);
                        assert_eq!(a["status"], "exited", "{a}");
                        busy.fetch_add(b, Ordering::Relaxed);
                    }
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  concurrency {concurrency:>2}: {:.0} calls/s ({:.2} s; {} answered 429 and retried)",
            calls as f64 / secs,
            secs,
            busy.load(Ordering::Relaxed)
        );
    }
}

fn upload(socket: &Path, module: &[u8]) -> String {
    let a = http::unix(socket, "POST", "/v1/modules", "application/wasm", module).unwrap();
    assert!(a.status == 200 || a.status == 201, "{a:?}");
    a.json()["digest"].as_str().unwrap().to_owned()
}

fn soak(cache: &Path, hello_wat: &[u8], calls: usize) {
    let concurrency = 32;
    let server = start(cache, &["--pool", "4", "--max-concurrent", "32"]);
    let kinds = [
        (
            json!({"module": upload(&server.socket, hello_wat)}),
            "exited",
        ),
        (
            json!({"module": upload(&server.socket, wat::TRAP.as_bytes())}),
            "trapped",
        ),
        (
            json!({"module": upload(&server.socket, wat::SPIN.as_bytes()), "limits": {"timeout_ms": 100}}),
            "timed_out",
        ),
        (
            json!({"module": upload(&server.socket, wat::FLOOD.as_bytes()), "limits": {"max_output": 65536}}),
            "exited",
        ),
    ];
    let answered: Vec<AtomicUsize> = (0..calls).map(|_| AtomicUsize::new(0)).collect();
    let next = AtomicUsize::new(0);
    let busy = AtomicUsize::new(0);
    let pid = server.child.id();
    let rss_start = rss_kib(pid).unwrap_or(0);
    let mut rss_along = Vec::new();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        break;
                    }
                    let (body, expected) = &kinds[i % kinds.len()];
                    let (a, b) = call(&server.socket, body);
                    busy.fetch_add(b, Ordering::Relaxed);
                    assert_eq!(a["status"], *expected, "call {i}: {a}");
                    match i % kinds.len() {
                        0 => assert_eq!(a["stdout"], "hello from a Bulwark micro-VM\n"),
                        3 => {
                            assert_eq!(a["output_truncated"], true, "{a}");
                            assert_eq!(a["stdout"].as_str().unwrap().len(), 65536);
                        }
                        _ => {}
                    }
                    answered[i].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut mark = calls / 4;
        while next.load(Ordering::Relaxed) < calls {
            if next.load(Ordering::Relaxed) >= mark {
                rss_along.push((mark, rss_kib(pid).unwrap_or(0)));
                mark += calls / 4;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let lost = answered
        .iter()
        .filter(|n| n.load(Ordering::Relaxed) == 0)
        .count();
    let twice = answered
        .iter()
        .filter(|n| n.load(Ordering::Relaxed) > 1)
        .count();
    assert_eq!((lost, twice), (0, 0), "calls lost, calls answered twice");
    let rss_end = rss_kib(pid).unwrap_or(0);
    let mut server = server;
    // SAFETY: kill(2) on our own child, still running.
    unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    let left = vmm_children(pid);
    assert!(
        left.is_empty(),
        "VMMs left after the server stopped: {left:?}"
    );
    println!(
        "== soak: {calls} calls at concurrency {concurrency} (hello, trap, 100 ms timeout, 4 MiB flood) in {secs:.1} s ({:.0} calls/s)",
        calls as f64 / secs
    );
    println!(
        "  every call answered once with its expected outcome; {} answered 429 and retried; no VMM left; the server exited {status}",
        busy.load(Ordering::Relaxed)
    );
    println!("  server RSS: start {rss_start} KiB, along the way {rss_along:?}, end {rss_end} KiB");
}

fn main() {
    if !kvm_available() {
        return;
    }
    let cache =
        std::env::temp_dir().join(format!("bulwark-bench-serve-cache-{}", std::process::id()));
    let hello_wat = std::fs::read(repo_root().join("examples/hello.wat")).unwrap();
    let hello = {
        let server = start(&cache, &["--pool", "0"]);
        json!({"module": upload(&server.socket, &hello_wat)})
    };
    // `bulwark run` needs the guest artifact cached too.
    let _ = Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
        .args(["run", "examples/hello.wat"])
        .current_dir(repo_root())
        .env("BULWARK_GUEST", guest_image())
        .env("BULWARK_CACHE_DIR", &cache)
        .stdin(Stdio::null())
        .output();
    let runs = env_count("BULWARK_BENCH_RUNS", 200);
    for (i, mode) in MODES.iter().enumerate() {
        latency(&cache, &hello, runs, mode, i == 0);
    }
    throughput(
        &cache,
        &hello,
        env_count("BULWARK_BENCH_THROUGHPUT_CALLS", 300),
    );
    soak(&cache, &hello_wat, env_count("BULWARK_BENCH_SOAK", 10_000));
    let _ = std::fs::remove_dir_all(&cache);
}
