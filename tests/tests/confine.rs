//! The VMM confines itself before the guest runs: a seccomp allow-list on every thread,
//! no_new_privs, not dumpable, Landlock and a user namespace where the host has them. These
//! tests look at a real confined VMM from outside and make it misbehave on purpose.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::*;

/// Runs the VMM with `args` and the built guest image.
fn run_guest<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    let image = guest_image();
    run_vmm(args.iter().map(AsRef::as_ref).chain([image.as_os_str()]))
}

/// The value of `field` in a `/proc/.../status` text.
fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

#[test]
fn a_forbidden_system_call_kills_the_confined_vmm_with_sigsys() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--confine-probe", "forbidden-syscall", "--timeout", "10"]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "the probe's openat must be fatal: {:?}, stderr {}",
        out.status,
        stderr(&out)
    );
}

#[test]
fn every_thread_of_a_running_vmm_has_seccomp_and_no_new_privs() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("confine-status");
    let uds = dir.join("vsock.sock");
    let mut child = Command::new(vmm_binary())
        .args([
            "--guest-test",
            "vsock-echo",
            "--timeout",
            "60",
            "--vsock-uds",
        ])
        .arg(&uds)
        .arg(guest_image())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bulwark-vmm");
    // Once the socket exists and the vCPU thread is up, both threads are confined (the guest
    // starts only after both filters are in).
    let tasks = format!("/proc/{}/task", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let statuses = loop {
        let statuses: Vec<String> = std::fs::read_dir(&tasks)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
                    .collect()
            })
            .unwrap_or_default();
        // The kernel may add a worker of its own to the process (kvm-nx-lpage-recovery).
        let statuses: Vec<String> = statuses
            .into_iter()
            .filter(|s| status_field(s, "Name").is_some_and(|n| n.starts_with("bulwark")))
            .collect();
        let confined = |s: &String| status_field(s, "Seccomp") == Some("2");
        let vcpu = statuses
            .iter()
            .any(|s| status_field(s, "Name") == Some("bulwark-vcpu0"));
        if uds.exists() && vcpu && statuses.iter().all(confined) {
            break statuses;
        }
        assert!(
            Instant::now() < deadline,
            "the VMM's threads never all showed Seccomp: 2: {statuses:#?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    for s in &statuses {
        assert_eq!(status_field(s, "NoNewPrivs"), Some("1"), "{s}");
        assert_eq!(status_field(s, "Seccomp"), Some("2"), "{s}");
        let filters: u32 = status_field(s, "Seccomp_filters")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(filters >= 1, "{s}");
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn landlock_refuses_file_access_even_without_seccomp() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--confine-probe",
        "open-file",
        "--report-confinement",
        "--timeout",
        "10",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    if err.contains("landlock unavailable") {
        eprintln!("*** this kernel has no Landlock; the probe proved nothing: {err}");
        return;
    }
    assert!(
        err.contains("probe: open refused: Permission denied"),
        "the VMM opened a file after confining itself: {err}"
    );
}

#[test]
fn the_report_names_each_layer_and_no_confine_turns_them_off() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--report-confinement", "--timeout", "10"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for layer in [
        "no_new_privs on",
        "dumpable off",
        "rlimits on",
        "user namespace",
        "landlock",
        "seccomp on",
    ] {
        assert!(err.contains(layer), "no `{layer}` in: {err}");
    }
    let out = run_guest(&["--report-confinement", "--no-confine", "--timeout", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("confinement: off"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_confined_vmm_leaves_its_socket_and_the_next_one_replaces_it() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("confine-stale-socket");
    let uds = dir.join("vsock.sock");
    let echo_vm = || {
        let args = [
            "--guest-test",
            "vsock-echo",
            "--timeout",
            "0.5",
            "--vsock-uds",
        ];
        let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        args.push(uds.as_os_str());
        run_guest(&args)
    };
    for round in 0..2 {
        let out = echo_vm();
        assert_eq!(
            out.status.code(),
            Some(124),
            "round {round}: a socket left by the last VMM must not stop the next: {}",
            stderr(&out)
        );
        assert!(
            uds.exists(),
            "round {round}: the socket is left for the caller"
        );
    }
    // Something that is not a stale socket is never replaced.
    std::fs::remove_file(&uds).ok();
    std::fs::write(&uds, b"precious").unwrap();
    let out = echo_vm();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_eq!(std::fs::read(&uds).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_compile_worker_is_confined_before_it_reads_the_module() {
    // No VM: the worker is a plain process. It confines itself, then blocks reading standard
    // input, which this test holds open.
    let mut child = Command::new(bulwark_binary())
        .args(["compile", "-", "-o", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bulwark compile");
    let status_path = format!("/proc/{}/status", child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = std::fs::read_to_string(&status_path).unwrap_or_default();
        if status_field(&status, "Seccomp") == Some("2") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never showed Seccomp: 2: {status}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(status_field(&status, "NoNewPrivs"), Some("1"), "{status}");
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
    // "Max processes   0   0   processes": soft and hard limits both zero.
    let both_zero = |name: &str| {
        limits.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.split_whitespace().take(2).all(|v| v == "0"))
        })
    };
    assert!(both_zero("Max processes"), "{limits}");
    assert!(both_zero("Max core file size"), "{limits}");
    assert!(both_zero("Max file size"), "{limits}");
    // It still compiles once the module arrives.
    use std::io::{Read, Write};
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(br#"(module (func (export "_start")))"#)
        .expect("write the module");
    drop(stdin);
    let mut artifact = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut artifact)
        .expect("read the artifact");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(&artifact[..4], b"\x7fELF");
}
