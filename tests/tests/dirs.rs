//! `bulwark run --dir` end to end: a host directory shared with a tool in a real micro-VM, the
//! tool's changes written back after success and only then, refused directories, the size cap,
//! and the same results under `--isolation wasm`.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use bulwark_tests::*;

fn run(args: &[&str]) -> Output {
    bulwark_run(args, b"")
}

fn fs_tool() -> String {
    built("fs-tool.wasm").display().to_string()
}

/// Every entry under `root`, links not followed, as `entry(path, metadata)` says: relative path ->
/// that value (for a directory, `entry` is called before its contents are walked).
fn walk_tree<T>(
    root: &Path,
    entry: &dyn Fn(&Path, &std::fs::Metadata) -> T,
) -> BTreeMap<String, T> {
    fn walk<T>(
        root: &Path,
        dir: &Path,
        entry: &dyn Fn(&Path, &std::fs::Metadata) -> T,
        out: &mut BTreeMap<String, T>,
    ) {
        for item in std::fs::read_dir(dir).expect("list") {
            let path = item.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let meta = std::fs::symlink_metadata(&path).expect("lstat");
            out.insert(rel, entry(&path, &meta));
            if meta.is_dir() {
                walk(root, &path, entry, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, entry, &mut out);
    out
}

/// Every file and directory under `root`: path -> contents (None for a directory).
fn snapshot(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    walk_tree(root, &|path, meta| {
        (!meta.is_dir()).then(|| std::fs::read(path).expect("read"))
    })
}

/// The directory `fs-tool ... work` expects, under a fresh scratch dir, with a file beside it
/// that no call may touch.
fn work_dir(test: &str) -> PathBuf {
    let base = scratch_dir(test);
    std::fs::write(base.join("beside.txt"), b"outside the shared dir\n").unwrap();
    let d = base.join("shared");
    std::fs::create_dir_all(d.join("old-dir/inner")).unwrap();
    std::fs::write(d.join("in.txt"), b"0123456789").unwrap();
    std::fs::write(d.join("log.txt"), b"first\n").unwrap();
    std::fs::write(d.join("rename-me.txt"), b"renamed\n").unwrap();
    std::fs::write(d.join("delete-me.txt"), b"x").unwrap();
    std::fs::write(d.join("old-dir/a"), b"a").unwrap();
    std::fs::write(d.join("old-dir/inner/b"), b"b").unwrap();
    d
}

const WORK_TRANSCRIPT: &str = r#"list: ok ["delete-me.txt", "in.txt", "log.txt", "old-dir/", "rename-me.txt"]
read in.txt: ok "0123456789"
len in.txt: ok (10, true)
is_dir old-dir: ok true
write out.txt: ok ()
create_dir_all new/sub: ok ()
write new/sub/deep.txt: ok ()
rename rename-me.txt new/renamed.txt: ok ()
remove delete-me.txt: ok ()
remove_dir_all old-dir: ok ()
append log.txt: ok ()
seek+read in.txt: ok ("3456", 8)
truncate out.txt to 7: ok ()
overwrite in middle: ok ()
read missing: error NotFound
create_dir existing new: error AlreadyExists
remove_dir non-empty new: error Uncategorized
remove_file a directory: error IsADirectory
read a directory: error Uncategorized
read above the dir: error PermissionDenied
create_new existing: error AlreadyExists
write into a file as dir: error NotADirectory
list new: ok ["renamed.txt", "sub/"]
list: ok ["in.txt", "log.txt", "new/", "out.txt"]
"#;

fn expected_after_work() -> BTreeMap<String, Option<Vec<u8>>> {
    [
        ("in.txt", Some(&b"0123456789"[..])),
        ("log.txt", Some(b"first\nappended\n")),
        ("new", None),
        ("new/renamed.txt", Some(b"renamed\n")),
        ("new/sub", None),
        ("new/sub/deep.txt", Some(b"dEEp\n")),
        ("out.txt", Some(b"written")),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_owned(), c.map(<[u8]>::to_vec)))
    .collect()
}

fn work_in(isolation: &str, test: &str) -> (Output, PathBuf) {
    let d = work_dir(test);
    let spec = format!("{}::/data", d.display());
    let out = run(&[
        "--isolation",
        isolation,
        "--dir",
        &spec,
        &fs_tool(),
        "/data",
        "work",
    ]);
    (out, d)
}

#[test]
fn a_tool_works_on_a_shared_dir_and_its_changes_come_back() {
    if !kvm_available() {
        return;
    }
    let (out, d) = work_in("vm", "dir-work");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), WORK_TRANSCRIPT);
    assert_eq!(snapshot(&d), expected_after_work());
    let beside = d.parent().unwrap().join("beside.txt");
    assert_eq!(std::fs::read(beside).unwrap(), b"outside the shared dir\n");
}

