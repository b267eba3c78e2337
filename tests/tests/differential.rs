//! `bulwark run --isolation vm` against `--isolation wasm`: each case runs both ways, and the
//! answers (exit code, outcome, stdout, stderr, truncation) must be the same, and right.
//!
//! The differential cases need `/dev/kvm`; the tests of `--isolation wasm` alone do not.

// The helpers below fail the test by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Output;
use std::time::{Duration, Instant};

use bulwark_tests::*;
use serde_json::Value;

/// What `--isolation wasm` prints on stderr, every time.
const WARNING: &str = "hardware isolation is OFF";

fn run(args: &[&str], stdin: &[u8]) -> Output {
    bulwark_run(args, stdin)
}

/// One `bulwark run --json --isolation <isolation>`: the process's exit code and its JSON.
fn run_json(isolation: &str, args: &[&str], stdin: &[u8]) -> (i32, Value) {
    let mut all = vec!["--json", "--isolation", isolation];
    all.extend_from_slice(args);
    let out = run(&all, stdin);
    let code = out.status.code().expect("bulwark exited, not killed");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{isolation}: stdout is not one JSON object ({e}): {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        )
    });
    assert_eq!(json["isolation"], isolation, "{json}");
    assert_eq!(json["exit_code"], code, "{json}");
    if isolation == "wasm" {
        assert!(stderr(&out).contains(WARNING), "{}", stderr(&out));
    } else {
        assert!(!stderr(&out).contains(WARNING), "{}", stderr(&out));
    }
    (code, json)
}

/// The fields both ways must agree on.
const COMPARED: &[&str] = &[
    "exit_code",
    "exit",
    "trap",
    "error",
    "stdout",
    "stderr",
    "output_truncated",
];

/// Runs a case with `--isolation vm` and `--isolation wasm`, asserts that the answers agree and
/// returns them (vm, wasm) for the case's own checks. None: no usable /dev/kvm (skipped).
fn both_ways(args: &[&str], stdin: &[u8]) -> Option<[Value; 2]> {
    if !kvm_available() {
        return None;
    }
    guest_image();
    let (vm_code, vm) = run_json("vm", args, stdin);
    let (wasm_code, wasm) = run_json("wasm", args, stdin);
    assert_eq!(
        vm_code, wasm_code,
        "exit codes of {args:?}:\nvm {vm}\nwasm {wasm}"
    );
    for key in COMPARED {
        let (a, b) = (&vm[key], &wasm[key]);
        // Error texts may end differently in whitespace (one comes through a child's stderr).
        let same = match (a.as_str(), b.as_str()) {
            (Some(a), Some(b)) if *key == "error" => a.trim_end() == b.trim_end(),
            _ => a == b,
        };
        assert!(same, "`{key}` of {args:?} differs:\nvm:   {a}\nwasm: {b}");
    }
    Some([vm, wasm])
}

fn tool() -> String {
    built("echo-args.wasm").display().to_string()
}

fn text(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string `{key}` in {v}"))
        .to_owned()
}

#[test]
fn hello() {
    let hello = repo_root().join("examples/hello.wat");
    let Some(results) = both_ways(&["--fuel", "100000000", hello.to_str().unwrap()], b"") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 0, "{r}");
        assert_eq!(text(r, "stdout"), "hello from a Bulwark micro-VM\n");
        assert_eq!(text(r, "stderr"), "");
        assert_eq!(r["output_truncated"], false);
    }
    // No host call returns early here, so the tool runs the same instructions both ways.
    assert_eq!(results[0]["fuel_consumed"], results[1]["fuel_consumed"]);
    assert!(results[0]["fuel_consumed"].as_u64().is_some_and(|f| f > 0));
}

#[test]
fn args_env_and_stdin() {
    let tool = tool();
    let args = [
        "--env",
        "SHOW=A,B",
        "--env",
        "A=1",
        "--env",
        "B=two words",
        &tool,
        "x",
        "-y",
        "--z",
    ];
    let Some(results) = both_ways(&args, b"some input\n") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 0, "{r}");
        assert_eq!(
            text(r, "stdout"),
            "args: x -y --z\nenv A=1\nenv B=two words\nstdin: SOME INPUT\n"
        );
        assert_eq!(text(r, "stderr"), "to stderr\n");
    }
}

