//! Streamed output on a real VM, spoken directly to the agent: a request with `stream` gets
//! `Reply::Stdout` / `Reply::Stderr` frames while the tool runs, then one `Reply::Done` whose
//! `stdout` and `stderr` are empty; the cap still holds over everything streamed; a host that
//! leaves mid-stream ends the call and the VM serves the next connection; a request without
//! `stream` still gets one plain `Response`.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_proto::call::{Artifact, Limits, Outcome, PROTOCOL_VERSION, Reply, Request, Response};
use bulwark_proto::frame::{self, MAX_RESPONSE_FRAME};
use bulwark_tests::*;

/// Helpers every tool below uses: `$write(fd, ptr, len)` through an iovec at 0, `$now()` (the
/// monotonic clock in ns, read at 16) and `$spin(ns)` (a busy loop on `$now`).
const PRELUDE: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 16)))
    (i64.load (i32.const 16)))
  (func $spin (param $ns i64) (local $end i64)
    (local.set $end (i64.add (call $now) (local.get $ns)))
    (block $done (loop $again
      (br_if $done (i64.ge_u (call $now) (local.get $end)))
      (br $again))))
"#;

/// Writes "a", spins 300 ms, writes "b".
const SLOW: &str = r#"
  (data (i32.const 100) "ab")
  (func (export "_start")
    (call $write (i32.const 1) (i32.const 100) (i32.const 1))
    (call $spin (i64.const 300000000))
    (call $write (i32.const 1) (i32.const 101) (i32.const 1)))
"#;

/// 200 rounds of "o<c>\n" to stdout and "e<c>\n" to stderr (c = 'a' + i % 26), spinning 2 ms
/// every 8 rounds.
const INTERLEAVED: &str = r#"
  (data (i32.const 100) "o?\n")
  (data (i32.const 110) "e?\n")
  (func (export "_start") (local $i i32) (local $c i32)
    (loop $round
      (local.set $c (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 26))))
      (i32.store8 (i32.const 101) (local.get $c))
      (i32.store8 (i32.const 111) (local.get $c))
      (call $write (i32.const 1) (i32.const 100) (i32.const 3))
      (call $write (i32.const 2) (i32.const 110) (i32.const 3))
      (if (i32.eqz (i32.rem_u (local.get $i) (i32.const 8)))
        (then (call $spin (i64.const 2000000))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $round (i32.lt_u (local.get $i) (i32.const 200)))))
"#;

/// 100 writes of 16 KiB to stdout (1600 KiB), from offset 65536 (zeroed memory: 0 bytes).
const FLOOD: &str = r#"
  (func (export "_start") (local $i i32)
    (loop $round
      (call $write (i32.const 1) (i32.const 65536) (i32.const 16384))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $round (i32.lt_u (local.get $i) (i32.const 100)))))
"#;

/// Writes "before\n" to stdout and "err\n" to stderr, then traps.
const TRAP: &str = r#"
  (data (i32.const 100) "before\n")
  (data (i32.const 110) "err\n")
  (func (export "_start")
    (call $write (i32.const 1) (i32.const 100) (i32.const 7))
    (call $write (i32.const 2) (i32.const 110) (i32.const 4))
    unreachable)
"#;

/// With one argument or more (argc >= 2): 100 bytes of "x" every ms for 20 s. Without: "done\n".
const LONG_OR_QUICK: &str = r#"
  (data (i32.const 100) "done\n")
  (func (export "_start") (local $i i32)
    (drop (call $args_sizes (i32.const 32) (i32.const 36)))
    (if (i32.lt_u (i32.load (i32.const 32)) (i32.const 2))
      (then
        (call $write (i32.const 1) (i32.const 100) (i32.const 5))
        (return)))
    (memory.fill (i32.const 200) (i32.const 120) (i32.const 100))
    (loop $round
      (call $write (i32.const 1) (i32.const 200) (i32.const 100))
      (call $spin (i64.const 1000000))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $round (i32.lt_u (local.get $i) (i32.const 20000)))))
"#;

/// A VM serving calls of one tool; killed when dropped.
struct ToolVm {
    child: Child,
    uds: PathBuf,
    artifact: PathBuf,
}

