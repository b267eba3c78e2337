//! The compile cache end to end: an entry runs in a VM only if it is exactly what the compiler
//! produced for that module, engine and target.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bulwark_tests::*;

/// The smallest WASI tool, printing `line` (20 bytes with its newline, so both modules' entries
/// are alike).
fn tool(line: &str) -> String {
    assert_eq!(line.len(), 20);
    let text = line.trim_end_matches('\n');
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "{text}\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 20))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    )
}

const LINE_A: &str = "hello from module A\n";
const LINE_B: &str = "greetings, module B\n";

/// `bulwark run MODULE` in a VM with the compile cache `cache`.
fn run(module: &Path, cache: &Path) -> Output {
    Command::new(bulwark_binary())
        .arg("run")
        .arg(module)
        .env("BULWARK_CACHE_DIR", cache)
        .env("BULWARK_GUEST", guest_image())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The guest entries (no `-host` suffix) in `cache`.
fn guest_entries(cache: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.to_string_lossy();
            name.ends_with(".cwasm") && !name.ends_with("-host.cwasm")
        })
        .collect();
    found.sort();
    found
}

/// Old code: whatever sat at a cache path was sent to the guest and run, so after the swap
/// module A printed module B's line and the other way round, and the patched entry printed
/// "HACKED!".
#[test]
fn swapped_or_patched_guest_entries_are_recompiled_never_run() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("cache-swap");
    let cache = dir.join("cache");
    let a = dir.join("a.wat");
    let b = dir.join("b.wat");
    std::fs::write(&a, tool(LINE_A)).unwrap();
    std::fs::write(&b, tool(LINE_B)).unwrap();
    let prints = |module: &Path, line: &str, what: &str| {
        let out = run(module, &cache);
        assert_eq!(out.status.code(), Some(0), "{what}: {}", stderr(&out));
        assert_eq!(stdout(&out), line, "{what}");
    };
    prints(&a, LINE_A, "first run of A");
    let entry_a = guest_entries(&cache).pop().unwrap();
    let good_a = std::fs::read(&entry_a).unwrap();
    prints(&b, LINE_B, "first run of B");
    let entry_b = guest_entries(&cache)
        .into_iter()
        .find(|p| *p != entry_a)
        .unwrap();
    let good_b = std::fs::read(&entry_b).unwrap();

    std::fs::write(&entry_a, &good_b).unwrap();
    std::fs::write(&entry_b, &good_a).unwrap();
    prints(&a, LINE_A, "A after the swap");
    prints(&b, LINE_B, "B after the swap");
    assert_eq!(std::fs::read(&entry_a).unwrap(), good_a, "A's entry healed");
    assert_eq!(std::fs::read(&entry_b).unwrap(), good_b, "B's entry healed");

    let at = good_a
        .windows(10)
        .position(|w| w == b"hello from")
        .expect("the data segment is in the artifact");
    let mut patched = good_a.clone();
    patched[at..at + 10].copy_from_slice(b"HACKED! AB");
    std::fs::write(&entry_a, &patched).unwrap();
    prints(&a, LINE_A, "A after its entry was patched");
    assert_eq!(std::fs::read(&entry_a).unwrap(), good_a, "A's entry healed");
    assert_eq!(
        guest_entries(&cache).len(),
        2,
        "no temporary files are left"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A module's digest and an entry's check are remembered (host-cli/src/memo.rs) only while the
/// file is unchanged: a module rewritten in place, same size and inode, runs as what it now
/// says, and an entry patched in place after its check was remembered is checked again, found
/// wrong, and recompiled.
#[test]
fn remembered_checks_do_not_outlive_a_change_to_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("cache-memo");
    let cache = dir.join("cache");
    let a = dir.join("a.wat");
    std::fs::write(&a, tool(LINE_A)).unwrap();
    let prints = |line: &str, what: &str| {
        let out = run(&a, &cache);
        assert_eq!(out.status.code(), Some(0), "{what}: {}", stderr(&out));
        assert_eq!(stdout(&out), line, "{what}");
    };
    prints(LINE_A, "first run");
    // Only files that last changed a while ago are remembered (memo::SETTLED is 2 s).
    std::thread::sleep(std::time::Duration::from_millis(2200));
    prints(LINE_A, "a settled module and entry");
    let records = std::fs::read_dir(cache.join("memo")).unwrap().count();
    assert_eq!(records, 2, "the module's digest and the entry's check");
    prints(LINE_A, "from remembered checks");

    // Rewritten in place: same inode, same size, new contents.
    let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&a);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .and_then(|mut f| std::io::Write::write_all(&mut f, tool(LINE_B).as_bytes()))
        .unwrap();
    assert_eq!(inode(&a), before);
    prints(LINE_B, "the module rewritten in place");

    // Back to A, whose entry (checked and remembered) is now patched in place.
    std::fs::write(&a, tool(LINE_A)).unwrap();
    let entry_a = guest_entries(&cache)
        .into_iter()
        .find(|p| {
            let bytes = std::fs::read(p).unwrap();
            bytes.windows(10).any(|w| w == b"hello from")
        })
        .unwrap();
    let good = std::fs::read(&entry_a).unwrap();
    let at = good.windows(10).position(|w| w == b"hello from").unwrap();
    let mut patched = good.clone();
    patched[at..at + 10].copy_from_slice(b"HACKED! AB");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&entry_a)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &patched))
        .unwrap();
    prints(LINE_A, "A after its remembered entry was patched");
    assert_eq!(std::fs::read(&entry_a).unwrap(), good, "A's entry healed");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The entries (guest or `-host`) in `cache`.
