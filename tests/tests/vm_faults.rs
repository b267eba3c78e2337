//! Guest faults on a real VM: each is reported in one line with its cause, and the VMM exits
//! non-zero without panicking.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bulwark_abi::layout;
use bulwark_tests::*;
use bulwark_vmm::outcome::code;

fn run_test_mode(mode: &str, timeout: &str) -> (Option<i32>, String) {
    let out = run_vmm([
        "--guest-test".as_ref(),
        mode.as_ref(),
        "--timeout".as_ref(),
        timeout.as_ref(),
        guest_image().as_os_str(),
    ]);
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line:\n{err}");
    (out.status.code(), err)
}

/// The hexadecimal number after `marker` in `line`.
fn hex_after(line: &str, marker: &str) -> u64 {
    let at = line
        .find(marker)
        .unwrap_or_else(|| panic!("no `{marker}` in {line}"));
    let digits: String = line[at + marker.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u64::from_str_radix(&digits, 16).unwrap_or_else(|e| panic!("bad hex in {line}: {e}"))
}

#[test]
fn ud2_is_reported_as_vector_6_with_its_rip() {
    if !kvm_available() {
        return;
    }
    let (status, err) = run_test_mode("ud2", "30");
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert!(
        err.contains("CPU exception 6 (#UD invalid opcode)"),
        "{err}"
    );
    let rip = hex_after(&err, "at RIP 0x");
    assert!(
        (layout::IMAGE_START..layout::IMAGE_END).contains(&rip),
        "RIP {rip:#x} is in the guest image: {err}"
    );
}

#[test]
fn an_unclaimed_mmio_access_is_reported_with_its_address() {
    if !kvm_available() {
        return;
    }
    let (status, err) = run_test_mode("unclaimed-mmio", "30");
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert_eq!(
        hex_after(&err, "MMIO address 0x"),
        layout::MMIO_UNCLAIMED,
        "{err}"
    );
    assert!(err.contains("no device here"), "{err}");
}

#[test]
fn a_spinning_guest_is_stopped_by_the_timeout() {
    if !kvm_available() {
        return;
    }
    let started = std::time::Instant::now();
    let (status, err) = run_test_mode("spin", "0.5");
    assert_eq!(status, Some(code::TIMEOUT.into()), "{err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("after 0.500 s"), "{err}");
    // Functional, not a speed goal: the VMM did wait for the timeout before stopping the guest.
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
}

/// Asserts the VM ended with a page fault for a write from user mode to the present page at
/// `addr` (error code 0x7: present, write, user): the page is there but not the guest's to write.
fn assert_user_write_fault(status: Option<i32>, err: &str, addr: u64) {
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert!(err.contains("CPU exception 14"), "{err}");
    assert_eq!(hex_after(err, "error code 0x"), 0x7, "{err}");
    assert_eq!(hex_after(err, "faulting address 0x"), addr, "{err}");
}

#[test]
fn cpl3_code_cannot_write_the_exception_stubs() {
    if !kvm_available() {
        return;
    }
    let (status, err) = run_test_mode("write-stubs", "30");
    assert_user_write_fault(status, &err, layout::EXCEPTION_STUBS);
}

#[test]
fn cpl3_code_cannot_write_the_window_page_tables() {
    if !kvm_available() {
        return;
    }
    let (status, err) = run_test_mode("write-window-tables", "30");
    // Only the VMM writes the windows' tables.
    assert_user_write_fault(status, &err, layout::WINDOW_TABLES);
}

#[test]
fn a_fault_past_a_mapped_window_is_delivered_to_the_guest() {
    if !kvm_available() {
        return;
    }
    // The guest maps 64 KiB of window 1 through the VMM, writes the last word through the
    // window and reads it back through its own RAM, then reads the byte past the window's
    // mapped part: the page fault comes back to its CPL3 trap entry with that address, and the
    // guest exits with 0 only if it is exactly that address.
    let out = run_vmm([
        "--guest-test",
        "window-trap",
        "--console",
        "-",
        "--timeout",
        "30",
        guest_image().to_str().unwrap(),
    ]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{console}{}", stderr(&out));
    assert!(
        console.contains("window write seen through the identity map: 0x5eed"),
        "{console}"
    );
    let expected = layout::window_start(1) + 0x1_0000;
    assert!(
        console.contains(&format!("page fault true, address {expected:#x}")),
        "{console}"
    );
}

/// Runs `mode` with `artifact` mapped into the artifact window.
fn run_with_artifact(mode: &str, artifact: &std::path::Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(vmm_binary())
        .args([
            "--guest-test",
            mode,
            "--timeout",
            "30",
            "--artifact-from-stdin",
        ])
        .arg(guest_image())
        .stdin(std::fs::File::open(artifact).unwrap())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line:\n{err}");
    (out.status.code(), err)
}

/// A guest that writes to its artifact (as one that escaped Wasm could try) faults, and the
/// file behind the window is unchanged.
#[test]
fn the_artifact_window_is_read_only_for_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("fault-write-artifact");
    let artifact = dir.join("artifact");
    let bytes: Vec<u8> = (0..=250u8).cycle().take(10_000).collect();
    std::fs::write(&artifact, &bytes).unwrap();
    let (status, err) = run_with_artifact("write-artifact", &artifact);
    assert_user_write_fault(status, &err, layout::ARTIFACT_START);
    assert_eq!(std::fs::read(&artifact).unwrap(), bytes);
}

/// Past the artifact's last 4 KiB page there is no memory, though its 2 MiB guest page is
/// mapped: a read there ends the VM as an access no device serves, never reaches the file.
#[test]
fn a_read_past_the_artifact_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("fault-read-past-artifact");
    let artifact = dir.join("artifact");
    std::fs::write(&artifact, vec![7u8; 5000]).unwrap();
    let (status, err) = run_with_artifact("read-past-artifact", &artifact);
    assert_eq!(status, Some(code::GUEST_CRASH.into()), "{err}");
    assert_eq!(
        hex_after(&err, "MMIO address 0x"),
        layout::ARTIFACT_START + 8192,
        "{err}"
    );
}

/// Runs the `ud2` test mode with a CPU probe; returns the VMM's report and whether the VMM
/// turned the protection on (its `--report-confinement` line).
fn probe(which: &str) -> (String, bool) {
    let out = run_vmm([
        "--cpu-probe".as_ref(),
        which.as_ref(),
        "--report-confinement".as_ref(),
        "--guest-test".as_ref(),
        "ud2".as_ref(),
        "--timeout".as_ref(),
        "30".as_ref(),
        guest_image().as_os_str(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code::GUEST_CRASH.into()), "{err}");
    let on = err.contains(&format!("{which} on"));
    (err, on)
}

#[test]
fn smep_stops_cpl0_running_code_from_a_user_page() {
    if !kvm_available() {
        return;
    }
    let (err, on) = probe("smep");
    if !on {
        eprintln!("*** this host's CPU has no SMEP; the probe proved nothing: {err}");
        return;
    }
    // The #UD gate leads into a user page: the fetch itself faults (present, instruction fetch).
    assert!(err.contains("CPU exception 14"), "{err}");
    assert_eq!(hex_after(&err, "error code 0x"), 0x11, "{err}");
}

#[test]
fn smap_stops_cpl0_writing_a_user_page() {
    if !kvm_available() {
        return;
    }
    let (err, on) = probe("smap");
    if !on {
        eprintln!("*** this host's CPU has no SMAP; the probe proved nothing: {err}");
        return;
    }
    // The exception stack is in a user page: pushing the #UD frame faults, twice: #DF.
    assert!(err.contains("CPU exception 8"), "{err}");
}

/// SIGTERM stops a running guest as a timeout does, with its own report and exit code (143),
/// and `--timings` still prints the figures, KVM's own counts among them.
#[test]
fn sigterm_stops_the_guest_with_a_report() {
    if !kvm_available() {
        return;
    }
    let child = std::process::Command::new(vmm_binary())
        .args(["--timings", "--guest-test", "spin", "--timeout", "30"])
        .arg(guest_image())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let the guest start spinning (a SIGTERM before the VM runs just ends the process).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code::TERMINATED.into()), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(err.contains("exits counted by KVM"), "{err}");
}
