//! vsock benchmark, host Unix socket ↔ guest: 64-byte round-trip latency (p50/p99 over 10,000
//! round trips), throughput of 1 MiB messages echoed by the guest, and VM exits per round trip.
//! Run with `make bench` (or `cargo bench -p bulwark-tests --bench vsock` after `make guest`).

// A benchmark step that fails panics with its message, as a test would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::{Duration, Instant};

use bulwark_tests::*;

/// A guest in vsock-connect mode, connected to us, echoing.
struct Session {
    vm: Child,
    conn: UnixStream,
}

fn start(name: &str) -> Session {
    let (vm, conn) = start_connecting_guest(name);
    Session { vm, conn }
}

/// Closes the connection (the guest then exits) and returns the VMM's exit count.
fn finish(s: Session) -> u64 {
    drop(s.conn);
    let out = s.vm.wait_with_output().expect("bulwark-vmm ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    err.split(", ")
        .find_map(|part| part.strip_suffix(" VM exits"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit count in: {err}"))
}

fn round_trip(conn: &mut UnixStream, out: &[u8], back: &mut [u8]) {
    conn.write_all(out).expect("write");
    conn.read_exact(back).expect("read the echo");
}

/// `a / b` for printing; both are counts far below 2^52, so `f64` holds them exactly.
#[allow(clippy::cast_precision_loss, reason = "event counts, far below 2^52")]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") || !kvm_available() {
        return;
    }
    const ROUND_TRIPS: u32 = 10_000;
    let mut s = start("bench-vsock-latency");
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    for _ in 0..100 {
        round_trip(&mut s.conn, &msg, &mut back);
    }
    let mut samples: Vec<Duration> = (0..ROUND_TRIPS)
        .map(|_| {
            let t = Instant::now();
            round_trip(&mut s.conn, &msg, &mut back);
            t.elapsed()
        })
        .collect();
    let exits = finish(s);
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // The sample at `per_mille` thousandths of the sorted list.
    let pct =
        |per_mille: usize| us(samples[(samples.len() * per_mille / 1000).min(samples.len() - 1)]);

    const MESSAGES: u32 = 256;
    const MESSAGE_BYTES: u32 = 1 << 20;
    let mut s = start("bench-vsock-throughput");
    let big = vec![0xa5u8; MESSAGE_BYTES as usize];
    let mut big_back = vec![0u8; MESSAGE_BYTES as usize];
    round_trip(&mut s.conn, &big, &mut big_back);
    let t = Instant::now();
    for _ in 0..MESSAGES {
        round_trip(&mut s.conn, &big, &mut big_back);
    }
    let secs = t.elapsed().as_secs_f64();
    let big_exits = finish(s);
    let mb_per_s = f64::from(MESSAGES) * f64::from(MESSAGE_BYTES) / secs / 1e6;

    println!("vsock, host Unix socket <-> guest echo");
    println!(
        "  64-byte round trip over {ROUND_TRIPS}: p50 {:.1} us  p99 {:.1} us  min {:.1} us",
        pct(500),
        pct(990),
        us(samples[0])
    );
    println!(
        "  VM exits: {exits} for {} round trips plus connection set-up ({:.2} per round trip)",
        ROUND_TRIPS + 100,
        ratio(exits, u64::from(ROUND_TRIPS + 100))
    );
    println!(
        "  1 MiB messages echoed: {MESSAGES} in {secs:.2} s = {mb_per_s:.0} MB/s each way ({big_exits} VM exits)"
    );
}
