//! `bulwark run` end to end: tool calls in real micro-VMs.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::*;

fn run_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    bulwark_run(args, stdin)
}

fn run(args: &[&str]) -> Output {
    run_with_stdin(args, b"")
}

fn tool() -> String {
    built("echo-args.wasm").display().to_string()
}

fn hello() -> String {
    repo_root().join("examples/hello.wat").display().to_string()
}

#[test]
fn hello_prints_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let out = run(&[&hello()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a Bulwark micro-VM\n");
}

#[test]
fn args_env_and_stdin_reach_the_tool() {
    if !kvm_available() {
        return;
    }
    let out = run_with_stdin(
        &[
            "--env",
            "SHOW=A,B",
            "--env",
            "A=1",
            "--env",
            "B=two words",
            &tool(),
            "x",
            "-y",
            "--z",
        ],
        b"some input\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "args: x -y --z\nenv A=1\nenv B=two words\nstdin: SOME INPUT\n"
    );
    assert_eq!(stderr(&out), "to stderr\n");
}

#[test]
fn the_tools_exit_code_is_ours() {
    if !kvm_available() {
        return;
    }
    for code in ["0", "3"] {
        let out = run(&["--env", &format!("EXIT={code}"), &tool()]);
        assert_eq!(
            out.status.code(),
            Some(code.parse().unwrap()),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_trap_reports_its_message_and_backtrace() {
    if !kvm_available() {
        return;
    }
    let out = run(&["--env", "TRAP=1", &tool()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(134), "{err}");
    assert!(err.contains("asked to trap"), "{err}");
    assert!(err.contains("the tool trapped"), "{err}");
    assert!(err.contains("wasm backtrace"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_timeout_and_the_next_call_works() {
    if !kvm_available() {
        return;
    }
    let started = Instant::now();
    let out = run(&["--timeout", "1s", "--env", "SPIN=1", &tool()]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 1s"),
        "{}",
        stderr(&out)
    );
    assert!(took >= Duration::from_secs(1), "stopped early: {took:?}");
    // The deadline is enforced from the host: the VM dies at 1 s. The slack covers process
    // start and compiling the tool on a loaded machine; it is not a speed goal.
    assert!(
        took < Duration::from_secs(4),
        "not stopped at the deadline: {took:?}"
    );
    let out = run(&[&hello()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_memory_bomb_is_stopped_by_max_memory() {
    if !kvm_available() {
        return;
    }
    let out = run(&["--max-memory", "32MiB", "--env", "GROW=64", &tool()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(134), "{err}");
    assert!(
        err.contains("memory allocation of 67108864 bytes failed"),
        "{err}"
    );
    let out = run(&["--max-memory", "128MiB", "--env", "GROW=64", &tool()]);
    assert!(stdout(&out).contains("grew 64 MiB"), "{}", stderr(&out));
}

#[test]
fn an_output_flood_is_capped() {
    if !kvm_available() {
        return;
    }
    let out = run(&["--max-output", "64KiB", "--env", "FLOOD=8", &tool()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 64 * 1024);
    assert!(stderr(&out).contains("output over --max-output 65536 bytes was dropped"));
}

#[test]
fn fuel_exhaustion_stops_the_tool() {
    if !kvm_available() {
        return;
    }
    let out = run(&["--fuel", "1000", &tool()]);
    assert_eq!(out.status.code(), Some(134), "{}", stderr(&out));
    assert!(stderr(&out).contains("ran out of fuel"), "{}", stderr(&out));
    let out = run(&["--json", "--fuel", "100000000", &hello()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("\"fuel_consumed\":"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn json_output_carries_the_outcome_and_timings() {
    if !kvm_available() {
        return;
    }
    let out = run(&["--json", "--env", "EXIT=2", &tool(), "a"]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    for key in [
        "\"exit\":2",
        "\"stdout\":\"args: a\\n\"",
        "\"stderr\":\"to stderr\\n\"",
        "\"total\":",
        "\"vm_start\":",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
    // What the VMM and KVM counted: present, and more than nothing.
    for key in ["vm_exits", "vm_page_faults", "vmm_peak_rss_kib"] {
        let pattern = format!("\"{key}\":");
        let at = text
            .find(&pattern)
            .unwrap_or_else(|| panic!("no {key} in {text}"));
        let digits: String = text[at + pattern.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert!(
            digits.parse::<u64>().is_ok_and(|n| n > 0),
            "{key} in {text}"
        );
    }
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = scratch_dir(name);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bad_modules_get_clear_errors() {
    if !kvm_available() {
        return;
    }
    let not_wasm = write_temp("not.wasm", b"#!/bin/sh\necho hi\n");
    let out = run(&[not_wasm.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(stderr(&out).contains("not.wasm"), "{}", stderr(&out));

    let unknown_import = write_temp(
        "import.wat",
        br#"(module (import "env" "launch_missiles" (func)) (func (export "_start") call 0))"#,
    );
    let out = run(&[unknown_import.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(stderr(&out).contains("launch_missiles"), "{}", stderr(&out));

    let big = scratch_dir("big").join("big.wasm");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((256 << 20) + 1)
        .unwrap();
    let out = run(&[big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over the 268435456-byte limit"),
        "{}",
        stderr(&out)
    );

    let missing = Path::new("/nonexistent/tool.wasm");
    let out = run(&[missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/tool.wasm"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_second_run_uses_the_compile_cache() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("cache-check");
    let module = dir.join("t.wat");
    std::fs::write(
        &module,
        std::fs::read(repo_root().join("examples/hello.wat")).unwrap(),
    )
    .unwrap();
    let cache = dir.join("cache");
    let run_json = |isolation: &str| {
        let out = Command::new(bulwark_binary())
            .args(["run", "--json", "--isolation", isolation])
            .arg(&module)
            .env("BULWARK_CACHE_DIR", &cache)
            .env("BULWARK_GUEST", guest_image())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    };
    let artifacts = || {
        let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join("artifacts"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    // One artifact per target: the guest's, and this host's for --isolation wasm.
    for (isolation, count) in [("vm", 1), ("wasm", 2)] {
        run_json(isolation);
        let all = artifacts();
        assert_eq!(all.len(), count, "{all:?}");
        let before: Vec<_> = all.iter().map(|p| modified(p)).collect();
        run_json(isolation);
        let after: Vec<_> = all.iter().map(|p| modified(p)).collect();
        assert_eq!(after, before, "{isolation}: an artifact was rewritten");
        assert_eq!(artifacts().len(), count);
    }
    assert!(
        artifacts()
            .iter()
            .any(|p| p.to_string_lossy().ends_with("-host.cwasm"))
    );
}

#[test]
fn the_json_example_tool_ranks_records() {
    if !kvm_available() {
        return;
    }
    let tool = built("json-rank.wasm");
    let out = run_with_stdin(
        &[tool.to_str().unwrap(), "points"],
        br#"[{"who":"x","points":1},{"who":"y","points":7}]"#,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "{\"count\":2,\"field\":\"points\",\"mean\":4.0,\"ranked\":[{\"points\":7,\"rank\":1,\"who\":\"y\"},{\"points\":1,\"rank\":2,\"who\":\"x\"}]}\n"
    );
    let out = run_with_stdin(&[tool.to_str().unwrap()], b"not json");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("the input is not JSON"),
        "{}",
        stderr(&out)
    );
}

/// Every process whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let path = entry.expect("entry").path();
        if let Ok(cmdline) = std::fs::read(path.join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(text);
            }
        }
    }
    found
}

#[test]
fn ctrl_c_stops_the_call_and_cleans_up() {
    if !kvm_available() {
        return;
    }
    for isolation in ["vm", "wasm"] {
        let child = Command::new(bulwark_binary())
            .args(["run", "--isolation", isolation, "--timeout", "60s"])
            .args(["--env", "SPIN=1", &tool()])
            .env("BULWARK_GUEST", guest_image())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulwark");
        let pid = child.id();
        // Wait until the tool is spinning (in the VM case, until its VMM runs).
        let marker = format!("bulwark-{pid}-");
        let started = Instant::now();
        while isolation == "vm" && processes_mentioning(&marker).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no VMM appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let interrupted = Instant::now();
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let out = child.wait_with_output().expect("bulwark ends");
        let took = interrupted.elapsed();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{isolation}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
        assert!(took < Duration::from_secs(5), "{isolation}: took {took:?}");
        assert!(
            processes_mentioning(&marker).is_empty(),
            "a VMM outlived bulwark"
        );
        let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&marker))
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    }
}

/// A tool that sleeps for one second in `poll_oneoff` (a relative monotonic-clock
/// subscription), then prints `slept`.
const SLEEPER: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 200) "slept\n")
  (func (export "_start")
    (i64.store (i32.const 0) (i64.const 7))              ;; userdata
    (i32.store8 (i32.const 8) (i32.const 0))              ;; tag: clock
    (i32.store (i32.const 16) (i32.const 1))              ;; monotonic
    (i64.store (i32.const 24) (i64.const 1000000000))     ;; 1 s, relative
    (i64.store (i32.const 32) (i64.const 0))
    (i32.store16 (i32.const 40) (i32.const 0))
    (if (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128))
      (then unreachable))
    (if (i32.ne (i32.load (i32.const 128)) (i32.const 1)) (then unreachable))
    (i32.store (i32.const 300) (i32.const 200))
    (i32.store (i32.const 304) (i32.const 6))
    (drop (call $write (i32.const 1) (i32.const 300) (i32.const 1) (i32.const 308)))))"#;

#[test]
#[expect(
    clippy::zombie_processes,
    reason = "reaped with wait4 to read its rusage"
)]
fn a_sleeping_tool_does_not_spin() {
    if !kvm_available() {
        return;
    }
    let module = scratch_dir("sleeper").join("sleeper.wat");
    std::fs::write(&module, SLEEPER).unwrap();
    let started = Instant::now();
    let mut child = Command::new(bulwark_binary())
        .arg("run")
        .arg(&module)
        .env("BULWARK_GUEST", guest_image())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulwark");
    let (mut out, mut err) = (String::new(), String::new());
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `pid` is our own child, not yet reaped; `status` and `usage` are writable memory
    // of the types wait4 fills in. The rusage covers bulwark and the VMM it waited for.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
    let took = started.elapsed();
    assert_eq!(reaped, pid);
    // SAFETY: wait4 succeeded, so it filled in the rusage struct.
    let usage = unsafe { usage.assume_init() };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}: {err}"
    );
    assert_eq!(out, "slept\n");
    assert!(took >= Duration::from_secs(1), "woke early: {took:?}");
    let cpu = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap(),
            u32::try_from(t.tv_usec).unwrap() * 1000,
        )
    };
    let busy = cpu(usage.ru_utime) + cpu(usage.ru_stime);
    // A spinning guest would burn the whole second on its vCPU thread.
    assert!(
        busy < Duration::from_millis(500),
        "bulwark and its VM used {busy:?} of CPU for a 1 s sleep"
    );
}

#[test]
fn oversized_stdin_is_refused_before_a_vm_starts() {
    if !kvm_available() {
        return;
    }
    let big = vec![b'x'; (64 << 20) + 1];
    let out = run_with_stdin(&[&tool()], &big);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("standard input is over the 64 MiB"),
        "{}",
        stderr(&out)
    );
}

/// The pids of processes named `comm` whose parent is `parent`.
fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the name may hold anything, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("", |(_, n)| n);
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if name == comm && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Whether process `pid` runs no more: gone, or a zombie not yet reaped.
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Waits up to `limit` for process `pid` to run no more; false if it still runs.
fn wait_gone(pid: u32, limit: Duration) -> bool {
    let started = Instant::now();
    while !process_gone(pid) {
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// `bulwark run` on a tool that sleeps for 30 s, once its VMM runs: the bulwark process, the
/// VMM's pid, and the call's private directory (where the VMM's socket is).
fn start_sleeping_call(test: &str) -> (std::process::Child, u32, PathBuf) {
    let module = scratch_dir(test).join("sleeper.wat");
    std::fs::write(&module, SLEEPER.replace("1000000000", "30000000000")).unwrap();
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    let child = Command::new(bulwark_binary())
        .args(["run", "--timeout", "60s"])
        .arg(&module)
        .env("BULWARK_GUEST", guest_image())
        .env("BULWARK_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulwark");
    let started = Instant::now();
    let vmm = loop {
        if let Some(&pid) = children_named(child.id(), "bulwark-vmm").first() {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no VMM appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let cmdline = std::fs::read(format!("/proc/{vmm}/cmdline")).expect("the VMM's cmdline");
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let uds = args
        .iter()
        .skip_while(|a| *a != "--vsock-uds")
        .nth(1)
        .expect("--vsock-uds in the VMM's arguments");
    let dir = Path::new(uds).parent().expect("socket dir").to_path_buf();
    // Let the guest get into its sleep. bulwark removes the socket's directory as soon as it
    // has connected, so by now it is gone whatever happens to bulwark next.
    std::thread::sleep(Duration::from_millis(300));
    (child, vmm, dir)
}

#[test]
fn sigterm_and_sighup_stop_the_call_and_clean_up() {
    if !kvm_available() {
        return;
    }
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let (child, vmm, dir) = start_sleeping_call("sigterm");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let out = child.wait_with_output().expect("bulwark ends");
        let gone = wait_gone(vmm, Duration::from_secs(2));
        if !gone {
            // SAFETY: the VMM our bulwark started outlived it; do not leave it running.
            unsafe { libc::kill(libc::pid_t::try_from(vmm).unwrap(), libc::SIGKILL) };
        }
        assert_eq!(out.status.code(), Some(130), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
        assert!(gone, "{name}: the VMM {vmm} outlived bulwark");
        assert!(!dir.exists(), "{name}: {} was left behind", dir.display());
    }
}

#[test]
fn a_killed_bulwark_takes_its_vmm_along() {
    if !kvm_available() {
        return;
    }
    let (mut child, vmm, dir) = start_sleeping_call("sigkill");
    child.kill().expect("SIGKILL bulwark");
    child.wait().expect("reap bulwark");
    let gone = wait_gone(vmm, Duration::from_secs(1));
    if !gone {
        // SAFETY: the VMM our bulwark started outlived it; do not leave it running.
        unsafe { libc::kill(libc::pid_t::try_from(vmm).unwrap(), libc::SIGKILL) };
    }
    // Nothing could remove the directory after SIGKILL: bulwark removed it once connected.
    let left = dir.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(gone, "the VMM {vmm} still ran 1 s after bulwark was killed");
    assert!(!left, "{} was left behind", dir.display());
}

#[test]
fn a_long_tmpdir_still_runs_calls() {
    if !kvm_available() {
        return;
    }
    // An existing directory whose path is 150 bytes: a socket under it cannot be bound.
    let base = scratch_dir("long-tmpdir");
    let pad = 150 - base.as_os_str().len() - 1;
    let long = base.join("t".repeat(pad));
    assert_eq!(long.as_os_str().len(), 150);
    std::fs::create_dir_all(&long).unwrap();
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    let out = Command::new(bulwark_binary())
        .arg("run")
        .arg(hello())
        .env("TMPDIR", &long)
        .env("BULWARK_GUEST", guest_image())
        .env("BULWARK_CACHE_DIR", cache)
        .stdin(Stdio::null())
        .output()
        .expect("run bulwark");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a Bulwark micro-VM\n");
    assert_eq!(std::fs::read_dir(&long).unwrap().count(), 0);
}

#[test]
fn an_unusable_mem_mib_is_refused_with_the_allowed_values() {
    if !kvm_available() {
        return;
    }
    for bad in ["3", "513", "16386"] {
        let out = run(&["--mem-mib", bad, &hello()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{bad}: {err}");
        assert!(
            err.contains(&format!("--mem-mib {bad}"))
                && err.contains("a multiple of 2 from 352")
                && err.contains("to 16384"),
            "{bad}: {err}"
        );
    }
    let out = run(&["--max-memory", "16GiB", &hello()]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("over the 16384 MiB a VM can have"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_vmm_that_dies_during_the_call_reports_why() {
    if !kvm_available() {
        return;
    }
    // A VMM whose guest crashes at once, after the socket is up: the call's connection closes,
    // and what bulwark reports must be the VMM's reason, not the I/O error.
    let dir = scratch_dir("dying-vmm");
    let wrapper = dir.join("crashing-vmm");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --guest-test ud2 \"$@\"\n",
            vmm_binary().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    for _ in 0..5 {
        let out = Command::new(bulwark_binary())
            .arg("run")
            .arg(hello())
            .env("BULWARK_VMM", &wrapper)
            .env("BULWARK_GUEST", guest_image())
            .env("BULWARK_CACHE_DIR", &cache)
            .stdin(Stdio::null())
            .output()
            .expect("run bulwark");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(
            err.contains("the VM ended") && err.contains("CPU exception 6"),
            "{err}"
        );
    }
}
