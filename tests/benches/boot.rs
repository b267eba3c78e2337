//! Start-up benchmark: `bulwark-vmm` process start to the guest's ready line, and to exit, with
//! the Wasm self-test as payload; plus the VMM's peak RSS. The VMM runs confined (its default)
//! and with `--no-confine`, interleaved run by run, so the cost of confinement is the paired
//! difference. Run with `make bench` (or `cargo bench -p bulwark-tests` after `make guest`).
//! `BULWARK_BENCH_RUNS` sets the run count of each.

// A benchmark step that fails panics with its message, as a test would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::*;

struct Sample {
    ready: Duration,
    exit: Duration,
    peak_rss_kib: i64,
}

// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[expect(
    clippy::zombie_processes,
    reason = "reaped with wait4 to read its peak RSS"
)]
fn one_run(confined: bool) -> Sample {
    let started = Instant::now();
    let mut cmd = Command::new(vmm_binary());
    if !confined {
        cmd.arg("--no-confine");
    }
    let mut child = cmd
        .args(["--console", "-", "--timeout", "30", "--payload"])
        .arg(selftest_module())
        .arg(guest_image())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start bulwark-vmm: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut ready = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("console output is text");
        if ready.is_none() && line.starts_with("bulwark-guest ready in ") {
            ready = Some(started.elapsed());
        }
    }
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `pid` is our own child, not yet reaped; `status` and `usage` point to writable
    // memory of the types wait4 fills in.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
    let exit = started.elapsed();
    assert_eq!(reaped, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "bulwark-vmm failed (wait status {status:#x})"
    );
    // SAFETY: wait4 succeeded, so it filled in the rusage struct.
    let usage = unsafe { usage.assume_init() };
    Sample {
        ready: ready.expect("the guest printed its ready line"),
        exit,
        peak_rss_kib: usage.ru_maxrss,
    }
}

fn summary<T: Copy + PartialOrd>(mut v: Vec<T>) -> (T, T, T) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test` of this target runs nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !kvm_available() {
        return;
    }
    let runs: usize = std::env::var("BULWARK_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(30);
    one_run(true); // warm the page cache
    one_run(false);
    let mut confined = Vec::new();
    let mut unconfined = Vec::new();
    for _ in 0..runs {
        confined.push(one_run(true));
        unconfined.push(one_run(false));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("bulwark-vmm start-up, {runs} runs each, interleaved (payload: Wasm self-test)");
    for (name, samples) in [("confined", &confined), ("--no-confine", &unconfined)] {
        let (rmin, rmed, rmax) = summary(samples.iter().map(|s| ms(s.ready)).collect());
        let (emin, emed, emax) = summary(samples.iter().map(|s| ms(s.exit)).collect());
        let (kmin, kmed, kmax) = summary(samples.iter().map(|s| s.peak_rss_kib).collect());
        println!("  {name}");
        println!(
            "    process start -> ready line  min {rmin:7.2} ms  median {rmed:7.2} ms  max {rmax:7.2} ms"
        );
        println!(
            "    process start -> exit        min {emin:7.2} ms  median {emed:7.2} ms  max {emax:7.2} ms"
        );
        println!(
            "    peak RSS of bulwark-vmm      min {kmin:7} KiB median {kmed:7} KiB max {kmax:7} KiB"
        );
    }
    let (dmin, dmed, dmax) = summary(
        confined
            .iter()
            .zip(&unconfined)
            .map(|(c, u)| ms(c.ready) - ms(u.ready))
            .collect(),
    );
    println!(
        "  confinement cost (start -> ready, pair by pair)  min {dmin:+.2} ms  median {dmed:+.2} ms  max {dmax:+.2} ms"
    );
}
