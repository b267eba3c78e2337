//! A real VM boots the real guest: ready line, Wasm self-test result, exit status 0.

use std::path::Path;
use std::process::Output;

use bulwark_tests::*;

/// Boots the guest with its console on stdout and `payload` loaded, if any.
fn boot(payload: Option<&Path>) -> Output {
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let mut args = vec![os("--console"), os("-"), os("--timeout"), os("30")];
    if let Some(p) = payload {
        args.extend([os("--payload"), p.as_os_str()]);
    }
    let guest = guest_image();
    args.push(guest.as_os_str());
    run_vmm(args)
}

#[test]
fn guest_boots_and_runs_the_wasm_self_test() {
    if !kvm_available() {
        return;
    }
    let out = boot(Some(&selftest_module()));
    let console = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "console:\n{console}\nstderr:\n{}",
        stderr(&out)
    );
    let ready = console
        .lines()
        .position(|l| l.starts_with("bulwark-guest ready in "))
        .unwrap_or_else(|| panic!("no ready line in:\n{console}"));
    let expected = format!("wasm self-test: run() = {} ", selftest_expected());
    let result = console
        .lines()
        .position(|l| l.starts_with(&expected))
        .unwrap_or_else(|| panic!("no `{expected}` line in:\n{console}"));
    assert!(ready < result, "the ready line comes first:\n{console}");
}

#[test]
fn guest_without_a_payload_skips_the_self_test_and_exits_cleanly() {
    if !kvm_available() {
        return;
    }
    let out = boot(None);
    let console = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{console}{}", stderr(&out));
    assert!(
        console.contains("wasm self-test: skipped (no payload)"),
        "{console}"
    );
}

#[test]
fn a_payload_that_is_not_a_module_fails_the_self_test() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("bad-payload");
    let payload = dir.join("junk.cwasm");
    std::fs::write(&payload, b"this is not a precompiled module").unwrap();
    let out = boot(Some(&payload));
    let console = stdout(&out);
    let status = bulwark_abi::ports::exit_status::SELF_TEST_FAILED;
    assert_eq!(
        out.status.code(),
        Some(i32::try_from(status).unwrap()),
        "{console}"
    );
    assert!(console.contains("wasm self-test failed"), "{console}");
    assert!(stderr(&out).contains(&format!("guest exited with status {status}")));
}
