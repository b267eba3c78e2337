//! Reusable VMs (`bulwark-vmm --reusable`): a snapshot of the VM with its agent listening, and
//! a reset after each call that puts back every page the call wrote, the vCPU and the devices.
//! With `--verify-reset` the VMM compares all of RAM with a full copy taken at the snapshot
//! after every reset, so a page the reset missed fails the reset itself.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use bulwark_proto::call::{Outcome, Request, Response};
use bulwark_tests::waiting::*;
use bulwark_tests::*;

/// Reads its standard input (n bytes), grows linear memory by n pages, exits 7 if any byte of
/// the new pages is not zero, fills them, and writes its input back. What a call leaves in
/// memory must never reach the next. With no input it reads past its one page, which must trap.
const GROW_AND_ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i32) (local $p i32) (local $end i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 4096))
    (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    ;; No input: read 10 Wasm pages past a memory of one page, which must trap.
    (if (i32.eqz (local.get $n)) (then (drop (i32.load (i32.const 655360)))))
    (local.set $p (i32.mul (memory.grow (local.get $n)) (i32.const 65536)))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (block $done
      (loop $scan
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (if (i64.ne (i64.load (local.get $p)) (i64.const 0)) (then (call $exit (i32.const 7))))
        (i64.store (local.get $p) (i64.const 0x5a5a5a5a5a5a5a5a))
        (local.set $p (i32.add (local.get $p) (i32.const 8)))
        (br $scan)))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// `GROW_AND_ECHO` compiled into the scratch directory of `test`.
fn grow_artifact(test: &str) -> PathBuf {
    let wat = scratch_dir(&format!("{test}-source")).join("grow.wat");
    std::fs::write(&wat, GROW_AND_ECHO).unwrap();
    compile_module(&format!("{test}-artifact"), &wat)
}

/// A reusable VM of 128 MiB (a small full copy for `--verify-reset`) with `artifact` mapped.
fn reusable_vm(test: &str, artifact: &Path, extra: &[&str]) -> WaitingVm {
    let mut args = vec!["--reusable", "--mem-mib", "128"];
    args.extend_from_slice(extra);
    let mut vm = WaitingVm::start(test, &args);
    let file = std::fs::File::open(artifact).unwrap();
    let size = file.metadata().unwrap().len();
    assert_eq!(vm.give(0, size, file.as_raw_fd()), "OK\n");
    vm
}

/// A command message: the 8-byte name and 8 zero bytes.
fn command(name: &[u8; 8]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(name);
    m
}

const SNAPSHOT: &[u8; 8] = b"SNAPSHOT";
const RESET: &[u8; 8] = b"RESET\0\0\0";

/// A call of `artifact` with `stdin`.
fn request(artifact: &Path, stdin: &[u8]) -> Request {
    let mut r = agent_request(artifact, 1, vec!["grow".into()]);
    r.stdin = stdin.to_vec();
    r
}

fn exit_and_stdout(r: &Response) -> (i32, &[u8]) {
    match &r.outcome {
        Outcome::Exited(code) => (*code, &r.stdout),
        other => panic!("expected an exit, got {other:?} (stderr {:?})", r.stderr),
    }
}

/// The figures of an `OK reset <written> <copied> <zeroed> <micros>` answer.
fn reset_figures(answer: &str) -> [u64; 4] {
    let rest = answer
        .strip_prefix("OK reset ")
        .and_then(|r| r.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not a reset answer: {answer:?}"));
    let figures: Vec<u64> = rest.split(' ').map(|f| f.parse().unwrap()).collect();
    figures.try_into().unwrap()
}

/// Many calls on one VM, reset between each and verified against the full copy: every call
/// sees fresh memory (the tool checks the pages it grows are zero) and answers for its own
/// input; a reset restores exactly what was written.
#[test]
fn a_reset_vm_serves_call_after_call_with_ram_as_at_the_snapshot() {
    if !kvm_available() {
        return;
    }
    let grow = grow_artifact("reset-serve");
    let mut vm = reusable_vm("reset-serve", &grow, &["--verify-reset"]);
    let snap = vm.send(&command(SNAPSHOT), &[]);
    let pages: u64 = snap
        .strip_prefix("OK snapshot ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{snap:?}"));
    assert!(pages > 0, "the booted guest has pages: {snap}");

    for round in 1..=12u8 {
        // Different sizes each round: windows and heap differ from call to call.
        let input = vec![b'a' + round; usize::from(round) * 3];
        let r = vm.call(&request(&grow, &input));
        assert_eq!(
            exit_and_stdout(&r),
            (0, input.as_slice()),
            "round {round}: stderr {:?}",
            String::from_utf8_lossy(&r.stderr)
        );
        let answer = vm.send(&command(RESET), &[]);
        let [written, copied, zeroed, _micros] = reset_figures(&answer);
        assert!(written > 0, "round {round}: a call writes pages: {answer}");
        assert_eq!(written, copied + zeroed, "{answer}");
        assert!(
            zeroed > 0,
            "round {round}: the call grew memory into pages the snapshot did not hold: {answer}"
        );
    }
    // The last call had 36 pages mapped in its window; after the reset, a memory of one page
    // must fault past its end again (nothing KVM built from the old window entries survives).
    let r = vm.call(&request(&grow, b""));
    assert!(
        matches!(&r.outcome, Outcome::Trap(m) if m.contains("out of bounds")),
        "{:?}",
        r.outcome
    );
    assert!(vm.alive());
}

/// Commands out of place are refused and change nothing; a VM that is not reusable refuses
/// them all.
#[test]
fn commands_out_of_place_are_refused() {
    if !kvm_available() {
        return;
    }
    let hello = hello_artifact("reset-refusals-artifact");

    let mut plain = WaitingVm::start("reset-refusals-plain", &[]);
    let file = std::fs::File::open(&hello).unwrap();
    let size = file.metadata().unwrap().len();
    assert_eq!(plain.give(0, size, file.as_raw_fd()), "OK\n");
    let e = plain.send(&command(SNAPSHOT), &[]);
    assert!(e.starts_with("ERR ") && e.contains("not reusable"), "{e}");

    let mut vm = WaitingVm::start("reset-refusals", &["--reusable", "--mem-mib", "128"]);
    let e = vm.send(&command(SNAPSHOT), &[]);
    assert!(
        e.starts_with("ERR ") && e.contains("artifact comes first"),
        "{e}"
    );
    assert_eq!(vm.give(0, size, file.as_raw_fd()), "OK\n");
    let e = vm.send(&command(RESET), &[]);
    assert!(e.starts_with("ERR ") && e.contains("no snapshot"), "{e}");
    // A command with something after its name is no command: refused as an artifact message.
    let mut odd = command(SNAPSHOT);
    odd[15] = 1;
    let e = vm.send(&odd, &[]);
    assert!(e.starts_with("ERR "), "{e}");
    assert!(vm.send(&command(SNAPSHOT), &[]).starts_with("OK snapshot "));
    let e = vm.send(&command(SNAPSHOT), &[]);
    assert!(e.starts_with("ERR ") && e.contains("snapshots once"), "{e}");
    let r = vm.call(&agent_request(&hello, 1, vec!["hello".into()]));
    assert!(matches!(r.outcome, Outcome::Exited(0)), "{:?}", r.outcome);
    assert!(vm.send(&command(RESET), &[]).starts_with("OK reset "));
    let r = vm.call(&agent_request(&hello, 1, vec!["hello".into()]));
    assert!(matches!(r.outcome, Outcome::Exited(0)), "{:?}", r.outcome);
}

/// A VM reset while its tool still spins (the host gave up on the call) comes back as at the
/// snapshot all the same: the reset replaces everything, wherever the guest was.
#[test]
fn a_vm_reset_in_the_middle_of_a_spinning_tool_serves_again() {
    if !kvm_available() {
        return;
    }
    let test = "reset-spin";
    let spin_wat = scratch_dir("reset-spin-source").join("spin.wat");
    std::fs::write(&spin_wat, wat::SPIN).unwrap();
    let spin = compile_module("reset-spin-artifact", &spin_wat);
    let mut vm = reusable_vm(test, &spin, &["--verify-reset"]);
    assert!(vm.send(&command(SNAPSHOT), &[]).starts_with("OK snapshot "));
    // Send the call and leave without its answer: the tool spins on.
    {
        use std::io::Write;
        let mut s = vm.connect();
        s.write_all(&bulwark_proto::frame::encode(&request(&spin, b"")).unwrap())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let answer = vm.send(&command(RESET), &[]);
    reset_figures(&answer);
    // Spinning again, from the snapshot: the agent took the call (it answers nothing while the
    // tool runs), which proves it listened.
    {
        use std::io::Write;
        let mut s = vm.connect();
        s.write_all(&bulwark_proto::frame::encode(&request(&spin, b"")).unwrap())
            .unwrap();
    }
    reset_figures(&vm.send(&command(RESET), &[]));
    assert!(vm.alive());
}