fn entries(cache: &Path, host: bool) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.to_string_lossy();
            name.ends_with(".cwasm") && name.ends_with("-host.cwasm") == host
        })
        .collect();
    found.sort();
    found
}

/// Fuel metering is compiled only into artifacts for calls with `--fuel`: a call with it and one
/// without use two entries, each call runs from its own and gives the right answer, and only the
/// metered one counts fuel. In the VM and with `--isolation wasm` (which needs no KVM).
#[test]
fn calls_with_and_without_fuel_use_their_own_entries() {
    let dir = scratch_dir("cache-fuel");
    let module = dir.join("a.wat");
    std::fs::write(&module, tool(LINE_A)).unwrap();
    let isolations: &[&str] = if kvm_available() {
        &["vm", "wasm"]
    } else {
        &["wasm"]
    };
    for isolation in isolations {
        let cache = dir.join(format!("cache-{isolation}"));
        let host = *isolation == "wasm";
        let json = |fuel: bool| {
            let mut cmd = Command::new(bulwark_binary());
            cmd.args(["run", "--json", "--isolation", isolation]);
            if fuel {
                cmd.args(["--fuel", "1000000"]);
            }
            let out = cmd
                .arg(&module)
                .env("BULWARK_CACHE_DIR", &cache)
                .env("BULWARK_GUEST", guest_image())
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{isolation}: {}", stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["stdout"], LINE_A, "{isolation} fuel {fuel}: {v}");
            v
        };
        let unmetered = json(false);
        assert!(unmetered.get("fuel_consumed").is_none(), "{unmetered}");
        let only_unmetered = entries(&cache, host);
        assert_eq!(only_unmetered.len(), 1, "{isolation}: {only_unmetered:?}");
        let metered = json(true);
        assert!(
            metered["fuel_consumed"].as_u64().is_some_and(|f| f > 0),
            "{metered}"
        );
        let both = entries(&cache, host);
        assert_eq!(
            both.len(),
            2,
            "{isolation}: one entry per variant: {both:?}"
        );
        assert!(entries(&cache, !host).is_empty(), "{isolation}");
        let fuel_entry = both.iter().find(|p| !only_unmetered.contains(p)).unwrap();
        let fuel_artifact = std::fs::read(fuel_entry).unwrap();
        assert_ne!(fuel_artifact, std::fs::read(&only_unmetered[0]).unwrap());
        // Both warm now: each call runs from its own entry, which stays as it was.
        json(false);
        json(true);
        assert_eq!(entries(&cache, host), both);
        assert_eq!(std::fs::read(fuel_entry).unwrap(), fuel_artifact);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
