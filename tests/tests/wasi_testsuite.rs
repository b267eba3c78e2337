//! The public WASI test suite (WebAssembly/wasi-testsuite, its prebuilt `wasm32-wasip1` tests) in
//! the VM and with `--isolation wasm`: every test must pass both ways.
//!
//! The suite is not in this repository (see README, "The WASI test suite"): point
//! `BULWARK_WASI_TESTSUITE` at a checkout of its `prod/testsuite-base` branch (the folder that
//! holds `tests/`), or put one at `build/wasi-testsuite`. Without it these tests say loudly that
//! they did not run. With it, `tests/wasi-testsuite.sha256` pins the suite: every file it lists
//! must be there with those bytes, and every test in the suite must be listed, so the count of
//! tests run cannot drift down, nor the tests change, without this file changing.
//!
//! Each test `NAME.wasm` may have a `NAME.json` beside it with its arguments, environment, the
//! directory to share as the tool's `/`, the exit code expected (0 if none) and the exact stdout
//! expected, if any: the upstream runner's rules.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bulwark_tests::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The list of the suite's files and their digests.
const PINNED: &str = include_str!("../wasi-testsuite.sha256");
/// How many tests the pinned suite has.
const TESTS: usize = 72;

/// The suite's folder, or `None` (with a loud message) when it is not on this machine.
fn suite() -> Option<PathBuf> {
    let dir = std::env::var_os("BULWARK_WASI_TESTSUITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| build_dir().join("wasi-testsuite"));
    if dir.join("tests").is_dir() {
        return Some(dir);
    }
    eprintln!(
        "\n*** SKIPPED: the WASI test suite is not at {} (set BULWARK_WASI_TESTSUITE to a \
         checkout of WebAssembly/wasi-testsuite, branch prod/testsuite-base) ***\n",
        dir.display()
    );
    None
}

/// Checks the suite against the pinned list and returns its tests (paths of the `.wasm` files).
fn pinned_tests(suite: &Path) -> Vec<PathBuf> {
    let mut listed = BTreeSet::new();
    let mut tests = Vec::new();
    for line in PINNED
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (digest, path) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("tests/wasi-testsuite.sha256: bad line `{line}`"));
        let file = suite.join(path);
        let bytes = std::fs::read(&file).unwrap_or_else(|e| {
            panic!(
                "the suite lacks {} ({e}): it must be the pinned one",
                file.display()
            )
        });
        let actual = hex(&Sha256::digest(&bytes));
        assert_eq!(
            actual,
            digest,
            "{} differs from the pinned suite",
            file.display()
        );
        listed.insert(file.clone());
        if path.ends_with(".wasm") {
            tests.push(file);
        }
    }
    // Every test the suite has must be listed: a new or renamed test changes the pin.
    for lang in std::fs::read_dir(suite.join("tests")).expect("the suite's tests/ folder") {
        let dir = lang
            .expect("a folder of the suite")
            .path()
            .join("testsuite/wasm32-wasip1");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a file of the suite").path();
            if path.extension().is_some_and(|e| e == "wasm") {
                assert!(
                    listed.contains(&path),
                    "{} is not in tests/wasi-testsuite.sha256",
                    path.display()
                );
            }
        }
    }
    assert_eq!(tests.len(), TESTS, "the pinned suite has {TESTS} tests");
    tests
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies the directory `from` to `to` (files and folders; the suite has nothing else).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("make a folder of the copy");
    for entry in std::fs::read_dir(from).expect("read a folder of the suite") {
        let entry = entry.expect("a folder entry");
        let kind = entry.file_type().expect("an entry's type");
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file of the suite");
        }
    }
}

/// Runs one test of the suite with `isolation`; `Err` says how it failed.
fn run_test(isolation: &str, wasm: &Path, scratch: &Path) -> Result<(), String> {
    let spec_path = wasm.with_extension("json");
    let spec: Value = match std::fs::read(&spec_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("bad spec: {e}"))?,
        Err(_) => Value::Object(Default::default()),
    };
    let mut args: Vec<String> = vec![
        "--isolation".into(),
        isolation.into(),
        "--timeout".into(),
        "120s".into(),
    ];
    if let Some(env) = spec["env"].as_object() {
        for (name, value) in env {
            let value = value.as_str().ok_or("an env value is not a string")?;
            args.extend(["--env".into(), format!("{name}={value}")]);
        }
    }
    if let Some(root) = spec["root"].as_str() {
        let copy = scratch.join("root");
        let _ = std::fs::remove_dir_all(&copy);
        copy_tree(&wasm.parent().ok_or("no folder")?.join(root), &copy);
        args.extend(["--dir".into(), format!("{}::/", copy.display())]);
    }
    args.push(wasm.display().to_string());
    if let Some(list) = spec["args"].as_array() {
        for arg in list {
            args.push(arg.as_str().ok_or("an argument is not a string")?.into());
        }
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = bulwark_run(&argv, b"");
    let want_code = spec["exit_code"].as_i64().unwrap_or(0);
    let code = out.status.code().map(i64::from);
    let mut wrong = Vec::new();
    if code != Some(want_code) {
        wrong.push(format!("exit code {code:?}, want {want_code}"));
    }
    if let Some(want) = spec["stdout"].as_str()
        && out.stdout != want.as_bytes()
    {
        wrong.push(format!("stdout {:?}, want {want:?}", stdout(&out)));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    let err = stderr(&out);
    // The panic message, not the backtrace, says why.
    let head: String = err.lines().take(12).collect::<Vec<_>>().join("\n    ");
    Err(format!("{}\n    {head}", wrong.join("; ")))
}

/// Runs the whole suite with `isolation` and fails with every failing test's reason.
fn whole_suite(isolation: &str) {
    let Some(suite) = suite() else {
        return;
    };
    let tests = pinned_tests(&suite);
    let scratch = scratch_dir(&format!("wasi-testsuite-{isolation}"));
    let mut failed = Vec::new();
    for wasm in &tests {
        let name = wasm.file_stem().map(|s| s.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        if let Err(why) = run_test(isolation, wasm, &scratch) {
            failed.push(format!("{name}: {why}"));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "WASI test suite, --isolation {isolation}: {} of {} passed",
        tests.len() - failed.len(),
        tests.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} WASI suite tests failed with --isolation {isolation}:\n{}",
        failed.len(),
        tests.len(),
        failed.join("\n")
    );
}

#[test]
fn the_wasi_test_suite_passes_in_the_vm() {
    if !kvm_available() {
        return;
    }
    guest_image();
    whole_suite("vm");
}

#[test]
fn the_wasi_test_suite_passes_with_isolation_wasm() {
    whole_suite("wasm");
}
