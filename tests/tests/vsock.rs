//! The host ↔ guest channel on a real VM: the guest's vsock echo service and its connect mode,
//! reached through the VMM's Unix socket with Firecracker's `CONNECT <port>` handshake.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_abi::vsock::ECHO_PORT;
use bulwark_abi::vsock::handshake::{self, HandshakeError};
use bulwark_tests::*;
use sha2::{Digest, Sha256};

/// A VM running a vsock test mode; killed when dropped.
struct VsockVm {
    child: Child,
    uds: PathBuf,
}

impl VsockVm {
    fn start(test: &str, mode: &str) -> Self {
        let dir = scratch_dir(test);
        let uds = dir.join("vsock.sock");
        let child = Command::new(vmm_binary())
            .args(["--guest-test", mode, "--timeout", "120", "--vsock-uds"])
            .arg(&uds)
            .arg(guest_image())
            .stdout(Stdio::null())
            .spawn()
            .expect("start bulwark-vmm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !uds.exists() {
            assert!(
                Instant::now() < deadline,
                "the VMM never created {}",
                uds.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { child, uds }
    }

    /// Connects to guest `port`; `Err` says why the VMM gave no `OK`.
    fn connect(&self, port: u32) -> Result<UnixStream, HandshakeError> {
        let mut s = UnixStream::connect(&self.uds).map_err(HandshakeError::Io)?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let host_port = handshake::connect(&mut s, port)?;
        assert!(
            host_port >= 1 << 30,
            "host ports come from the VMM's ephemeral range"
        );
        Ok(s)
    }

    fn echo(&self) -> UnixStream {
        self.connect(ECHO_PORT).expect("the echo service answers")
    }
}

impl Drop for VsockVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Sends `data` on `stream` while reading the echo back; returns what came back.
fn echo_through(stream: UnixStream, data: Vec<u8>) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let len = data.len();
    let sender = std::thread::spawn(move || writer.write_all(&data));
    let mut back = vec![0u8; len];
    let mut reader = stream;
    reader
        .read_exact(&mut back)
        .expect("the whole echo comes back");
    sender.join().unwrap().expect("all data sent");
    back
}

#[test]
fn echo_round_trip_through_connect() {
    if !kvm_available() {
        return;
    }
    let vm = VsockVm::start("vsock-echo", "vsock-echo");
    let mut s = vm.echo();
    s.write_all(b"ping over vsock\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "ping over vsock\n");
}

#[test]
fn socat_works_as_a_client() {
    if !kvm_available() {
        return;
    }
    if !std::path::Path::new("/usr/bin/socat").exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but socat is missing (scripts/setup.sh installs it)"
        );
        eprintln!("*** SKIPPED: socat is not installed ***");
        return;
    }
    let vm = VsockVm::start("vsock-socat", "vsock-echo");
    let out = Command::new("/usr/bin/socat")
        .args([
            "-t",
            "2",
            "-",
            &format!("UNIX-CONNECT:{}", vm.uds.display()),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .unwrap()
                .write_all(b"CONNECT 1234\nhello from socat\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("OK "), "{text}");
    assert!(text.ends_with("\nhello from socat\n"), "{text}");
}

#[test]
fn a_64_mib_transfer_comes_back_with_the_same_sha256() {
    if !kvm_available() {
        return;
    }
    let vm = VsockVm::start("vsock-64m", "vsock-echo");
    let data = pattern(64, 64 << 20);
    let sent = Sha256::digest(&data);
    let back = echo_through(vm.echo(), data);
    assert_eq!(Sha256::digest(&back), sent);
}

#[test]
fn sixty_four_concurrent_connections_each_get_their_own_data() {
    if !kvm_available() {
        return;
    }
    let vm = VsockVm::start("vsock-many", "vsock-echo");
    let streams: Vec<UnixStream> = (0..64).map(|_| vm.echo()).collect();
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let data = pattern(i as u64 + 1000, 256 * 1024 + i);
                let back = echo_through(s, data.clone());
                assert!(back == data, "connection {i} got someone else's bytes");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn a_port_nobody_listens_on_is_refused_and_the_vm_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let vm = VsockVm::start("vsock-refused", "vsock-echo");
    let err = vm
        .connect(9999)
        .expect_err("nothing listens on guest port 9999");
    assert!(
        matches!(err, HandshakeError::Closed { port: 9999 }),
        "{err}"
    );
    let mut s = vm.echo();
    s.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
}

#[test]
fn a_client_that_disconnects_mid_transfer_leaves_the_vm_serving_others() {
    if !kvm_available() {
        return;
    }
    let vm = VsockVm::start("vsock-drop", "vsock-echo");
    let keeper = vm.echo();
    {
        let mut quitter = vm.echo();
        quitter
            .set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let chunk = pattern(7, 1 << 20);
        for _ in 0..8 {
            match quitter.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Dropped here, with its echo unread.
    }
    let data = pattern(8, 4 << 20);
    assert!(echo_through(keeper, data.clone()) == data);
    let fresh = vm.echo();
    assert_eq!(echo_through(fresh, b"after".to_vec()), b"after");
}

#[test]
fn a_guest_initiated_connection_reaches_a_host_listener() {
    if !kvm_available() {
        return;
    }
    let (child, mut conn) = start_connecting_guest("vsock-connect");
    conn.write_all(b"echo me").unwrap();
    let mut back = [0u8; 7];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"echo me");
    drop(conn);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
