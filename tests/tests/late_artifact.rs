//! A VM that boots first and gets its artifact later (`bulwark-vmm --artifact-later`, for warm
//! pools): the artifact comes as one message on the VMM's standard input, a Unix socket (16
//! bytes, offset and length, with the file's descriptor attached), answered `OK` or `ERR
//! <reason>`. Bad messages are refused and change nothing; the VM serves calls once mapped;
//! the guest cannot reach the window before, or past the artifact after.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark_abi::layout;
use bulwark_proto::call::{Outcome, Request, Response};
use bulwark_tests::waiting::*;
use bulwark_tests::*;
use bulwark_vmm::outcome::code;

/// A call of the artifact at `path`.
fn request_for(path: &Path) -> Request {
    agent_request(path, 1, vec!["hello".into()])
}

/// The reason of a refused call.
fn refusal_of(r: &Response) -> &str {
    match &r.outcome {
        Outcome::Refused(e) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The whole path: boot, listen, refuse calls and bad messages, map, serve, refuse a second
/// artifact, serve again. All on one VM, which every refusal leaves unchanged.
#[test]
fn a_waiting_vm_refuses_bad_messages_then_maps_its_artifact_and_serves() {
    if !kvm_available() {
        return;
    }
    let hello = hello_artifact("late-serve-artifact");
    let file = std::fs::File::open(&hello).unwrap();
    let size = file.metadata().unwrap().len();
    let fd = file.as_raw_fd();
    let mut vm = WaitingVm::start("late-serve", &["--report-confinement"]);

    // Before the artifact: the agent listens, and a call that names one is refused at once.
    let r = vm.call(&request_for(&hello));
    assert!(
        refusal_of(&r).contains("no artifact mapped"),
        "{}",
        refusal_of(&r)
    );

    // Refused messages, each answered, none fatal.
    let e = vm.send(&header(0, size), &[]);
    assert!(
        e.starts_with("ERR ") && e.contains("exactly one descriptor"),
        "{e}"
    );
    let e = vm.send(&header(0, size), &[fd, fd]);
    assert!(
        e.contains("exactly one descriptor") && e.ends_with("not 2\n"),
        "{e}"
    );
    let e = vm.send(b"garbage", &[fd]);
    assert!(e.contains("16 bytes"), "{e}");
    let e = vm.send(&[0u8; 40][..17], &[fd]);
    assert!(e.contains("not more than 16"), "{e}");
    let e = vm.give(0, size + 1, fd);
    assert!(e.contains("lie inside the file"), "{e}");
    let e = vm.give(size.next_multiple_of(4096), 1, fd);
    assert!(e.contains("lie inside the file"), "{e}");
    let e = vm.give(1, 10, fd);
    assert!(e.contains("multiple of 4096"), "{e}");
    let e = vm.give(0, 0, fd);
    assert!(e.contains("non-empty"), "{e}");
    let e = vm.give(0, layout::ARTIFACT_MAX_SIZE + 1, fd);
    assert!(e.contains("at most 1024 MiB"), "{e}");
    let (fifo_read, fifo_write) = pipe();
    let e = vm.give(0, 10, fifo_read.as_raw_fd());
    assert!(e.contains("FIFO, not a regular file"), "{e}");
    // The VMM closed its copies: with our read end gone too, a write has no reader.
    drop(fifo_read);
    let mut w = std::fs::File::from(fifo_write);
    let broken = w.write(b"x").unwrap_err();
    assert_eq!(broken.raw_os_error(), Some(libc::EPIPE));
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    let e = vm.give(0, 10, dir.as_raw_fd());
    assert!(e.contains("directory"), "{e}");
    assert!(vm.alive());

    // The real one.
    assert_eq!(vm.give(0, size, fd), "OK\n");
    let r = vm.call(&request_for(&hello));
    assert_eq!(r.outcome, Outcome::Exited(0), "{r:?}");
    assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");

    // A second artifact is refused; the VM keeps its first and serves.
    let e = vm.give(0, size, fd);
    assert!(e.contains("already has its artifact"), "{e}");
    let mut other = request_for(&hello);
    other.artifact.digest = [2; 32];
    let r = vm.call(&other);
    assert!(
        refusal_of(&r).contains("another module"),
        "{}",
        refusal_of(&r)
    );
    let r = vm.call(&request_for(&hello));
    assert_eq!(r.outcome, Outcome::Exited(0), "{r:?}");

    // All of it ran confined (seccomp would have killed the VMM with SIGSYS otherwise).
    let err = vm.stop();
    assert!(err.contains("seccomp on"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The caller may close the socket without sending anything: the VM goes on, and calls are
/// refused (no artifact), never left hanging.
#[test]
fn a_socket_closed_without_an_artifact_leaves_a_vm_that_refuses_calls() {
    if !kvm_available() {
        return;
    }
    let hello = hello_artifact("late-closed-artifact");
    let mut vm = WaitingVm::start("late-closed", &[]);
    vm.socket.shutdown(std::net::Shutdown::Both).unwrap();
    let r = vm.call(&request_for(&hello));
    assert!(
        refusal_of(&r).contains("no artifact mapped"),
        "{}",
        refusal_of(&r)
    );
    assert!(vm.alive());
    let err = vm.stop();
    assert!(err.contains("SIGTERM"), "{err}");
}

/// A flood of messages never keeps the VMM from its timeout.
#[test]
fn a_flood_of_bad_messages_does_not_stop_the_timeout() {
    if !kvm_available() {
        return;
    }
    let mut vm = WaitingVm::start("late-flood", &["--timeout", "1"]);
    vm.socket.set_nonblocking(true).unwrap();
    let started = Instant::now();
    while vm.alive() && started.elapsed() < Duration::from_secs(20) {
        // Never read: answers pile up until the VMM's sends would block (it drops them).
        let _ = vm.socket.write(&[0xa5; 4096]);
    }
    let (status, err) = vm.wait_end();
    assert_eq!(status, Some(code::TIMEOUT.into()), "{err}");
}

/// Before the artifact is mapped the whole window is in the page tables but has no memory
/// behind it: a guest read there ends the VM as an access no device serves.
#[test]
fn a_read_of_the_window_before_the_artifact_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    // With no artifact the guest's "past the artifact" is the window's first byte.
    let vm = WaitingVm::start(
        "late-read-before",
        &["--guest-test", "read-past-artifact", "--timeout", "30"],
    );
    let (status, err) = vm.wait_end();
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert!(
        err.contains(&format!("MMIO address {:#x}", layout::ARTIFACT_START)),
        "{err}"
    );
}

/// After the artifact is mapped, the window past its last 4 KiB page still has nothing behind
/// it (though the page tables map all of the window).
#[test]
fn a_read_past_a_late_artifact_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let path = scratch_dir("late-read-past-file").join("artifact");
    std::fs::write(&path, vec![7u8; 5000]).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let mut vm = WaitingVm::start(
        "late-read-past",
        &["--guest-test", "read-past-late-artifact", "--timeout", "30"],
    );
    assert_eq!(vm.give(0, 5000, file.as_raw_fd()), "OK\n");
    let (status, err) = vm.wait_end();
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert!(
        err.contains(&format!(
            "MMIO address {:#x}",
            layout::ARTIFACT_START + 8192
        )),
        "{err}"
    );
}

/// `--artifact-later` wants a Unix stream socket, and excludes `--artifact-from-stdin`.
#[test]
fn artifact_later_needs_a_socket_and_excludes_artifact_from_stdin() {
    let file = std::fs::File::open(guest_image()).unwrap();
    // Checked before /dev/kvm is touched: a missing KVM device would be another error.
    let out = Command::new(vmm_binary())
        .args(["--artifact-later", "--kvm-device", "/nonexistent/kvm"])
        .arg(guest_image())
        .stdin(file)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code::CONFIG.into()), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    let out = run_vmm([
        "--artifact-later".as_ref(),
        "--artifact-from-stdin".as_ref(),
        guest_image().as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

/// A pipe (read end, write end).
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nothing else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}