#[test]
fn exit_codes() {
    // 130: wasmtime-wasi's own proc_exit refuses codes of 126 and up; the guest passes them on.
    for code in [3, 130] {
        let env = format!("EXIT={code}");
        let Some(results) = both_ways(&["--env", &env, &tool()], b"") else {
            return;
        };
        for r in &results {
            assert_eq!(r["exit"], code, "{r}");
            assert_eq!(r["exit_code"], code, "{r}");
        }
    }
}

#[test]
fn trap() {
    let Some(results) = both_ways(&["--env", "TRAP=1", &tool()], b"") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit_code"], 134, "{r}");
        assert!(r.get("exit").is_none(), "{r}");
        assert!(text(r, "stderr").contains("asked to trap"), "{r}");
        let trap = text(r, "trap");
        assert!(trap.contains("wasm backtrace"), "{trap}");
        assert!(trap.contains("unreachable"), "{trap}");
    }
}

#[test]
fn memory_limit() {
    let tool = tool();
    let Some(results) = both_ways(&["--max-memory", "32MiB", "--env", "GROW=64", &tool], b"")
    else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit_code"], 134, "{r}");
        assert!(r.get("trap").is_some(), "{r}");
        assert!(
            text(r, "stderr").contains("memory allocation of 67108864 bytes failed"),
            "{r}"
        );
    }
    let Some(results) = both_ways(&["--max-memory", "128MiB", "--env", "GROW=64", &tool], b"")
    else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 0, "{r}");
        assert!(text(r, "stdout").ends_with("grew 64 MiB\n"), "{r}");
    }
}

#[test]
fn output_cap() {
    let Some(results) = both_ways(&["--max-output", "64KiB", "--env", "FLOOD=2", &tool()], b"")
    else {
        return;
    };
    for r in &results {
        // The writes past the cap succeed for the tool, so it exits normally.
        assert_eq!(r["exit"], 0, "{r}");
        assert_eq!(r["output_truncated"], true, "{r}");
        let out = text(r, "stdout");
        assert_eq!(out.len(), 65536);
        assert!(out.starts_with("args: \nxxxx"), "{}", &out[..20]);
        assert_eq!(text(r, "stderr"), "to stderr\n");
    }
}

#[test]
fn json_tool() {
    let rank = built("json-rank.wasm");
    let rank = rank.to_str().unwrap();
    let Some(results) = both_ways(
        &[rank, "points"],
        br#"[{"who":"x","points":1},{"who":"y","points":7}]"#,
    ) else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 0, "{r}");
        assert_eq!(
            text(r, "stdout"),
            "{\"count\":2,\"field\":\"points\",\"mean\":4.0,\"ranked\":[{\"points\":7,\"rank\":1,\"who\":\"y\"},{\"points\":1,\"rank\":2,\"who\":\"x\"}]}\n"
        );
    }
    let Some(results) = both_ways(&[rank], b"not json") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 2, "{r}");
        assert!(text(r, "stderr").contains("the input is not JSON"), "{r}");
    }
}

#[test]
fn fuel() {
    let Some(results) = both_ways(&["--fuel", "1000", &tool()], b"") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit_code"], 134, "{r}");
        assert_eq!(text(r, "trap"), "all fuel consumed");
        assert_eq!(r["fuel_consumed"], 1000, "{r}");
    }
}

#[test]
fn modules_that_cannot_run() {
    let dir = scratch_dir("diff-bad-modules");
    let not_wasm = dir.join("not.wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\necho hi\n").unwrap();
    let import = dir.join("import.wat");
    std::fs::write(
        &import,
        br#"(module (import "env" "launch_missiles" (func)) (func (export "_start") call 0))"#,
    )
    .unwrap();
    let no_start = dir.join("no-start.wat");
    std::fs::write(&no_start, b"(module)").unwrap();
    for (module, expected) in [
        (&not_wasm, "not.wasm"),
        (&import, "launch_missiles"),
        (&no_start, "_start"),
    ] {
        let Some(results) = both_ways(&[module.to_str().unwrap()], b"") else {
            return;
        };
        for r in &results {
            assert_eq!(r["exit_code"], 126, "{r}");
            assert!(text(r, "error").contains(expected), "{r}");
        }
    }
}