#[test]
fn the_same_work_gives_the_same_result_without_the_vm() {
    let (out, d) = work_in("wasm", "dir-work-wasm");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), WORK_TRANSCRIPT);
    assert_eq!(snapshot(&d), expected_after_work());
}

#[test]
fn a_failed_call_leaves_the_host_dir_untouched() {
    if !kvm_available() {
        return;
    }
    for (isolation, mode, code) in [
        ("vm", &["write-then-exit", "3"][..], 3),
        ("vm", &["write-then-trap"][..], 134),
        ("vm", &["write-then-spin"][..], 124),
        ("wasm", &["write-then-exit", "3"][..], 3),
        ("wasm", &["write-then-trap"][..], 134),
    ] {
        let d = work_dir("dir-fail");
        let before = snapshot(&d);
        let spec = format!("{}::/data", d.display());
        let tool = fs_tool();
        let mut args = vec![
            "--isolation",
            isolation,
            "--timeout",
            "2s",
            "--dir",
            &spec,
            &tool,
            "/data",
        ];
        args.extend_from_slice(mode);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(code), "{mode:?}: {}", stderr(&out));
        // A timed-out call's output is lost with its VM; the others show that the tool wrote.
        assert!(
            code == 124 || stdout(&out).starts_with("write out.txt: ok ()\n"),
            "the tool did write: {}",
            stdout(&out)
        );
        assert_eq!(
            snapshot(&d),
            before,
            "{isolation} {mode:?} changed the host dir"
        );
        assert!(stderr(&out).contains("--dir"), "{}", stderr(&out));
    }
}

