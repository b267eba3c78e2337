//! The guest agent's protocol on a real VM, spoken directly: malformed, oversized and
//! wrong-version requests are refused (`Outcome::Refused`) and their connection closes, and the
//! agent goes on serving the next call. The artifact is mapped by the VMM (`--artifact-from-stdin`)
//! and only named by the request.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bulwark_proto::call::{Outcome, PROTOCOL_VERSION, Request, Response};
use bulwark_proto::frame::{self, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
use bulwark_tests::*;

/// A VM serving tool calls; killed when dropped.
struct AgentVm {
    child: Child,
    uds: PathBuf,
}

impl AgentVm {
    /// A VM with `artifact` (a file `bulwark compile` wrote) in its artifact window, if any.
    fn start(test: &str, artifact: Option<&Path>) -> Self {
        let uds = scratch_dir(test).join("vsock.sock");
        let mut cmd = Command::new(vmm_binary());
        cmd.args(["--timeout", "120", "--vsock-uds"])
            .arg(&uds)
            .arg(guest_image())
            .stdout(Stdio::null());
        if let Some(path) = artifact {
            cmd.arg("--artifact-from-stdin")
                .stdin(std::fs::File::open(path).unwrap());
        }
        let child = cmd.spawn().expect("start bulwark-vmm");
        Self { child, uds }
    }

    /// A connection to the agent, after the `CONNECT` handshake.
    fn connect(&self) -> UnixStream {
        connect_agent(&self.uds, Duration::from_secs(30))
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

/// `examples/hello.wat` compiled by `bulwark compile` (with `--fuel` when `fuel`) into a file
/// of the test's scratch directory `test`.
fn hello_artifact(test: &str, fuel: bool) -> PathBuf {
    let artifact = scratch_dir(test).join(if fuel {
        "hello-fuel.cwasm"
    } else {
        "hello.cwasm"
    });
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
    artifact
}

/// A call of the artifact at `path` (named by digest `[digest; 32]`).
fn request_for(path: &Path, digest: u8) -> Request {
    agent_request(path, digest, vec!["hello".into()])
}

#[test]
fn bad_requests_are_refused_and_the_agent_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let hello = hello_artifact("agent-bad-requests-artifact", false);
    let hello_request = || request_for(&hello, 1);
    let vm = AgentVm::start("agent-bad-requests", Some(&hello));

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

    // An artifact of another size than the one this VM has mapped.
    let mut other = hello_request();
    other.artifact.size += 1;
    let mut s = vm.connect();
    s.write_all(&frame::encode(&other).unwrap()).unwrap();
    let e = answer(&mut s);
    assert!(
        refusal_of(&e).contains("bytes mapped"),
        "{}",
        refusal_of(&e)
    );

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

    // After all that, a real call works, and the module it loaded is kept for the next.
    let r = call(&vm, &hello_request());
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    let r = call(&vm, &hello_request());
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(
        r.timings.load_us, 0,
        "a loaded artifact is not loaded again"
    );

    // The VM runs only the module it has mapped, and only in the variant it was loaded as.
    let r = call(&vm, &request_for(&hello, 2));
    assert!(
        refusal_of(&r).contains("another module"),
        "{}",
        refusal_of(&r)
    );
    let mut metered = hello_request();
    metered.limits.fuel = Some(1000);
    let r = call(&vm, &metered);
    assert!(
        refusal_of(&r).contains("loaded as unmetered"),
        "{}",
        refusal_of(&r)
    );
    let r = call(&vm, &hello_request());
    assert_eq!(r.outcome, Outcome::Exited(0));
}

/// A VM started without an artifact refuses calls, and says why.
#[test]
fn a_vm_without_an_artifact_refuses_calls() {
    if !kvm_available() {
        return;
    }
    let hello = hello_artifact("agent-no-artifact-file", false);
    let vm = AgentVm::start("agent-no-artifact", None);
    let r = call(&vm, &request_for(&hello, 1));
    assert!(
        refusal_of(&r).contains("no artifact mapped"),
        "{}",
        refusal_of(&r)
    );
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
    let unmetered = hello_artifact("agent-metering-unmetered-artifact", false);
    let metered = hello_artifact("agent-metering-metered-artifact", true);
    assert_ne!(
        std::fs::read(&unmetered).unwrap(),
        std::fs::read(&metered).unwrap()
    );
    let with_fuel = |path: &Path, fuel: Option<u64>| {
        let mut r = request_for(path, 1);
        r.limits.fuel = fuel;
        r
    };

    // A VM with the unmetered artifact: a call with a fuel budget is refused, one without runs
    // and counts no fuel.
    let vm = AgentVm::start("agent-metering-unmetered", Some(&unmetered));
    let r = call(&vm, &with_fuel(&unmetered, Some(1_000_000)));
    assert!(
        refusal_of(&r).contains("fuel-metered"),
        "{}",
        refusal_of(&r)
    );
    assert_eq!(r.fuel_consumed, None);
    let r = call(&vm, &with_fuel(&unmetered, None));
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    assert_eq!(r.fuel_consumed, None);
    drop(vm);

    // A VM with the metered artifact: the other way round, and fuel is counted and enforced.
    let vm = AgentVm::start("agent-metering-metered", Some(&metered));
    let r = call(&vm, &with_fuel(&metered, None));
    assert!(refusal_of(&r).contains("unmetered"), "{}", refusal_of(&r));
    let r = call(&vm, &with_fuel(&metered, Some(1_000_000)));
    assert_eq!(r.outcome, Outcome::Exited(0));
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
    assert!(r.fuel_consumed.is_some_and(|f| f > 0), "{r:?}");
    let r = call(&vm, &with_fuel(&metered, Some(10)));
    assert_eq!(r.outcome, Outcome::OutOfFuel);
    assert_eq!(r.fuel_consumed, Some(10));
}
