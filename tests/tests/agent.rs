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
    let dir = scratch_dir("agent-hello");
    let artifact = dir.join("hello.cwasm");
    let out = Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
        .arg("compile")
        .arg(repo_root().join("examples/hello.wat"))
        .arg("-o")
        .arg(&artifact)
        .output()
        .expect("run bulwark compile");
    assert!(out.status.success(), "{}", stderr(&out));
    Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact::Inline {
            digest: [1; 32],
            bytes: std::fs::read(&artifact).unwrap(),
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
