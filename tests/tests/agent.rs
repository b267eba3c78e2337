//! The guest agent's protocol on a real VM, spoken directly: malformed, oversized and
//! wrong-version requests are refused (`Outcome::Refused`) and their connection closes, and the
//! agent goes on serving the next call.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_abi::vsock::handshake;
use bulwark_proto::call::{
    AGENT_PORT, Artifact, Limits, Outcome, PROTOCOL_VERSION, Request, Response,
};
use bulwark_proto::frame::{self, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
use bulwark_tests::*;

/// A VM serving tool calls; killed when dropped.
struct AgentVm {
    child: Child,
    uds: PathBuf,
}

impl AgentVm {
    fn start(test: &str) -> Self {
        let uds = scratch_dir(test).join("vsock.sock");
        let child = Command::new(vmm_binary())
            .args(["--timeout", "120", "--vsock-uds"])
            .arg(&uds)
            .arg(guest_image())
            .stdout(Stdio::null())
            .spawn()
            .expect("start bulwark-vmm");
        Self { child, uds }
    }

    /// A connection to the agent, after the `CONNECT` handshake.
    fn connect(&self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match UnixStream::connect(&self.uds) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no vsock socket: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        handshake::connect(&mut s, AGENT_PORT).expect("the agent accepts the connection");
        s
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one response frame, then checks that the agent closed the connection.
fn answer(s: &mut UnixStream) -> Response {
    let response = frame::read(s, MAX_RESPONSE_FRAME).expect("a response that decodes");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the agent closes the connection");
    assert!(rest.is_empty(), "bytes after the response");
    response
}

/// The reason of a refused call.
fn refusal_of(r: &Response) -> &str {
    match &r.outcome {
        Outcome::Refused(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn hello_request() -> Request {
    // A directory of its own per call: tests run in parallel, and scratch_dir empties it.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch_dir(&format!("agent-hello-{n}"));
    let artifact = dir.join("hello.cwasm");
    let out = Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
        .arg("compile")
        .arg(repo_root().join("examples/hello.wat"))
        .arg("-o")
        .arg(&artifact)
        .output()
        .expect("run bulwark compile");
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&artifact).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact::Inline {
            digest: [1; 32],
            bytes,
        },
        args: vec!["hello".into()],
        env: Vec::new(),
        stdin: Vec::new(),
        dirs: Vec::new(),
        limits: Limits::default(),
        random_seed: [0; 32],
        realtime_ns: 0,
    }
}

#[test]
fn bad_requests_are_refused_and_the_agent_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let vm = AgentVm::start("agent-bad-requests");

    // A length over the cap is refused before anything is allocated or read.
    let mut s = vm.connect();
    s.write_all(&(MAX_REQUEST_FRAME + 1).to_le_bytes()).unwrap();
    let e = answer(&mut s);
    assert!(refusal_of(&e).contains("over the"), "{}", refusal_of(&e));

    // A body that is not a request.
    let mut s = vm.connect();
    s.write_all(&8u32.to_le_bytes()).unwrap();
    s.write_all(&[0xff; 8]).unwrap();
    let e = answer(&mut s);
    assert!(
        refusal_of(&e).contains("does not decode"),
        "{}",
        refusal_of(&e)
    );

    // Another protocol version.
    let mut old = hello_request();
    old.version = PROTOCOL_VERSION + 1;
    let mut s = vm.connect();
    s.write_all(&frame::encode(&old).unwrap()).unwrap();
    let e = answer(&mut s);
    assert!(
        refusal_of(&e).contains("protocol version"),
        "{}",
        refusal_of(&e)
    );

    // A cached artifact this VM never got.
    let mut cached = hello_request();
    cached.artifact = Artifact::Cached { digest: [9; 32] };
    let mut s = vm.connect();
    s.write_all(&frame::encode(&cached).unwrap()).unwrap();
    let e = answer(&mut s);
    assert!(refusal_of(&e).contains("cached"), "{}", refusal_of(&e));

    // A shared tree that tries to leave its directory.
    let mut escape = hello_request();
    escape.dirs = vec![bulwark_proto::tree::SharedDir {
        guest_path: "/data".into(),
        entries: vec![bulwark_proto::tree::Entry {
            path: "../outside".into(),
            node: bulwark_proto::tree::Node::File(b"x".to_vec()),
        }],
    }];
    let mut s = vm.connect();
    s.write_all(&frame::encode(&escape).unwrap()).unwrap();
    let e = answer(&mut s);
    assert!(refusal_of(&e).contains("/data"), "{}", refusal_of(&e));

    // A client that sends half a request and leaves.
    let mut s = vm.connect();
    s.write_all(&1000u32.to_le_bytes()).unwrap();
    s.write_all(&[0; 10]).unwrap();
    drop(s);

    // After all that, a real call works, and so does the cached artifact it left behind.
    let hello = hello_request();
    let mut s = vm.connect();
    s.write_all(&frame::encode(&hello).unwrap()).unwrap();
    let r = answer(&mut s);
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    let mut again = hello_request();
    again.artifact = Artifact::Cached { digest: [1; 32] };
    let mut s = vm.connect();
    s.write_all(&frame::encode(&again).unwrap()).unwrap();
    let r = answer(&mut s);
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(
        r.timings.load_us, 0,
        "a cached artifact is not loaded again"
    );
}

/// `examples/hello.wat` compiled by `bulwark compile`, with `--fuel` when `fuel`.
fn hello_artifact(fuel: bool) -> Vec<u8> {
    let dir = scratch_dir(if fuel {
        "agent-hello-fuel"
    } else {
        "agent-hello-unmetered"
    });
    let artifact = dir.join("hello.cwasm");
    let mut cmd = Command::new(workspace_binary("bulwark", "BULWARK_CLI"));
    cmd.arg("compile")
        .arg(repo_root().join("examples/hello.wat"))
        .arg("-o")
        .arg(&artifact);
    if fuel {
        cmd.arg("--fuel");
    }
    let out = cmd.output().expect("run bulwark compile");
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&artifact).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    bytes
}

/// Sends `request` on a new connection and returns the answer.
fn call(vm: &AgentVm, request: &Request) -> Response {
    let mut s = vm.connect();
    s.write_all(&frame::encode(request).unwrap()).unwrap();
    answer(&mut s)
}

/// Fuel metering is compiled only into artifacts for calls with a fuel budget; the agent loads
/// each in the engine of the call's variant, so an artifact of the other variant is refused,
/// never run (unmetered code would ignore the budget), and the agent goes on serving.
#[test]
fn artifacts_run_only_in_the_engine_of_their_metering_variant() {
    if !kvm_available() {
        return;
    }
    let vm = AgentVm::start("agent-metering");
    let unmetered = hello_artifact(false);
    let metered = hello_artifact(true);
    assert_ne!(unmetered, metered);
    let request = |bytes: &[u8], digest: u8, fuel: Option<u64>| {
        let mut r = hello_request();
        r.artifact = Artifact::Inline {
            digest: [digest; 32],
            bytes: bytes.to_vec(),
        };
        r.limits.fuel = fuel;
        r
    };

    // The wrong variant either way: refused.
    let r = call(&vm, &request(&unmetered, 2, Some(1_000_000)));
    assert!(
        refusal_of(&r).contains("fuel-metered"),
        "{}",
        refusal_of(&r)
    );
    assert_eq!(r.fuel_consumed, None);
    let r = call(&vm, &request(&metered, 3, None));
    assert!(refusal_of(&r).contains("unmetered"), "{}", refusal_of(&r));

    // The right variants run, and only the metered call counts fuel.
    let r = call(&vm, &request(&metered, 4, Some(1_000_000)));
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    assert!(r.fuel_consumed.is_some_and(|f| f > 0), "{r:?}");
    let r = call(&vm, &request(&metered, 5, Some(10)));
    assert_eq!(r.outcome, Outcome::OutOfFuel);
    assert_eq!(r.fuel_consumed, Some(10));
    let r = call(&vm, &request(&unmetered, 6, None));
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    assert_eq!(r.fuel_consumed, None);

    // The VM's artifact cache keeps the variants apart too: digest 6 is cached unmetered only.
    let mut cached = hello_request();
    cached.artifact = Artifact::Cached { digest: [6; 32] };
    cached.limits.fuel = Some(1_000_000);
    let r = call(&vm, &cached);
    assert!(refusal_of(&r).contains("cached"), "{}", refusal_of(&r));
    cached.limits.fuel = None;
    let r = call(&vm, &cached);
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.timings.load_us, 0);
}
