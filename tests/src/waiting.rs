//! A VMM started with `--artifact-later` (warm pools, reusable VMs), driven directly: its
//! artifact socket (standard input), its agent over vsock.

// The helpers fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_abi::vsock::handshake::{self, HandshakeError};
use bulwark_proto::call::{AGENT_PORT, Request, Response};
use bulwark_proto::frame::{self, MAX_RESPONSE_FRAME};

use crate::{bulwark_binary, guest_image, repo_root, scratch_dir, stderr, vmm_binary};

/// A VMM started with `--artifact-later`; killed when dropped.
pub struct WaitingVm {
    /// The VMM process.
    pub child: Child,
    /// Its vsock socket.
    pub uds: PathBuf,
    /// Our end of the artifact socket.
    pub socket: UnixStream,
}

impl WaitingVm {
    /// Starts the VMM with `extra` arguments before the guest image.
    pub fn start(test: &str, extra: &[&str]) -> Self {
        let uds = scratch_dir(test).join("vsock.sock");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let child = Command::new(vmm_binary())
            .args(["--artifact-later", "--vsock-uds"])
            .arg(&uds)
            .args(extra)
            .arg(guest_image())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulwark-vmm");
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            child,
            uds,
            socket: ours,
        }
    }

    /// Sends one message (`bytes` with `fds` attached) and returns the VMM's answer line.
    pub fn send(&mut self, bytes: &[u8], fds: &[RawFd]) -> String {
        send_message(&self.socket, bytes, fds);
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\n") {
            let n = self.socket.read(&mut byte).expect("an answer from the VMM");
            assert_eq!(n, 1, "the VMM closed the socket after {answer:?}");
            answer.push(byte[0]);
            assert!(answer.len() <= 512, "answer too long: {answer:?}");
        }
        String::from_utf8(answer).unwrap()
    }

    /// Sends `offset` and `len` with `fd`, and returns the answer.
    pub fn give(&mut self, offset: u64, len: u64, fd: RawFd) -> String {
        self.send(&header(offset, len), &[fd])
    }

    /// A connection to the agent, after the `CONNECT` handshake (retried while the guest is
    /// not listening yet).
    pub fn connect(&mut self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                Instant::now() < deadline,
                "the agent never listened: {:?}",
                self.child.try_wait()
            );
            let Ok(mut s) = UnixStream::connect(&self.uds) else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            match handshake::connect(&mut s, AGENT_PORT) {
                Ok(_) => return s,
                Err(HandshakeError::Closed { .. }) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("handshake: {e}"),
            }
        }
    }

    /// Sends `request` on a new connection and returns the answer.
    pub fn call(&mut self, request: &Request) -> Response {
        let mut s = self.connect();
        s.write_all(&frame::encode(request).unwrap()).unwrap();
        frame::read(&mut s, MAX_RESPONSE_FRAME).expect("a response that decodes")
    }

    /// Whether the VMM still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the VMM to end (it must, within 30 s) and returns its status and stderr.
    pub fn wait_end(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the VM did not end");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    }

    /// Stops the VMM (SIGTERM) and returns its stderr.
    pub fn stop(mut self) -> String {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (status, err) = self.wait_end_ref();
        assert_eq!(status, Some(143), "{err}");
        err
    }

    /// Waits for the VMM to end and returns its status and stderr.
    pub fn wait_end_ref(&mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (status.code(), err)
    }
}

impl Drop for WaitingVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 16-byte header: offset and length, little-endian.
pub fn header(offset: u64, len: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&offset.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) in one `sendmsg`.
pub fn send_message(socket: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let mut control = [0u64; 16];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE/CMSG_LEN only compute lengths; the buffer holds 128 bytes, more
        // than one header and the few descriptors the tests send; CMSG_FIRSTHDR and CMSG_DATA
        // point into it.
        unsafe {
            let space = libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap()) as usize;
            assert!(space <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap()) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: `msg` points to live buffers of the lengths it gives.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(bytes.len()),
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}

/// `examples/hello.wat` compiled by `bulwark compile` into the scratch directory `test`.
pub fn hello_artifact(test: &str) -> PathBuf {
    compile_module(test, &repo_root().join("examples/hello.wat"))
}

/// The module (or WAT text) at `module` compiled by `bulwark compile` into the scratch
/// directory `test`.
pub fn compile_module(test: &str, module: &Path) -> PathBuf {
    let stem = module
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("module");
    let artifact = scratch_dir(test).join(format!("{stem}.cwasm"));
    let out = Command::new(bulwark_binary())
        .arg("compile")
        .arg(module)
        .arg("-o")
        .arg(&artifact)
        .output()
        .expect("run bulwark compile");
    assert!(out.status.success(), "{}", stderr(&out));
    artifact
}