impl ToolVm {
    /// Compiles the tool whose body (after [`PRELUDE`]) is `body` and starts a VM with it.
    fn start(test: &str, body: &str) -> Self {
        let dir = scratch_dir(test);
        let wat = dir.join("tool.wat");
        std::fs::write(&wat, format!("(module {PRELUDE} {body})")).unwrap();
        let artifact = dir.join("tool.cwasm");
        let out = Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
            .arg("compile")
            .arg(&wat)
            .arg("-o")
            .arg(&artifact)
            .output()
            .expect("run bulwark compile");
        assert!(out.status.success(), "{}", stderr(&out));
        let uds = dir.join("vsock.sock");
        let child = Command::new(vmm_binary())
            .args(["--timeout", "120", "--vsock-uds"])
            .arg(&uds)
            .arg(guest_image())
            .arg("--artifact-from-stdin")
            .stdin(std::fs::File::open(&artifact).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .expect("start bulwark-vmm");
        Self {
            child,
            uds,
            artifact,
        }
    }

    /// A call of the tool with `args` after its name.
    fn request(&self, args: &[&str], stream: bool) -> Request {
        Request {
            version: PROTOCOL_VERSION,
            artifact: Artifact {
                digest: [1; 32],
                size: std::fs::metadata(&self.artifact).unwrap().len(),
            },
            args: std::iter::once("tool")
                .chain(args.iter().copied())
                .map(String::from)
                .collect(),
            env: Vec::new(),
            stdin: Vec::new(),
            dirs: Vec::new(),
            limits: Limits::default(),
            random_seed: [0; 32],
            realtime_ns: 0,
            stream,
        }
    }

    /// A connection to the agent with `request` sent on it.
    fn send(&self, request: &Request) -> UnixStream {
        let mut s = connect_agent(&self.uds, Duration::from_secs(60));
        s.write_all(&frame::encode(request).unwrap()).unwrap();
        s
    }
}

impl Drop for ToolVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything a streamed call sent: each output frame with when it arrived, and `Done`'s
/// answer with when it arrived.
struct Streamed {
    frames: Vec<(Instant, Reply)>,
    done: Response,
    done_at: Instant,
}

impl Streamed {
    /// The concatenated bytes of the stdout (`err` false) or stderr frames.
    fn bytes(&self, err: bool) -> Vec<u8> {
        let mut all = Vec::new();
        for (_, reply) in &self.frames {
            match (reply, err) {
                (Reply::Stdout(b), false) | (Reply::Stderr(b), true) => all.extend_from_slice(b),
                _ => {}
            }
        }
        all
    }

    /// How many stdout (`err` false) or stderr frames came.
    fn count(&self, err: bool) -> usize {
        self.frames
            .iter()
            .filter(|(_, r)| {
                matches!(
                    (r, err),
                    (Reply::Stdout(_), false) | (Reply::Stderr(_), true)
                )
            })
            .count()
    }
}

/// Reads replies until `Done`, then checks that the agent closed the connection.
fn read_stream(s: &mut UnixStream) -> Streamed {
    let mut frames = Vec::new();
    loop {
        let reply: Reply = frame::read(s, MAX_RESPONSE_FRAME).expect("a reply that decodes");
        let at = Instant::now();
        match reply {
            Reply::Done(done) => {
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)
                    .expect("the agent closes the connection");
                assert!(rest.is_empty(), "bytes after Done");
                assert!(done.stdout.is_empty() && done.stderr.is_empty(), "{done:?}");
                return Streamed {
                    frames,
                    done,
                    done_at: at,
                };
            }
            Reply::Stdout(ref b) | Reply::Stderr(ref b) => {
                assert!(!b.is_empty(), "an empty output frame");
                frames.push((at, reply));
            }
        }
    }
}

#[test]
fn output_arrives_while_the_tool_runs() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-slow", SLOW);
    let mut s = vm.send(&vm.request(&[], true));
    let got = read_stream(&mut s);
    assert_eq!(got.done.outcome, Outcome::Exited(0));
    assert!(!got.done.output_truncated);
    assert_eq!(got.bytes(false), b"ab");
    let (a_at, first) = &got.frames[0];
    assert_eq!(*first, Reply::Stdout(b"a".to_vec()), "{:?}", got.frames);
    let early = got.done_at.duration_since(*a_at);
    assert!(
        early >= Duration::from_millis(150),
        "\"a\" came only {early:?} before the end of a tool that spins 300 ms after writing it"
    );
    eprintln!("\"a\" arrived {early:?} before Done");
    // "b" was not sent with "a".
    assert!(got.frames.len() >= 2, "{:?}", got.frames);
}