#[test]
fn wasm_isolation_warns_even_with_json() {
    let hello = repo_root().join("examples/hello.wat");
    let out = run(&["--isolation", "wasm", hello.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from a Bulwark micro-VM\n");
    assert!(stderr(&out).contains(WARNING), "{}", stderr(&out));
    let out = run(
        &["--isolation", "wasm", "--json", hello.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains(WARNING), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("stdout is only the JSON");
    assert_eq!(json["isolation"], "wasm");
    assert_eq!(json["timings_us"]["vm_start"], 0);
}

#[test]
fn wasm_isolation_enforces_the_timeout() {
    let started = Instant::now();
    let out = run(
        &[
            "--isolation",
            "wasm",
            "--timeout",
            "1s",
            "--env",
            "SPIN=1",
            &tool(),
        ],
        b"",
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 1s"),
        "{}",
        stderr(&out)
    );
    assert!(took >= Duration::from_secs(1), "stopped early: {took:?}");
    assert!(took < Duration::from_secs(10), "stopped late: {took:?}");
}

/// Writes a module into a fresh scratch directory and returns its path.
fn module_file(test: &str, wat: &str) -> String {
    let path = scratch_dir(test).join("tool.wat");
    std::fs::write(&path, wat).unwrap();
    path.display().to_string()
}

#[test]
fn exit_codes_outside_a_byte_are_never_success() {
    // WASI's proc_exit takes a u32: 256 and 512 would be 0 as a process status's low byte, and
    // 0xffffffff is -1 as the i32 both isolations report.
    for code in [256, 512, -1] {
        let module = module_file(
            "diff-exit-range",
            &format!(
                r#"(module
                  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                  (memory (export "memory") 1)
                  (func (export "_start") (call $exit (i32.const {code}))))"#
            ),
        );
        let Some(results) = both_ways(&[&module], b"") else {
            return;
        };
        for r in &results {
            assert_eq!(r["exit"], code, "{r}");
            assert_eq!(r["exit_code"], 255, "{r}");
        }
    }
}

/// Twenty memories of 32 MiB (640 MiB together), each of which `_start` fills.
fn many_memories() -> String {
    let mut wat = String::from("(module\n");
    for i in 0..20 {
        wat.push_str(&format!("  (memory $m{i} 512)\n"));
    }
    wat.push_str("  (func (export \"_start\")\n");
    for i in 0..20 {
        wat.push_str(&format!(
            "    (memory.fill $m{i} (i32.const 0) (i32.const 1) (i32.const 33554432))\n"
        ));
    }
    wat.push_str("))\n");
    wat
}

/// Peak RSS in KiB of `bulwark run ARGS` (and what it waited for), and its exit code.
#[expect(
    clippy::zombie_processes,
    reason = "reaped with wait4 to read its rusage"
)]
fn peak_rss_kib(args: &[&str]) -> (i32, i64) {
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    let child = std::process::Command::new(bulwark_binary())
        .arg("run")
        .args(args)
        .env("BULWARK_CACHE_DIR", cache)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start bulwark");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `pid` is our own child, not yet reaped; `status` and `usage` are writable memory
    // of the types wait4 fills in.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
    assert_eq!(reaped, pid);
    // SAFETY: wait4 succeeded, so it filled in the rusage struct.
    let usage = unsafe { usage.assume_init() };
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn all_memories_share_one_budget() {
    let module = module_file("diff-many-memories", &many_memories());
    let Some(results) = both_ways(&["--max-memory", "64MiB", &module], b"") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit_code"], 126, "{r}");
        assert!(text(r, "error").contains("exceeds memory limits"), "{r}");
    }
    // The refusal comes before any of it is allocated: --isolation wasm stays small (the
    // artifact is cached by now, so no compiler process counts either).
    let (code, rss) = peak_rss_kib(&["--isolation", "wasm", "--max-memory", "64MiB", &module]);
    assert_eq!(code, 126);
    assert!(rss < 128 * 1024, "peak RSS {rss} KiB");
    // Two memories that fill the budget together, by growing: then no memory grows by a page.
    let grow = module_file(
        "diff-memory-grow",
        r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory $a 512) (memory $b 0)
          (func (export "_start")
            (if (i32.ne (memory.grow $b (i32.const 512)) (i32.const 0))
              (then (call $exit (i32.const 1))))
            (memory.fill $b (i32.const 0) (i32.const 1) (i32.const 33554432))
            (if (i32.ne (memory.grow $a (i32.const 1)) (i32.const -1))
              (then (call $exit (i32.const 2))))
            (if (i32.ne (memory.grow $b (i32.const 1)) (i32.const -1))
              (then (call $exit (i32.const 3))))))"#,
    );
    let Some(results) = both_ways(&["--max-memory", "64MiB", &grow], b"") else {
        return;
    };
    for r in &results {
        assert_eq!(r["exit"], 0, "{r}");
    }
}

