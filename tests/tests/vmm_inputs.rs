//! Bad inputs to `bulwark-vmm`: each gets a clear one-line error and a non-zero exit, no panic.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use bulwark_tests::*;
use bulwark_vmm::outcome::code;

fn expect_error(args: &[&std::ffi::OsStr], exit: u8, needle: &str) -> String {
    let out = run_vmm(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(exit.into()), "{err}");
    assert!(err.contains(needle), "`{needle}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Offset of the first PT_LOAD program header in an ELF64 image.
fn first_load_header(elf: &[u8]) -> usize {
    let word = |at: usize, n: usize| {
        elf[at..at + n]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    let phoff = usize::try_from(word(32, 8)).unwrap();
    let phnum = usize::try_from(word(56, 2)).unwrap();
    (0..phnum)
        .map(|i| phoff + i * 56)
        .find(|&ph| word(ph, 4) == 1)
        .expect("the guest image has a PT_LOAD segment")
}

#[test]
fn a_missing_guest_file_is_an_image_error() {
    let err = expect_error(
        &[os("/nonexistent/guest.elf")],
        code::IMAGE,
        "cannot read guest image",
    );
    assert!(err.contains("/nonexistent/guest.elf"), "{err}");
}

#[test]
fn a_file_that_is_not_elf_is_refused() {
    let dir = scratch_dir("not-elf");
    let path = dir.join("guest.txt");
    std::fs::write(&path, "#!/bin/sh\necho not a guest\n").unwrap();
    expect_error(&[path.as_os_str()], code::IMAGE, "is not an ELF file");
}

#[test]
fn an_elf_for_another_machine_is_refused() {
    let dir = scratch_dir("arm-elf");
    let mut elf = std::fs::read(guest_image()).unwrap();
    elf[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let path = dir.join("guest-aarch64.elf");
    std::fs::write(&path, elf).unwrap();
    expect_error(
        &[path.as_os_str()],
        code::IMAGE,
        "machine is 183, not x86_64",
    );
}

#[test]
fn an_elf_with_a_segment_outside_guest_ram_is_refused() {
    let dir = scratch_dir("far-elf");
    let mut elf = std::fs::read(guest_image()).unwrap();
    let ph = first_load_header(&elf);
    let far = 1u64 << 32;
    elf[ph + 16..ph + 24].copy_from_slice(&far.to_le_bytes()); // p_vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&far.to_le_bytes()); // p_paddr
    let path = dir.join("guest-far.elf");
    std::fs::write(&path, elf).unwrap();
    expect_error(
        &[path.as_os_str()],
        code::IMAGE,
        "lies outside the guest image region",
    );
}

#[test]
fn too_little_ram_for_the_image_is_refused_with_the_size_needed() {
    let err = expect_error(
        &[os("--mem-mib"), os("32"), guest_image().as_os_str()],
        code::CONFIG,
        "--mem-mib 32 is too small",
    );
    assert!(err.contains("need at least"), "{err}");
    expect_error(
        &[os("--mem-mib"), os("301"), guest_image().as_os_str()],
        code::CONFIG,
        "multiple of 2 MiB",
    );
}

#[test]
fn a_missing_payload_is_a_config_error() {
    expect_error(
        &[
            os("--payload"),
            os("/nonexistent/p.cwasm"),
            guest_image().as_os_str(),
        ],
        code::CONFIG,
        "cannot read payload /nonexistent/p.cwasm",
    );
}

#[test]
fn unusable_options_are_config_errors_before_kvm_is_touched() {
    // --kvm-device points nowhere: reaching KVM would be a different error and exit code.
    let image = guest_image();
    for (args, needle) in [
        (vec!["--mem-mib", "3"], "guest RAM of 3 MiB is out of range"),
        (
            vec!["--mem-mib", "16386"],
            "guest RAM of 16386 MiB is out of range",
        ),
        (
            vec!["--mem-mib", "4097"],
            "guest RAM of 4097 MiB is out of range",
        ),
        (vec!["--cid", "2"], "--cid 2 is reserved"),
    ] {
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| os(a)).collect();
        argv.extend([os("--kvm-device"), os("/nonexistent/kvm")]);
        argv.push(image.as_os_str());
        expect_error(&argv, code::CONFIG, needle);
    }
}

#[test]
fn input_files_that_are_not_regular_are_refused_at_once() {
    let dir = scratch_dir("vmm-inputs-fifo");
    let fifo = dir.join("payload");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A FIFO with no writer as the payload or the image: a blocking open would hang here.
    expect_error(
        &[os("--payload"), fifo.as_os_str(), guest_image().as_os_str()],
        code::CONFIG,
        "it is a FIFO, not a regular file",
    );
    expect_error(
        &[fifo.as_os_str()],
        code::IMAGE,
        "it is a FIFO, not a regular file",
    );
    expect_error(
        &[os("/dev/zero")],
        code::IMAGE,
        "it is a character device, not a regular file",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_kvm_device_is_a_kvm_error() {
    expect_error(
        &[
            os("--kvm-device"),
            os("/nonexistent/kvm"),
            guest_image().as_os_str(),
        ],
        code::KVM,
        "cannot open /nonexistent/kvm: No such file or directory",
    );
}

#[test]
fn no_access_to_dev_kvm_is_a_kvm_error() {
    // As root, drop to `nobody` (which cannot open the root-only /dev/kvm); as another user,
    // /dev/kvm's own permissions decide, which this test cannot change.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!(
            "*** SKIPPED: needs root and setpriv to run the VMM without access to /dev/kvm ***"
        );
        return;
    }
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmm_binary())
        .arg(guest_image())
        .output()
        .unwrap();
    let err = stderr(&out);
    if err.contains("Permission denied (os error 13)") && err.contains("guest image") {
        eprintln!("*** SKIPPED: `nobody` cannot read the guest image here ***");
        return;
    }
    assert_eq!(out.status.code(), Some(code::KVM.into()), "{err}");
    assert!(
        err.contains("cannot open /dev/kvm: Permission denied"),
        "{err}"
    );
    assert!(err.contains("kvm` group"), "{err}");
}

#[test]
fn a_parent_pid_that_is_not_the_parent_is_refused() {
    // The VMM's parent is this test, never PID 1: a VMM told to die with a process that is not
    // its parent must not run unwatched.
    expect_error(
        &[os("--parent-pid"), os("1"), guest_image().as_os_str()],
        code::CONFIG,
        "--parent-pid 1: the parent is gone",
    );
}

/// The artifact comes in as standard input: anything but a regular file that holds the whole
/// range is refused as a configuration error, before the guest runs.
#[test]
fn an_unusable_artifact_descriptor_is_a_config_error() {
    let dir = scratch_dir("vmm-artifact-inputs");
    let short = dir.join("short");
    std::fs::write(&short, [1u8; 100]).unwrap();
    let cases: [(std::fs::File, &[&str], &str); 4] = [
        (
            std::fs::File::open(&dir).unwrap(),
            &[],
            "is a directory, not a regular file",
        ),
        (
            std::fs::File::open("/dev/null").unwrap(),
            &[],
            "is a character device, not a regular file",
        ),
        (
            std::fs::File::open(&short).unwrap(),
            &["--artifact-len", "101"],
            "artifact range 0+101 is unusable",
        ),
        (
            std::fs::File::open(&short).unwrap(),
            &["--artifact-offset", "10"],
            "artifact range 10+90 is unusable",
        ),
    ];
    for (stdin, extra, needle) in cases {
        let out = std::process::Command::new(vmm_binary())
            .arg("--artifact-from-stdin")
            .args(extra)
            .arg(guest_image())
            .stdin(stdin)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(code::CONFIG.into()),
            "{needle}: {err}"
        );
        assert!(err.contains(needle), "{needle}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
