//! Signed modules end to end: `bulwark keygen`, `bulwark sign`, `bulwark verify`, and
//! `bulwark run --trust/--policy` refusing what it must before anything is compiled.
//!
//! Refusals need no KVM: nothing is compiled and no VM starts, which the tests check through an
//! empty compile cache. Passing modules run with `--isolation wasm` (no KVM needed) or, in
//! `a_correctly_signed_module_runs_in_a_vm`, in a real micro-VM.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bulwark_tests::*;

/// `bulwark run`'s exit code for a module refused by --trust/--policy.
const REFUSED: i32 = 123;
/// Its exit code when Bulwark itself fails (here: unreadable keys or policy).
const BULWARK_FAILED: i32 = 125;
/// What the test module prints.
const HELLO: &str = "hello from a Bulwark micro-VM\n";

/// `examples/hello.wat` as a binary module (text cannot carry a signature), built here so these
/// tests need nothing from `build/`.
fn hello_wasm() -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = u8::try_from(n & 0x7f).unwrap();
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn bytes(b: &[u8], out: &mut Vec<u8>) {
        leb(b.len(), out);
        out.extend_from_slice(b);
    }
    fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        bytes(payload, out);
    }
    let msg = HELLO.as_bytes();
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // Types: (i32 i32 i32 i32) -> i32 for fd_write, () -> () for _start.
    section(
        1,
        &[2, 0x60, 4, 0x7f, 0x7f, 0x7f, 0x7f, 1, 0x7f, 0x60, 0, 0],
        &mut m,
    );
    let mut imports = vec![1];
    bytes(b"wasi_snapshot_preview1", &mut imports);
    bytes(b"fd_write", &mut imports);
    imports.extend_from_slice(&[0, 0]);
    section(2, &imports, &mut m);
    section(3, &[1, 1], &mut m);
    section(5, &[1, 0, 1], &mut m);
    let mut exports = vec![2];
    bytes(b"memory", &mut exports);
    exports.extend_from_slice(&[2, 0]);
    bytes(b"_start", &mut exports);
    exports.extend_from_slice(&[0, 1]);
    section(7, &exports, &mut m);
    // iovec at 0 = { 16, len }; fd_write(1, 0, 1, 8); drop; end.
    let mut body = vec![0, 0x41, 0, 0x41, 16, 0x36, 2, 0, 0x41, 4, 0x41];
    leb(msg.len(), &mut body);
    body.extend_from_slice(&[
        0x36, 2, 0, 0x41, 1, 0x41, 0, 0x41, 1, 0x41, 8, 0x10, 0, 0x1a, 0x0b,
    ]);
    let mut code = vec![1];
    bytes(&body, &mut code);
    section(10, &code, &mut m);
    let mut data = vec![1, 0, 0x41, 16, 0x0b];
    bytes(msg, &mut data);
    section(11, &data, &mut m);
    m
}

/// Runs `bulwark ARGS` with no standard input.
fn bulwark(args: &[&str]) -> Output {
    Command::new(bulwark_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"))
}

/// Runs `bulwark run ARGS` that must be refused: checks the exit code and that nothing was
/// compiled (its own compile cache stays empty), and returns standard error.
fn run_refused(dir: &Path, args: &[&str]) -> String {
    let cache = dir.join("cache-of-refused-runs");
    let out = Command::new(bulwark_binary())
        .arg("run")
        .args(args)
        .env("BULWARK_CACHE_DIR", &cache)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(REFUSED), "{err}");
    assert_eq!(stdout(&out), "", "the tool must not run");
    assert!(
        err.contains("(nothing was compiled or run)"),
        "the message says nothing ran: {err}"
    );
    assert!(
        !cache.exists(),
        "refused before compiling: the compile cache must stay empty"
    );
    err
}