#[test]
fn links_a_tool_makes_stay_in_its_copy() {
    if !kvm_available() {
        return;
    }
    // path_link makes b.txt a second name of a.txt; path_symlink makes c.txt a link to a.txt.
    let module = module_file(
        "diff-links",
        r#"(module
          (import "wasi_snapshot_preview1" "path_link"
            (func $link (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "path_symlink"
            (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "a.txt")
          (data (i32.const 16) "b.txt")
          (data (i32.const 32) "c.txt")
          (func (export "_start")
            (local $r i32)
            (local.set $r (call $link (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 5)
              (i32.const 3) (i32.const 16) (i32.const 5)))
            (if (local.get $r) (then (call $exit (i32.add (i32.const 100) (local.get $r)))))
            (local.set $r (call $symlink (i32.const 0) (i32.const 5) (i32.const 3)
              (i32.const 32) (i32.const 5)))
            (if (local.get $r) (then (call $exit (i32.add (i32.const 150) (local.get $r)))))))"#,
    );
    use std::os::unix::fs::MetadataExt;
    let mut answers = Vec::new();
    for isolation in ["vm", "wasm"] {
        let dir = scratch_dir(&format!("diff-links-{isolation}"));
        std::fs::write(dir.join("a.txt"), b"linked\n").unwrap();
        let spec = format!("{}::/data", dir.display());
        let (code, json) = run_json(isolation, &["--dir", &spec, &module], b"");
        assert_eq!(code, 0, "{isolation}: {json}");
        // The link came back as a second, independent file.
        let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
        assert_eq!(std::fs::read(&b).unwrap(), b"linked\n", "{isolation}");
        // The symbolic link came back as a link, with its target as the tool wrote it.
        let c = dir.join("c.txt");
        assert!(
            std::fs::symlink_metadata(&c)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{isolation}"
        );
        assert_eq!(
            std::fs::read_link(&c).unwrap(),
            std::path::Path::new("a.txt")
        );
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).unwrap(),
            std::fs::symlink_metadata(&b).unwrap(),
        );
        assert!(mb.file_type().is_file(), "{isolation}");
        assert_ne!(
            ma.ino(),
            mb.ino(),
            "{isolation}: a.txt and b.txt are one file"
        );
        assert_eq!((ma.nlink(), mb.nlink()), (1, 1), "{isolation}");
        let back = &json["dirs_written_back"][0];
        answers.push([
            back["files_written"].clone(),
            back["dirs_created"].clone(),
            back["removed"].clone(),
        ]);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(
        answers[0][0], 2,
        "only b.txt and c.txt were written: {:?}",
        answers[0]
    );
}

/// A tool that grows its memory 1 MiB at a time until `memory.grow` fails and exits with the
/// MiB it got, over 16 (an exit code holds no more than 255); it carries a data segment of
/// `data_mib` MiB, so its compiled module takes that much of the VM's RAM too.
fn memory_hog(data_mib: usize) -> std::path::PathBuf {
    let dir = scratch_dir(&format!("memory-hog-{data_mib}"));
    let data = "\\5a".repeat(data_mib << 20);
    let wat = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory {pages} 65536)
          (data (i32.const 0) "{data}")
          (func (export "_start")
            (local $mib i32)
            (block $done
              (loop $grow
                (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
                (local.set $mib (i32.add (local.get $mib) (i32.const 1)))
                (br $grow)))
            (call $exit (i32.div_u (i32.add (local.get $mib) (i32.const {data_mib})) (i32.const 16)))))"#,
        pages = (data_mib << 4).max(1),
    );
    let path = dir.join("hog.wat");
    std::fs::write(&path, wat).expect("write the memory hog");
    path
}