#[test]
fn stdout_and_stderr_each_arrive_in_order() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-interleaved", INTERLEAVED);
    let got = read_stream(&mut vm.send(&vm.request(&[], true)));
    assert_eq!(got.done.outcome, Outcome::Exited(0));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for i in 0..200u8 {
        let c = b'a' + i % 26;
        out.extend_from_slice(&[b'o', c, b'\n']);
        err.extend_from_slice(&[b'e', c, b'\n']);
    }
    assert_eq!(
        String::from_utf8_lossy(&got.bytes(false)),
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&got.bytes(true)),
        String::from_utf8_lossy(&err)
    );
    eprintln!(
        "{} stdout and {} stderr frames",
        got.count(false),
        got.count(true)
    );
    // The tool spins 2 ms 25 times: its output went out in several frames of each stream, a
    // stderr frame before a later stdout frame.
    assert!(
        got.count(false) > 1 && got.count(true) > 1,
        "{}",
        got.frames.len()
    );
    let first_err = got
        .frames
        .iter()
        .position(|(_, r)| matches!(r, Reply::Stderr(_)))
        .unwrap();
    assert!(
        got.frames[first_err..]
            .iter()
            .any(|(_, r)| matches!(r, Reply::Stdout(_))),
        "all of stdout came before stderr"
    );
}

#[test]
fn streamed_output_keeps_to_the_cap() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-flood", FLOOD);
    let mut req = vm.request(&[], true);
    req.limits.max_output = 100_000;
    let got = read_stream(&mut vm.send(&req));
    assert_eq!(got.done.outcome, Outcome::Exited(0));
    assert!(got.done.output_truncated);
    assert_eq!(got.bytes(false).len(), 100_000);
    assert!(got.bytes(false).iter().all(|&b| b == 0));
    assert_eq!(got.count(true), 0);

    // Without a cap hit: all 1600 KiB arrive, in more than one frame, and nothing is flagged.
    let t = Instant::now();
    let got = read_stream(&mut vm.send(&vm.request(&[], true)));
    eprintln!(
        "1600 KiB streamed in {} frames, {:?}",
        got.count(false),
        t.elapsed()
    );
    assert!(!got.done.output_truncated);
    assert_eq!(got.bytes(false).len(), 100 * 16384);
    assert!(got.count(false) > 1);
}

#[test]
fn output_before_a_trap_arrives_then_the_trap() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-trap", TRAP);
    let got = read_stream(&mut vm.send(&vm.request(&[], true)));
    match &got.done.outcome {
        Outcome::Trap(message) => assert!(message.contains("unreachable"), "{message}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_eq!(got.bytes(false), b"before\n");
    assert_eq!(got.bytes(true), b"err\n");

    // Without `stream`: one plain Response with all the output, as before.
    let mut s = vm.send(&vm.request(&[], false));
    let r: Response = frame::read(&mut s, MAX_RESPONSE_FRAME).expect("a response that decodes");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after the response");
    assert!(matches!(r.outcome, Outcome::Trap(_)), "{:?}", r.outcome);
    assert_eq!(r.stdout, b"before\n");
    assert_eq!(r.stderr, b"err\n");
}

#[test]
fn a_refusal_of_a_streaming_call_is_a_done() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-refused", TRAP);
    let mut req = vm.request(&[], true);
    req.artifact.size += 1;
    let got = read_stream(&mut vm.send(&req));
    assert!(got.frames.is_empty());
    match &got.done.outcome {
        Outcome::Refused(message) => assert!(message.contains("bytes mapped"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_host_that_leaves_mid_stream_ends_the_call_and_the_vm_serves_the_next() {
    if !kvm_available() {
        return;
    }
    let vm = ToolVm::start("stream-leave", LONG_OR_QUICK);
    let mut s = vm.send(&vm.request(&["long"], true));
    let first: Reply = frame::read(&mut s, MAX_RESPONSE_FRAME).expect("a first frame");
    assert!(matches!(first, Reply::Stdout(_)), "{first:?}");
    drop(s);
    let left = Instant::now();

    // The tool would write for 20 s more; the next call is served long before.
    let got = read_stream(&mut vm.send(&vm.request(&[], true)));
    assert_eq!(got.done.outcome, Outcome::Exited(0));
    assert_eq!(got.bytes(false), b"done\n");
    let waited = left.elapsed();
    eprintln!("the next call was answered {waited:?} after the host left");
    assert!(
        waited < Duration::from_secs(10),
        "the next call waited {waited:?}: the call whose host left was not ended"
    );
}