#[test]
fn links_missing_dirs_and_oversized_dirs_are_refused() {
    if !kvm_available() {
        return;
    }
    let d = work_dir("dir-refused");
    std::os::unix::fs::symlink("/etc/passwd", d.join("old-dir/passwd")).unwrap();
    let spec = format!("{}::/data", d.display());
    let out = run(&["--dir", &spec, &fs_tool(), "/data", "work"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    std::fs::remove_file(d.join("old-dir/passwd")).unwrap();

    let out = run(&[
        "--max-dir-size",
        "8",
        "--dir",
        &spec,
        &fs_tool(),
        "/data",
        "work",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-dir-size"), "{}", stderr(&out));
    let out = run(&[
        "--max-dir-files",
        "3",
        "--dir",
        &spec,
        &fs_tool(),
        "/data",
        "work",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-dir-files"), "{}", stderr(&out));

    let out = run(&[
        "--dir",
        "/nonexistent/dir::/data",
        &fs_tool(),
        "/data",
        "work",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/dir"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_tool_cannot_write_past_the_dir_size_cap() {
    if !kvm_available() {
        return;
    }
    let d = scratch_dir("dir-fill").join("shared");
    std::fs::create_dir_all(&d).unwrap();
    let spec = format!("{}::/data", d.display());
    let out = run(&[
        "--max-dir-size",
        "1MiB",
        "--dir",
        &spec,
        &fs_tool(),
        "/data",
        "fill",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "wrote 1024 KiB\nfill: error StorageFull\n");
    assert_eq!(std::fs::metadata(d.join("big.bin")).unwrap().len(), 1 << 20);
}

#[test]
fn a_host_dir_that_is_a_link_is_refused() {
    let d = work_dir("dir-link");
    let link = d.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&d, &link).unwrap();
    let before = snapshot(&d);
    for isolation in ["wasm", "vm"] {
        if isolation == "vm" && !kvm_available() {
            continue;
        }
        for spelling in ["", "/", "/."] {
            let spec = format!("{}{spelling}::/data", link.display());
            let out = run(&[
                "--isolation",
                isolation,
                "--dir",
                &spec,
                &fs_tool(),
                "/data",
                "work",
            ]);
            assert_eq!(out.status.code(), Some(125), "{spec}: {}", stderr(&out));
            assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
            assert_eq!(stdout(&out), "", "the tool ran");
        }
    }
    assert_eq!(snapshot(&d), before);
}

/// Swaps the directory `real` for a link to `target` and back every few milliseconds until
/// `stop`; leaves `real` in place.
fn swap_until(
    stop: &std::sync::atomic::AtomicBool,
    real: &Path,
    aside: &Path,
    target: &Path,
    seed: u64,
) {
    use std::sync::atomic::Ordering;
    let mut x = seed | 1;
    let mut pause = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(std::time::Duration::from_micros(200 + (x >> 33) % 8000));
    };
    while !stop.load(Ordering::Relaxed) {
        std::fs::rename(real, aside).unwrap();
        std::os::unix::fs::symlink(target, real).unwrap();
        pause();
        std::fs::remove_file(real).unwrap();
        std::fs::rename(aside, real).unwrap();
        pause();
    }
}

/// While calls work on a --dir, something on the host keeps swapping HOST (through its parent)
/// for a link to another directory holding files of the same names, and back. Whatever the
/// timing, a call is refused or its changes land in the directory that was read; the other
/// directory is never created in, changed or removed from.
#[test]
fn a_host_dir_swapped_for_a_link_during_calls_is_never_written_through() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for isolation in ["wasm", "vm"] {
        if isolation == "vm" && !kvm_available() {
            continue;
        }
        let started = std::time::Instant::now();
        let (mut ran, mut round) = (0, 0u64);
        while ran < 12 && started.elapsed() < std::time::Duration::from_secs(120) {
            round += 1;
            let d = work_dir(&format!("dir-swap-{isolation}-{round}"));
            let base = d.parent().unwrap().to_path_buf();
            let outside = base.join("outside");
            std::fs::create_dir(&outside).unwrap();
            for (name, _) in snapshot(&d) {
                if d.join(&name).is_dir() {
                    std::fs::create_dir_all(outside.join(&name)).unwrap();
                } else {
                    std::fs::write(outside.join(&name), format!("outside: {name}")).unwrap();
                }
            }
            std::fs::write(outside.join("out.txt"), b"outside: out.txt").unwrap();
            let outside_before = snapshot(&outside);
            let spec = format!("{}::/data", d.display());
            let stop = AtomicBool::new(false);
            let out = std::thread::scope(|s| {
                let swapper =
                    s.spawn(|| swap_until(&stop, &d, &base.join("aside"), &outside, round));
                let out = run(&[
                    "--isolation",
                    isolation,
                    "--dir",
                    &spec,
                    &fs_tool(),
                    "/data",
                    "work",
                ]);
                stop.store(true, Ordering::Relaxed);
                swapper.join().expect("the swapper failed");
                out
            });
            assert_eq!(
                snapshot(&outside),
                outside_before,
                "{isolation}: a write-back reached outside HOST: {}",
                stderr(&out)
            );
            assert!(
                matches!(out.status.code(), Some(0 | 125)),
                "{isolation}: {}",
                stderr(&out)
            );
            if !stdout(&out).is_empty() {
                ran += 1;
            }
        }
        assert!(
            ran >= 12,
            "{isolation}: only {ran} calls got past reading the dir"
        );
    }
}

/// Everything under `root`, links not followed: path -> `dir`, `file: CONTENTS` or
/// `link -> TARGET`.
fn tree_of(root: &Path) -> BTreeMap<String, String> {
    walk_tree(root, &|path, meta| {
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).expect("readlink");
            format!("link -> {}", target.display())
        } else if meta.is_dir() {
            "dir".to_owned()
        } else {
            let bytes = std::fs::read(path).expect("read");
            format!("file: {}", String::from_utf8_lossy(&bytes))
        }
    })
}

/// The directory `fs-tool ... links` expects, under a fresh scratch dir, with a file beside it.
fn links_dir(test: &str) -> PathBuf {
    let base = scratch_dir(test);
    std::fs::write(base.join("beside.txt"), b"outside the shared dir\n").unwrap();
    let d = base.join("shared");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("data.txt"), b"data").unwrap();
    std::fs::write(d.join("sub/inner.txt"), b"inner").unwrap();
    for (link, target) in [
        ("to-data", "data.txt"),
        ("to-sub", "sub"),
        ("dangling", "missing"),
        ("old", "data.txt"),
        ("retarget", "data.txt"),
    ] {
        std::os::unix::fs::symlink(target, d.join(link)).unwrap();
    }
    d
}

/// What wasmtime-wasi (`--isolation wasm`, the reference) shows `fs-tool DIR links`.
const LINKS_TRANSCRIPT: &str = r#"list: ok ["dangling@", "data.txt", "old@", "retarget@", "sub/", "to-data@", "to-sub@"]
readlink to-data: ok "data.txt"
read to-data: ok "data"
read to-sub/inner.txt: ok "inner"
lstat to-sub: ok (true, false)
stat to-sub: ok true
list to-sub: ok ["inner.txt"]
readlink dangling: ok "missing"
read dangling: error NotFound
readlink data.txt: error InvalidInput
symlink new-link: ok ()
read new-link: ok "inner"
symlink existing: error AlreadyExists
remove old: ok ()
read data.txt after: ok "data"
remove retarget: ok ()
symlink retarget: ok ()
symlink sub/up: ok ()
read sub/up/data.txt: ok "data"
symlink abs: error PermissionDenied
symlink loop: ok ()
read loop: error FilesystemLoop
write to-data: ok ()
list: ok ["dangling@", "data.txt", "loop@", "new-link@", "retarget@", "sub/", "to-data@", "to-sub@"]
list sub: ok ["inner.txt", "up@"]
"#;

/// Links in a shared directory go in as links, the tool reads, makes, retargets and removes
/// them, and what it left comes back: the same with either isolation.
#[test]
fn symbolic_links_that_stay_inside_go_in_and_come_back() {
    let expected: BTreeMap<String, String> = [
        ("dangling", "link -> missing"),
        ("data.txt", "file: written through a link"),
        ("loop", "link -> loop"),
        ("new-link", "link -> sub/inner.txt"),
        ("retarget", "link -> sub"),
        ("sub", "dir"),
        ("sub/inner.txt", "file: inner"),
        ("sub/up", "link -> .."),
        ("to-data", "link -> data.txt"),
        ("to-sub", "link -> sub"),
    ]
    .into_iter()
    .map(|(p, s)| (p.to_owned(), s.to_owned()))
    .collect();
    for isolation in ["wasm", "vm"] {
        if isolation == "vm" && !kvm_available() {
            continue;
        }
        let d = links_dir(&format!("dir-links-{isolation}"));
        let spec = format!("{}::/data", d.display());
        let out = run(&[
            "--isolation",
            isolation,
            "--dir",
            &spec,
            &fs_tool(),
            "/data",
            "links",
        ]);
        assert_eq!(out.status.code(), Some(0), "{isolation}: {}", stderr(&out));
        assert_eq!(stdout(&out), LINKS_TRANSCRIPT, "{isolation}");
        assert_eq!(tree_of(&d), expected, "{isolation}");
        let beside = d.parent().unwrap().join("beside.txt");
        assert_eq!(std::fs::read(beside).unwrap(), b"outside the shared dir\n");
    }
}

/// A link in HOST that leads out of it (or is absolute) refuses the call before the tool runs;
/// a link the tool makes that leads out refuses the whole write-back.
#[test]
fn symbolic_links_that_lead_out_are_refused_going_in_and_coming_back() {
    for isolation in ["wasm", "vm"] {
        if isolation == "vm" && !kvm_available() {
            continue;
        }
        let d = links_dir(&format!("dir-links-out-{isolation}"));
        let spec = format!("{}::/data", d.display());
        let before = tree_of(&d);
        for (link, target) in [
            ("esc", "../beside.txt"),
            ("sub/esc", "../../shared"),
            ("abs", "/etc/passwd"),
            // `sub/up` is `..`, inside; through it, `..` is HOST's parent.
            ("sneaky", "sub/up/../beside.txt"),
        ] {
            std::os::unix::fs::symlink("..", d.join("sub/up")).unwrap();
            std::os::unix::fs::symlink(target, d.join(link)).unwrap();
            let out = run(&[
                "--isolation",
                isolation,
                "--dir",
                &spec,
                &fs_tool(),
                "/data",
                "links",
            ]);
            assert_eq!(out.status.code(), Some(125), "{link}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("symbolic link") && stderr(&out).contains(link),
                "{}",
                stderr(&out)
            );
            assert_eq!(stdout(&out), "", "the tool ran");
            std::fs::remove_file(d.join(link)).unwrap();
            std::fs::remove_file(d.join("sub/up")).unwrap();
        }
        assert_eq!(tree_of(&d), before);

        for target in ["../beside.txt", "../../etc", "sub/../..", "to-sub/../.."] {
            let out = run(&[
                "--isolation",
                isolation,
                "--dir",
                &spec,
                &fs_tool(),
                "/data",
                "symlink",
                target,
                "made",
            ]);
            // The tool made it (the message names it) and exited 0; nothing came back.
            assert_eq!(out.status.code(), Some(125), "{target}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("symbolic link")
                    && stderr(&out).contains(&format!("`{target}`"))
                    && stderr(&out).contains("made"),
                "{isolation} {target}: {}",
                stderr(&out)
            );
            assert_eq!(tree_of(&d), before, "{isolation} {target}: written back");
        }
        // One that stays inside comes back, with the rest of the tool's changes.
        let out = run(&[
            "--isolation",
            isolation,
            "--dir",
            &spec,
            &fs_tool(),
            "/data",
            "symlink",
            "../sub/../data.txt",
            "sub/made",
        ]);
        assert_eq!(out.status.code(), Some(0), "{isolation}: {}", stderr(&out));
        let mut expected = before.clone();
        expected.insert("sub/made".into(), "link -> ../sub/../data.txt".into());
        expected.insert("after.txt".into(), "file: after".into());
        assert_eq!(tree_of(&d), expected, "{isolation}");
    }
}

#[test]
fn more_dirs_than_a_call_may_share_are_refused_before_anything_starts() {
    let base = scratch_dir("dir-count");
    let mut specs = Vec::new();
    for i in 0..=bulwark_proto::call::MAX_SHARED_DIRS {
        let d = base.join(format!("d{i}"));
        std::fs::create_dir_all(&d).unwrap();
        specs.push(format!("{}::/d{i}", d.display()));
    }
    // The module does not exist: only a refusal that comes before reading it (and so before
    // any compile or VM) names the directories instead.
    let module = base.join("never-read.wasm").display().to_string();
    let with_dirs = |specs: &[String], isolation: &str| {
        let mut args = vec!["--isolation", isolation];
        for spec in specs {
            args.extend(["--dir", spec.as_str()]);
        }
        args.push(&module);
        run(&args)
    };
    for isolation in ["vm", "wasm"] {
        let out = with_dirs(&specs, isolation);
        assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("65 --dir directories, over the limit of 64"),
            "{}",
            stderr(&out)
        );
        // One fewer passes that check and meets the missing module.
        let out = with_dirs(&specs[1..], isolation);
        assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
        assert!(stderr(&out).contains("never-read.wasm"), "{}", stderr(&out));
    }
}

#[test]
fn a_tree_is_listed_in_the_hosts_order_both_ways() {
    if !kvm_available() {
        return;
    }
    // Enough names that the host's directory order is not their sorted order.
    let root = scratch_dir("walk-order");
    let names = [
        "zeta",
        "alpha",
        "mid",
        "10",
        "9",
        "Beta",
        "_x",
        "readme.md",
        "Z",
        "é",
        "a b",
    ];
    std::fs::create_dir(root.join("sub")).unwrap();
    for name in names {
        std::fs::write(root.join(name), name).unwrap();
        std::fs::write(root.join("sub").join(name), name).unwrap();
    }
    // What `readdir` on the host gives, depth first: the order the tool must see.
    fn host_walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_str().unwrap());
            if entry.file_type().unwrap().is_dir() {
                out.push(format!("{name}/"));
                host_walk(&entry.path(), &format!("{name}/"), out);
            } else {
                out.push(name);
            }
        }
    }
    let mut want = Vec::new();
    host_walk(&root, "", &mut want);
    let spec = format!("{}::/data", root.display());
    for isolation in ["vm", "wasm"] {
        let out = run(&[
            "--isolation",
            isolation,
            "--dir",
            &spec,
            &fs_tool(),
            "/data",
            "walk",
        ]);
        assert_eq!(out.status.code(), Some(0), "{isolation}: {}", stderr(&out));
        let got: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        assert_eq!(got, want, "{isolation}: not the host's readdir order");
    }
    let mut sorted = want.clone();
    sorted.sort();
    assert_ne!(
        want, sorted,
        "the host listed the names sorted: the test shows nothing"
    );
    std::fs::remove_dir_all(root).unwrap();
}