#[test]
fn a_tool_grows_its_memory_to_max_memory_in_the_vm_as_with_isolation_wasm() {
    // With the default VM size: the guest sizes its RAM from --max-memory and the module, and
    // a linear memory grows in place, so the tool gets all of --max-memory both ways (it
    // starts at its data's size, or one page, then grows until the next MiB would not fit).
    // 3584 MiB is past the 3 GiB below the MMIO hole: the VM's RAM goes on above 4 GiB.
    let cases = [
        (0, "1GiB", 1023 / 16),
        (8, "768MiB", 768 / 16),
        (0, "3584MiB", 3583 / 16),
    ];
    for (data_mib, max_memory, want) in cases {
        let hog = memory_hog(data_mib);
        let args = [
            "--max-memory",
            max_memory,
            "--timeout",
            "60s",
            hog.to_str().unwrap(),
        ];
        let Some(results) = both_ways(&args, b"") else {
            return;
        };
        for r in &results {
            assert_eq!(
                r["exit"], want,
                "{max_memory} with {data_mib} MiB of data: {r}"
            );
        }
        let _ = std::fs::remove_dir_all(hog.parent().unwrap());
    }
}

/// Runs `wat` both ways and returns the trap message they agree on (`both_ways` compares it).
fn trap_of(test: &str, wat: &str) -> Option<String> {
    let module = module_file(test, wat);
    let results = both_ways(&[&module], b"")?;
    Some(text(&results[0], "trap"))
}

#[test]
fn guard_pages_trap_exactly_at_a_memorys_size_as_with_isolation_wasm() {
    // The VM's compiled code does not bounds-check these accesses: the window past the
    // memory's size is not mapped, and the fault comes back to wasmtime as a trap.
    // One page grown to two: the last byte of the second page works, the next byte traps.
    let Some(trap) = trap_of(
        "diff-guard-bound",
        r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (drop (memory.grow (i32.const 1)))
            (i32.store8 (i32.const 131071) (i32.const 7))
            (if (i32.ne (i32.load8_u (i32.const 131071)) (i32.const 7))
              (then (call $exit (i32.const 3))))
            (drop (i32.load8_u (i32.const 131072)))
            (call $exit (i32.const 4))))"#,
    ) else {
        return;
    };
    assert!(trap.contains("out of bounds memory access"), "{trap}");
    assert!(
        trap.contains("memory fault at wasm address 0x20000 in linear memory of size 0x20000"),
        "{trap}"
    );

    // A load whose static offset (64 MiB) is past the 32 MiB guard is bounds-checked instead.
    let Some(trap) = trap_of(
        "diff-guard-offset",
        r#"(module
          (memory (export "memory") 1)
          (func (export "_start")
            (drop (i32.load offset=67108864 (i32.const 0)))))"#,
    ) else {
        return;
    };
    assert!(trap.contains("out of bounds memory access"), "{trap}");

    // A store just past a second memory, after both grew.
    let Some(trap) = trap_of(
        "diff-guard-second-memory",
        r#"(module
          (memory $a 1)
          (memory $b 1)
          (func (export "_start")
            (drop (memory.grow $a (i32.const 40)))
            (drop (memory.grow $b (i32.const 3)))
            (i32.store $a (i32.const 2686972) (i32.const 1))
            (i32.store $b (i32.const 262140) (i32.const 1))
            (i32.store $b (i32.const 262144) (i32.const 1))))"#,
    ) else {
        return;
    };
    assert!(
        trap.contains("memory fault at wasm address 0x40000 in linear memory of size 0x40000"),
        "{trap}"
    );
}

#[test]
fn divide_by_zero_and_unreachable_trap_as_with_isolation_wasm() {
    // With signal-based traps these are a divide error and `ud2` in the VM, delivered to the
    // guest's trap entry by the VMM.
    let Some(trap) = trap_of(
        "diff-div-zero",
        r#"(module
          (global $zero (mut i32) (i32.const 0))
          (func (export "_start")
            (drop (i32.div_u (i32.const 7) (global.get $zero)))))"#,
    ) else {
        return;
    };
    assert!(trap.contains("integer divide by zero"), "{trap}");
    let Some(trap) = trap_of(
        "diff-unreachable",
        r#"(module
          (func $deep (param i32)
            (if (local.get 0)
              (then (call $deep (i32.sub (local.get 0) (i32.const 1))))
              (else unreachable)))
          (func (export "_start") (call $deep (i32.const 5))))"#,
    ) else {
        return;
    };
    assert!(trap.contains("unreachable"), "{trap}");
    // The backtrace walks every frame from the fault's frame pointer: six of $deep, then _start.
    assert_eq!(trap.matches("!deep").count(), 6, "{trap}");
    assert!(trap.contains("!<wasm function 1>"), "{trap}");
}