/// A scratch directory with the unsigned test module, two key pairs (`a`, `b`) and the module
/// signed with `a`.
struct Setup {
    dir: PathBuf,
    module: String,
    signed: String,
    a_pub: String,
    a_sec: String,
    a_key_id: String,
    a_hex: String,
    b_pub: String,
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

fn keygen(dir: &Path, name: &str) -> (String, String, serde_json::Value) {
    let (sec, public) = (
        path(dir, &format!("{name}.sec")),
        path(dir, &format!("{name}.pub")),
    );
    let out = bulwark(&["keygen", "--json", "-k", &sec, "-K", &public]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("keygen --json: {e}: {}", stdout(&out)));
    (sec, public, json)
}

fn setup(test: &str) -> Setup {
    let dir = scratch_dir(&format!("sign-{test}"));
    let module = path(&dir, "hello.wasm");
    std::fs::write(&module, hello_wasm()).unwrap_or_else(|e| panic!("{e}"));
    let (a_sec, a_pub, a) = keygen(&dir, "a");
    let (_, b_pub, _) = keygen(&dir, "b");
    let signed = path(&dir, "hello.signed.wasm");
    let out = bulwark(&["sign", &module, "-k", &a_sec, "-o", &signed]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    Setup {
        a_key_id: a["key_id"].as_str().unwrap_or_default().to_owned(),
        a_hex: a["public_key_hex"].as_str().unwrap_or_default().to_owned(),
        dir,
        module,
        signed,
        a_pub,
        a_sec,
        b_pub,
    }
}

fn sha256_hex(file: &str) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_correctly_signed_module_runs_in_a_vm() {
    let s = setup("good");
    let out = bulwark(&[
        "verify", &s.signed, "--trust", &s.b_pub, "--trust", &s.a_pub,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!(
            "signature OK, verified by {} (key id {})",
            s.a_pub, s.a_key_id
        )),
        "{}",
        stdout(&out)
    );
    assert!(
        !stdout(&out).contains(&s.b_pub),
        "only the key that signed is named"
    );
    if !kvm_available() {
        return;
    }
    let out = bulwark_run(&["--trust", &s.a_pub, &s.signed], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), HELLO);
}

#[test]
fn a_module_changed_after_signing_is_refused() {
    let s = setup("tampered");
    let mut bytes = std::fs::read(&s.signed).unwrap_or_else(|e| panic!("{e}"));
    let at = bytes
        .windows(5)
        .position(|w| w == b"hello")
        .unwrap_or_else(|| panic!("no text in the module"));
    bytes[at] = b'j';
    let tampered = path(&s.dir, "tampered.wasm");
    std::fs::write(&tampered, bytes).unwrap_or_else(|e| panic!("{e}"));

    let err = run_refused(
        &s.dir,
        &["--isolation", "wasm", "--trust", &s.a_pub, &tampered],
    );
    assert!(
        err.contains(&format!("refused {tampered}"))
            && err.contains(&format!("signed by the trusted key {}", s.a_pub))
            && err.contains("changed after it was signed"),
        "{err}"
    );
    let out = bulwark(&["verify", &tampered, "--trust", &s.a_pub]);
    assert_eq!(out.status.code(), Some(REFUSED), "{}", stderr(&out));
    assert!(stderr(&out).contains("changed after it was signed"));
    // The refusal is the signature's doing: without --trust the changed module is valid and runs.
    let out = bulwark_run(&["--isolation", "wasm", &tampered], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "jello from a Bulwark micro-VM\n");
}

#[test]
fn a_module_signed_by_an_unknown_key_is_refused() {
    let s = setup("unknown-key");
    let err = run_refused(&s.dir, &["--trust", &s.b_pub, &s.signed]);
    assert!(
        err.contains("it is signed, but not by a trusted key")
            && err.contains(&format!("key id {}", s.a_key_id))
            && err.contains("--trust"),
        "{err}"
    );
    let out = bulwark(&["verify", &s.signed, "--trust", &s.b_pub]);
    assert_eq!(out.status.code(), Some(REFUSED), "{}", stderr(&out));
}

#[test]
fn an_unsigned_module_is_refused_under_trust() {
    let s = setup("unsigned");
    let err = run_refused(&s.dir, &["--trust", &s.a_pub, &s.module]);
    assert!(
        err.contains("it is not signed") && err.contains("bulwark sign"),
        "{err}"
    );
    // Text modules cannot carry a signature: said so when run, signed or verified.
    let wat = repo_root().join("examples/hello.wat").display().to_string();
    let err = run_refused(&s.dir, &["--trust", &s.a_pub, &wat]);
    assert!(err.contains("WebAssembly text (.wat)"), "{err}");
    let out = bulwark(&["verify", &wat, "--trust", &s.a_pub]);
    assert_eq!(out.status.code(), Some(REFUSED));
    assert!(stderr(&out).contains("cannot carry a signature section"));
    let out = bulwark(&["sign", &wat, "-k", &s.a_sec, "-o", &path(&s.dir, "x.wasm")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("WebAssembly text (.wat), which cannot carry a signature section"),
        "{}",
        stderr(&out)
    );
    assert!(!s.dir.join("x.wasm").exists());
}

#[test]
fn a_digest_that_is_not_pinned_is_refused() {
    let s = setup("not-pinned");
    // The policy trusts the signer but pins another module (the unsigned original).
    let policy = path(&s.dir, "policy");
    let pinned = sha256_hex(&s.module);
    std::fs::write(
        &policy,
        format!("# team policy\ntrust a.pub\nsha256 {pinned}  # hello, unsigned\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = run_refused(&s.dir, &["--policy", &policy, &s.signed]);
    let actual = sha256_hex(&s.signed);
    assert!(
        err.contains(&format!(
            "its SHA-256 {actual} is not pinned in policy {policy}"
        )) && err.contains(&format!("add the line `sha256 {actual}`")),
        "{err}"
    );
    let out = bulwark(&["verify", &s.signed, "--policy", &policy]);
    assert_eq!(out.status.code(), Some(REFUSED), "{}", stderr(&out));
    // A policy that only pins does not need a signature: the pinned original passes.
    std::fs::write(&policy, format!("sha256 {pinned}\n")).unwrap_or_else(|e| panic!("{e}"));
    let out = bulwark(&["verify", &s.module, "--policy", &policy]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    run_refused(&s.dir, &["--policy", &policy, &s.signed]);
}

#[test]
fn a_signed_module_with_a_pinned_digest_passes() {
    let s = setup("pinned");
    let policy = path(&s.dir, "policy");
    let digest = sha256_hex(&s.signed);
    std::fs::write(&policy, format!("trust-key {}\nsha256 {digest}\n", s.a_hex))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = bulwark(&["verify", "--json", &s.signed, "--policy", &policy]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(json["ok"], true);
    assert_eq!(json["pinned"], true);
    assert_eq!(json["sha256"], digest.as_str());
    assert_eq!(json["verified_by"][0]["key_id"], s.a_key_id.as_str());
    let out = bulwark_run(
        &["--isolation", "wasm", "--policy", &policy, &s.signed],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), HELLO);
}

#[test]
fn keygen_never_overwrites_and_the_secret_key_is_private() {
    let dir = scratch_dir("sign-keygen");
    let (sec, public, _) = keygen(&dir, "k");
    let mode = std::fs::metadata(&sec)
        .unwrap_or_else(|e| panic!("{e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secret key mode {mode:o}");
    assert_eq!(
        std::fs::read(&sec).map(|b| (b.len(), b[0])).ok(),
        Some((65, 0x81))
    );
    assert_eq!(
        std::fs::read(&public).map(|b| (b.len(), b[0])).ok(),
        Some((33, 0x01))
    );
    let before = std::fs::read(&sec).unwrap_or_default();
    let out = bulwark(&["keygen", "-k", &sec, "-K", &path(&dir, "new.pub")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("never overwritten"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&sec).unwrap_or_default(), before);
    assert!(!dir.join("new.pub").exists(), "nothing written");
}

#[test]
fn bad_keys_and_policies_are_clear_errors() {
    let s = setup("bad-config");
    let out = bulwark_run(&["--trust", &s.a_sec, &s.signed], b"");
    assert_eq!(out.status.code(), Some(BULWARK_FAILED));
    assert!(
        stderr(&out).contains("this is a SECRET key"),
        "{}",
        stderr(&out)
    );
    let policy = path(&s.dir, "policy");
    std::fs::write(&policy, "trust a.pub\nallow everything\n").unwrap_or_else(|e| panic!("{e}"));
    let out = bulwark_run(&["--policy", &policy, &s.signed], b"");
    assert_eq!(out.status.code(), Some(BULWARK_FAILED));
    assert!(
        stderr(&out).contains(&format!(
            "policy file {policy} line 2: unknown directive `allow`"
        )),
        "{}",
        stderr(&out)
    );
    let out = bulwark(&["verify", &s.signed, "--policy", &policy]);
    assert_eq!(out.status.code(), Some(1));
    let out = bulwark(&["verify", &s.signed]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap: --trust or --policy is required"
    );
}

#[test]
fn key_and_policy_files_that_are_fifos_or_devices_are_refused_at_once() {
    let s = setup("fifo-config");
    let fifo = path(&s.dir, "key.fifo");
    let c = std::ffi::CString::new(fifo.as_str()).unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (flag, file) in [
        ("--trust", fifo.as_str()),
        ("--trust", "/dev/zero"),
        ("--policy", fifo.as_str()),
        ("--policy", "/dev/urandom"),
    ] {
        // A FIFO with no writer blocks a plain open forever; a guard turns that into a failure.
        let mut child = Command::new(bulwark_binary())
            .args(["run", flag, file, &s.signed])
            .env("BULWARK_CACHE_DIR", path(&s.dir, "cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
        let started = std::time::Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("bulwark run {flag} {file} blocked");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("bulwark did not finish: {e}"));
        assert_eq!(out.status.code(), Some(BULWARK_FAILED), "{flag} {file}");
        assert!(
            stderr(&out).contains("not a regular file"),
            "{flag} {file}: {}",
            stderr(&out)
        );
    }
}
