//! `bulwark compile` as a user runs it.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn compile_writes_the_artifact_and_reports_it() {
    let dir = std::env::temp_dir().join(format!("bulwark-compile-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("t.wat");
    std::fs::write(
        &input,
        r#"(module (func (export "run") (result i64) i64.const 7))"#,
    )
    .unwrap();
    let output = dir.join("t.cwasm");
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .arg("compile")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("compiled "), "{text}");
    assert!(text.contains("sha256 "), "{text}");
    let artifact = std::fs::read(&output).unwrap();
    assert_eq!(&artifact[..4], b"\x7fELF");

    let bad = dir.join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "compile".as_ref(),
            bad.as_os_str(),
            "-o".as_ref(),
            dir.join("x").as_os_str(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.wasm"), "{err}");
    assert!(!dir.join("x").exists(), "no output on failure");
    std::fs::remove_dir_all(dir).unwrap();
}

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// A fresh scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulwark-cc-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `bulwark ARGS` with `stdin` and the compile cache `cache`, and fails the test (after
/// killing it) if it runs longer than `limit`, so a regression that blocks fails instead of
/// hanging. Returns its output and how long it ran.
fn bulwark<S: AsRef<OsStr>>(
    args: &[S],
    cache: &Path,
    stdin: &[u8],
    limit: Duration,
) -> (Output, Duration) {
    bulwark_capped(args, cache, stdin, limit, None)
}

/// [`bulwark`] with an address-space limit, for calls that must not compile anything: a
/// regression that reads `/dev/zero` without end then fails fast instead of eating the
/// machine's memory.
fn bulwark_capped<S: AsRef<OsStr>>(
    args: &[S],
    cache: &Path,
    stdin: &[u8],
    limit: Duration,
    memory: Option<u64>,
) -> (Output, Duration) {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulwark"));
    if let Some(memory) = memory {
        // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
        // async-signal-safe, on the child itself.
        unsafe {
            cmd.pre_exec(move || {
                let cap = libc::rlimit {
                    rlim_cur: memory,
                    rlim_max: memory,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &cap) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .args(args)
        .env("BULWARK_CACHE_DIR", cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let args: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
            panic!("bulwark {args:?} still ran after {limit:?}: it should have ended long before");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    writer.join().unwrap();
    let output = Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    (output, elapsed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from module A\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 20))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// A second module with different output (same length, so entries are alike).
fn module_b() -> String {
    HELLO.replace("hello from module A", "greetings, module B")
}

/// Old code: `read_module` checked `metadata` and then `std::fs::read` the path again, so a FIFO
/// blocked in `open` forever and `/dev/zero` read without end; the time guard fails it.
#[test]
fn fifos_devices_and_directories_are_refused_at_once() {
    let dir = scratch("special");
    let fifo = dir.join("tool.wasm");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let cache = dir.join("cache");
    let out_file = dir.join("out.cwasm");
    for (module, what) in [
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/zero"), "character device"),
        (dir.as_path(), "directory"),
    ] {
        let compile = [
            OsStr::new("compile"),
            module.as_os_str(),
            OsStr::new("-o"),
            out_file.as_os_str(),
        ];
        let run = [OsStr::new("run"), module.as_os_str()];
        for (args, code) in [(&compile[..], 1), (&run[..], 126)] {
            let (out, took) =
                bulwark_capped(args, &cache, b"", Duration::from_secs(20), Some(1 << 30));
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
            assert!(
                err.contains(what) && err.contains(&module.display().to_string()),
                "{args:?}: {err}"
            );
            assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
        }
    }
    assert!(!out_file.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Old code: `-` was a file name, so `bulwark compile - -o -` failed.
#[test]
fn the_compile_worker_reads_standard_input_and_writes_standard_output() {
    let dir = scratch("stdio");
    let cache = dir.join("cache");
    let (out, _) = bulwark(
        &["compile", "-", "-o", "-"],
        &cache,
        HELLO.as_bytes(),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(&out.stdout[..4], b"\x7fELF");
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let input = dir.join("a.wat");
    std::fs::write(&input, HELLO).unwrap();
    let file = dir.join("a.cwasm");
    let (by_path, _) = bulwark(
        &[
            OsStr::new("compile"),
            input.as_os_str(),
            OsStr::new("-o"),
            file.as_os_str(),
        ],
        &cache,
        b"",
        Duration::from_secs(60),
    );
    assert!(by_path.status.success(), "{}", text(&by_path.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), out.stdout, "same artifact");
    let (bad, _) = bulwark(
        &["compile", "-", "-o", "-", "--target", "host"],
        &cache,
        b"not wasm",
        Duration::from_secs(60),
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(bad.stdout.is_empty());
    assert!(
        text(&bad.stderr).contains("valid WebAssembly"),
        "{}",
        text(&bad.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A module of 100,000 small functions: ~30 s of Cranelift on the development machine.
fn slow_module(dir: &Path) -> PathBuf {
    let mut wat = String::from("(module\n");
    for i in 0..100_000 {
        wat.push_str(&format!(
            "(func (export \"f{i}\") (param i32) (result i32) local.get 0 i32.const {i} i32.add)\n"
        ));
    }
    wat.push_str(")\n");
    let path = dir.join("slow.wat");
    std::fs::write(&path, wat).unwrap();
    path
}

/// Old code: `--timeout` started after compiling, so this ran for the whole ~30 s compile (then
/// failed to find `_start`), far past the guard's 15 s.
#[test]
fn a_slow_compile_counts_against_the_calls_timeout() {
    let dir = scratch("slow");
    let module = slow_module(&dir);
    let cache = dir.join("cache");
    for isolation in ["vm", "wasm"] {
        let (out, took) = bulwark(
            &[
                OsStr::new("run"),
                OsStr::new("--timeout"),
                OsStr::new("1s"),
                OsStr::new("--isolation"),
                OsStr::new(isolation),
                module.as_os_str(),
            ],
            &cache,
            b"",
            Duration::from_secs(15),
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(124), "{isolation}: {err}");
        assert!(
            err.contains("took too long") && err.contains("slow.wat"),
            "{isolation}: {err}"
        );
        assert!(took < Duration::from_secs(5), "{isolation}: took {took:?}");
        let entries = std::fs::read_dir(cache.join("artifacts")).unwrap().count();
        assert_eq!(entries, 0, "{isolation}: nothing is cached");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The one cache entry in `cache` whose name ends with `suffix`.
fn entry(cache: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(cache.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.into_iter().next().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Old code: the cache directories were made with the umask's mode (0755 here).
#[test]
fn the_cache_is_private_and_a_shared_one_is_refused() {
    let dir = scratch("private");
    let module = dir.join("a.wat");
    std::fs::write(&module, HELLO).unwrap();
    let cache = dir.join("fresh/cache");
    let run = [
        OsStr::new("run"),
        OsStr::new("--isolation"),
        OsStr::new("wasm"),
        module.as_os_str(),
    ];
    let (out, _) = bulwark(&run, &cache, b"", Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from module A\n");
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&cache.join("artifacts")), 0o700);
    assert_eq!(mode(&cache.join("cache-key")), 0o600);
    assert_eq!(mode(&entry(&cache, "-host.cwasm")), 0o600);
    assert_eq!(
        std::fs::metadata(cache.join("cache-key")).unwrap().len(),
        32
    );

    // Writable by others: anyone could plant code there.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (out, _) = bulwark(&run, &shared, b"", Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("writable by its group or others") && err.contains("chmod 700"),
        "{err}"
    );
    assert!(
        !shared.join("artifacts").exists(),
        "nothing was written there"
    );

    // Owned by someone else (only root can make one to try).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = dir.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let (out, _) = bulwark(&run, &theirs, b"", Duration::from_secs(60));
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains("belongs to user 65534"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Old code: whatever sat at an entry's path was deserialized and run in the `bulwark` process:
/// the patched string was printed, and swapped entries printed each other's output.
#[test]
fn tampered_host_entries_are_recompiled_never_run() {
    let dir = scratch("tamper");
    let cache = dir.join("cache");
    let a = dir.join("a.wat");
    let b = dir.join("b.wat");
    std::fs::write(&a, HELLO).unwrap();
    std::fs::write(&b, module_b()).unwrap();
    let run = |module: &Path| {
        let (out, _) = bulwark(
            &[
                OsStr::new("run"),
                OsStr::new("--isolation"),
                OsStr::new("wasm"),
                module.as_os_str(),
            ],
            &cache,
            b"",
            Duration::from_secs(60),
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(run(&a), "hello from module A\n");
    let entry_a = entry(&cache, "-host.cwasm");
    let good_a = std::fs::read(&entry_a).unwrap();
    assert_eq!(run(&b), "greetings, module B\n");
    let entry_b = std::fs::read_dir(cache.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| *p != entry_a)
        .unwrap();
    let good_b = std::fs::read(&entry_b).unwrap();
    let check = |what: &str| {
        assert_eq!(run(&a), "hello from module A\n", "{what}");
        assert_eq!(run(&b), "greetings, module B\n", "{what}");
        assert_eq!(std::fs::read(&entry_a).unwrap(), good_a, "{what}: A healed");
        assert_eq!(std::fs::read(&entry_b).unwrap(), good_b, "{what}: B healed");
    };

    // Flipped bytes in the artifact: the data segment, patched in place.
    let at = good_a
        .windows(10)
        .position(|w| w == b"hello from")
        .expect("the data segment is in the artifact");
    let mut patched = good_a.clone();
    patched[at..at + 10].copy_from_slice(b"HACKED! AB");
    std::fs::write(&entry_a, &patched).unwrap();
    check("a patched artifact");

    // The two entries swapped.
    std::fs::write(&entry_a, &good_b).unwrap();
    std::fs::write(&entry_b, &good_a).unwrap();
    check("swapped entries");

    // A link to the other entry, a truncated entry, a FIFO, a bare artifact with no tag.
    std::fs::remove_file(&entry_a).unwrap();
    std::os::unix::fs::symlink(&entry_b, &entry_a).unwrap();
    std::fs::write(&entry_b, &good_a[..good_a.len() / 2]).unwrap();
    check("a link and a truncated entry");
    std::fs::remove_file(&entry_a).unwrap();
    let c_path = std::ffi::CString::new(entry_a.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    std::fs::write(&entry_b, &good_b[40..]).unwrap();
    check("a FIFO and an entry without its tag");

    // A new cache key: every entry made with the old one is compiled again.
    std::fs::write(cache.join("cache-key"), [0u8; 32]).unwrap();
    assert_eq!(run(&a), "hello from module A\n");
    assert_ne!(
        std::fs::read(&entry_a).unwrap(),
        good_a,
        "tag under the new key"
    );
    std::fs::write(cache.join("cache-key"), b"short").unwrap();
    assert_eq!(run(&a), "hello from module A\n");
    assert_eq!(
        std::fs::metadata(cache.join("cache-key")).unwrap().len(),
        32,
        "a damaged key is replaced"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
