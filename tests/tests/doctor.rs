//! `bulwark doctor` on this host.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use bulwark_tests::*;

fn doctor(guest: &std::path::Path) -> std::process::Output {
    Command::new(workspace_binary("bulwark", "BULWARK_CLI"))
        .arg("doctor")
        .env("BULWARK_GUEST", guest)
        .env("BULWARK_CACHE_DIR", scratch_dir("doctor-cache"))
        .output()
        .expect("run bulwark doctor")
}

#[test]
fn doctor_passes_on_a_working_host_and_names_what_is_broken() {
    if !kvm_available() {
        return;
    }
    let out = doctor(&guest_image());
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for check in [
        "kvm device",
        "kvm ",
        "vmm",
        "guest image",
        "compile cache",
        "boot",
        "vmm no_new_privs",
        "vmm seccomp",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}: {text}"
        );
    }
    for layer in ["user namespace", "landlock", "smep", "smap", "rlimits"] {
        assert!(
            text.lines().any(|l| l.contains(&format!("vmm {layer}"))),
            "no line for {layer}: {text}"
        );
    }
    let out = doctor(std::path::Path::new("/nonexistent/guest.elf"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains("guest image")
            && l.contains("/nonexistent/guest.elf")),
        "{text}"
    );
}
