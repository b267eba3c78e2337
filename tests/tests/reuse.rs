//! `bulwark serve --reuse` end to end, with real VMs and `BULWARK_VERIFY_RESET=1` (every reset
//! is checked by the VMM against a full copy of RAM taken at the snapshot): a tenant's VM is
//! reset and reused for the same tenant and module only, its answers stay right round after
//! round (arguments, standard input, files under /work, linear memory grown by an amount the
//! input sets), it is never kept after a trap, a timeout or output cut at the cap, and without
//! `--reuse` nothing is ever reused.

// A test step that fails panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use bulwark_tests::http::{self, Server};
use bulwark_tests::*;
use serde_json::{Value, json};

/// Prints its arguments (argv[0] too), one a line, then copies standard input to stdout.
const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $asg (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $ag (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  (func $out (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") (local $size i32) (local $i i32) (local $n i32)
    (drop (call $asg (i32.const 16) (i32.const 20)))
    (local.set $size (i32.load (i32.const 20)))
    (if (i32.gt_u (i32.load (i32.const 16)) (i32.const 256)) (then (call $exit (i32.const 2))))
    (if (i32.gt_u (local.get $size) (i32.const 16384)) (then (call $exit (i32.const 2))))
    (drop (call $ag (i32.const 1024) (i32.const 4096)))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
      (if (i32.eqz (i32.load8_u (i32.add (i32.const 4096) (local.get $i))))
        (then (i32.store8 (i32.add (i32.const 4096) (local.get $i)) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (call $out (i32.const 4096) (local.get $size))
    (block $eof (loop $more
      (i32.store (i32.const 32) (i32.const 65536))
      (i32.store (i32.const 36) (i32.const 65536))
      (br_if $eof (i32.ne (call $r (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40))
                          (i32.const 0)))
      (local.set $n (i32.load (i32.const 40)))
      (br_if $eof (i32.eqz (local.get $n)))
      (call $out (i32.const 65536) (local.get $n))
      (br $more)))))"#;

/// Exits 3 if /work/leak.txt exists (an earlier call's file); else writes its standard input
/// to /work/out.txt and creates /work/leak.txt.
const FILES: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "leak.txt")
  (data (i32.const 120) "out.txt")
  (func (export "_start") (local $n i32)
    (if (i32.eqz (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 8)
                             (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 60)))
      (then (call $exit (i32.const 3))))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (drop (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (if (call $open (i32.const 3) (i32.const 0) (i32.const 120) (i32.const 7)
                    (i32.const 9) (i64.const 66) (i64.const 0) (i32.const 0) (i32.const 60))
      (then (call $exit (i32.const 4))))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $w (i32.load (i32.const 60)) (i32.const 0) (i32.const 1) (i32.const 8)))
    (if (call $open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 8)
                    (i32.const 1) (i64.const 66) (i64.const 0) (i32.const 0) (i32.const 60))
      (then (call $exit (i32.const 5))))))"#;

/// Grows its linear memory by 16 pages (1 MiB) per byte of standard input, exits 4 if any
/// page of the new memory is not zero, fills it with 0xab and prints the memory's size in
/// pages.
const GROW: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32) (local $old i32) (local $start i32) (local $len i32)
                          (local $i i32) (local $v i32) (local $p i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.mul (i32.load (i32.const 8)) (i32.const 16)))
    (local.set $old (memory.grow (local.get $n)))
    (if (i32.lt_s (local.get $old) (i32.const 0)) (then (call $exit (i32.const 5))))
    (local.set $start (i32.mul (local.get $old) (i32.const 65536)))
    (local.set $len (i32.mul (local.get $n) (i32.const 65536)))
    (block $checked (loop $page
      (br_if $checked (i32.ge_u (local.get $i) (local.get $len)))
      (if (i32.load8_u (i32.add (local.get $start) (local.get $i)))
        (then (call $exit (i32.const 4))))
      (local.set $i (i32.add (local.get $i) (i32.const 4093)))
      (br $page)))
    (memory.fill (local.get $start) (i32.const 0xab) (local.get $len))
    (local.set $v (memory.size))
    (local.set $p (i32.const 2047))
    (i32.store8 (local.get $p) (i32.const 10))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digit (local.get $v)))
    (i32.store (i32.const 0) (local.get $p))
    (i32.store (i32.const 4) (i32.sub (i32.const 2048) (local.get $p)))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// By the first byte of its standard input: `t` traps, `s` spins, `x` exits 1, `f` writes
/// 1,200,000 bytes of `x` to stdout; anything else (or nothing) prints `ok`.
const MOOD: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 200) "ok\n")
  (func (export "_start") (local $c i32) (local $i i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 1))
    (drop (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $c (i32.load8_u (i32.const 1024)))
    (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 115)) (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $c) (i32.const 120)) (then (call $exit (i32.const 1))))
    (if (i32.eq (local.get $c) (i32.const 102)) (then
      (memory.fill (i32.const 4096) (i32.const 120) (i32.const 60000))
      (i32.store (i32.const 0) (i32.const 4096))
      (i32.store (i32.const 4) (i32.const 60000))
      (loop $more
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $more (i32.lt_u (local.get $i) (i32.const 20))))
      (return)))
    (i32.store (i32.const 0) (i32.const 200))
    (i32.store (i32.const 4) (i32.const 3))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Small limits, so each VM is small and its verified resets are quick.
fn limits() -> Value {
    json!({"max_memory": 32 << 20, "max_files_size": 1 << 20, "timeout_ms": 20000})
}

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()))
}

/// `bulwark serve --pool 0 --pool-mem-mib 256 ARGS` (reusable VMs of 256 MiB) with every reset
/// verified.
fn serve(test: &str, args: &[&str]) -> Server {
    let socket = http::socket_dir(test).join("api.sock");
    let mut all = vec!["--pool", "0", "--pool-mem-mib", "256"];
    all.extend_from_slice(args);
    Server::start_with_env(
        &socket,
        &cache_dir(),
        &all,
        &[("BULWARK_VERIFY_RESET", "1")],
    )
}

fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let a = http::json(socket, method, path, body).unwrap();
    (a.status, a.json())
}

fn upload(socket: &Path, wat: &str) -> String {
    let a = http::unix(
        socket,
        "POST",
        "/v1/modules",
        "application/wasm",
        wat.as_bytes(),
    )
    .unwrap();
    let stored = a.json();
    assert!(a.status == 201 || a.status == 200, "{stored}");
    stored["digest"].as_str().unwrap().to_owned()
}

/// A run; the answer must be 200.
fn run(socket: &Path, body: &Value) -> Value {
    let (status, run) = request(socket, "POST", "/v1/runs", Some(body));
    assert_eq!(status, 200, "{run}");
    run
}

fn pool(socket: &Path) -> Value {
    request(socket, "GET", "/v1/pool", None).1
}

/// The pool's state once no VM is being reset (resets run after the call's answer).
fn settled_pool(socket: &Path) -> Value {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = pool(socket);
        if status["reuse"]["resetting"] == 0 {
            return status;
        }
        assert!(
            std::time::Instant::now() < until,
            "resets never ended: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn log(server: &Server) -> String {
    std::fs::read_to_string(&server.log).unwrap_or_default()
}

#[test]
fn a_tenants_vm_is_reset_and_reused_for_its_own_module_only_and_stays_correct() {
    if !kvm_available() {
        return;
    }
    let server = serve("reuse", &["--reuse"]);
    let socket = server.socket.clone();
    let (echo, files, grow) = (
        upload(&socket, ECHO),
        upload(&socket, FILES),
        upload(&socket, GROW),
    );

    // Many rounds of one tenant and module: the first starts a VM, every later one reuses it,
    // and each answer is its own input's.
    for i in 0..20 {
        let r = run(
            &socket,
            &json!({"module": echo, "tenant": "acme", "args": [format!("round-{i}"), "x".repeat(i)],
                    "stdin": format!("input {i}\n"), "limits": limits()}),
        );
        assert_eq!(r["status"], "exited", "round {i}: {r}\n{}", log(&server));
        assert_eq!(
            r["stdout"],
            format!("tool\nround-{i}\n{}\ninput {i}\n", "x".repeat(i)),
            "round {i}: {r}"
        );
        assert_eq!(r["reused"], i > 0, "round {i}: {r}\n{}", log(&server));
    }

    // Files under /work: each round writes out.txt and leak.txt; a reused VM shows no file of
    // the round before (the tool exits 3 if leak.txt is there).
    for i in 0..5 {
        let r = run(
            &socket,
            &json!({"module": files, "tenant": "acme", "stdin": format!("data of round {i}"),
                    "return_files": ["out.txt"], "limits": limits()}),
        );
        assert_eq!(
            (&r["status"], &r["exit"]),
            (&json!("exited"), &json!(0)),
            "round {i}: {r}"
        );
        assert_eq!(
            r["files"],
            json!([{"path": "out.txt", "kind": "file", "content": format!("data of round {i}")}]),
            "round {i}: {r}"
        );
        // Another module of the same tenant never gets the echo tool's VM.
        assert_eq!(r["reused"], i > 0, "round {i}: {r}");
    }

    // Linear memory grown by what the input says, up and down: the new memory is zero every
    // time (the tool exits 4 otherwise) and the size is this call's own.
    for (i, bytes) in [3usize, 1, 7, 0, 5, 2, 7].into_iter().enumerate() {
        let r = run(
            &socket,
            &json!({"module": grow, "tenant": "acme", "stdin": "g".repeat(bytes), "limits": limits()}),
        );
        assert_eq!(
            (&r["status"], &r["exit"]),
            (&json!("exited"), &json!(0)),
            "round {i}: {r}"
        );
        assert_eq!(
            r["stdout"],
            format!("{}\n", 1 + 16 * bytes),
            "round {i}: {r}"
        );
        assert_eq!(r["reused"], i > 0, "round {i}: {r}");
    }

    // Another tenant never gets acme's VM (acme's echo VM is idle now), nor does a call with no
    // tenant; the other tenant's second call reuses its own.
    let other = |tenant: Option<&str>| {
        let mut body = json!({"module": echo, "args": ["b"], "limits": limits()});
        if let Some(t) = tenant {
            body["tenant"] = json!(t);
        }
        run(&socket, &body)
    };
    let before = settled_pool(&socket)["reuse"]["hits"].as_u64().unwrap();
    let r = other(Some("globex"));
    assert_eq!(
        (&r["stdout"], &r["reused"]),
        (&json!("tool\nb\n"), &json!(false)),
        "{r}"
    );
    let r = other(None);
    assert_eq!(
        (&r["stdout"], &r["reused"]),
        (&json!("tool\nb\n"), &json!(false)),
        "{r}"
    );
    assert_eq!(pool(&socket)["reuse"]["hits"].as_u64().unwrap(), before);
    let r = other(Some("globex"));
    assert_eq!(
        (&r["stdout"], &r["reused"]),
        (&json!("tool\nb\n"), &json!(true)),
        "{r}"
    );

    // A streamed call reuses too, and its output is its own.
    settled_pool(&socket);
    let lines = http::stream_lines(
        &socket,
        "/v1/runs",
        &json!({"module": echo, "tenant": "acme", "stdin": "streamed", "limits": limits()}),
    )
    .unwrap();
    let lines: Vec<Value> = lines
        .iter()
        .map(|(_, l)| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: String = lines.iter().filter_map(|l| l["stdout"].as_str()).collect();
    let outcome = lines.last().unwrap();
    assert_eq!(streamed, "tool\nstreamed", "{lines:?}");
    assert_eq!(
        (&outcome["status"], &outcome["reused"]),
        (&json!("exited"), &json!(true)),
        "{outcome}"
    );

    // Two calls of one key at once: each gets a VM of its own and its own answer.
    let both: Vec<_> = (0..2)
        .map(|i| {
            let socket = socket.clone();
            let echo = echo.clone();
            std::thread::spawn(move || {
                run(
                    &socket,
                    &json!({"module": echo, "tenant": "acme", "stdin": format!("at once {i}"),
                            "limits": limits()}),
                )
            })
        })
        .collect();
    let both: Vec<Value> = both.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, r) in both.iter().enumerate() {
        assert_eq!(r["stdout"], format!("tool\nat once {i}"), "{r}");
    }

    let status = settled_pool(&socket);
    let reuse = &status["reuse"];
    assert_eq!(reuse["enabled"], true, "{status}");
    assert_eq!(reuse["reset_failures"], 0, "{status}\n{}", log(&server));
    assert_eq!(reuse["start_failures"], 0, "{status}\n{}", log(&server));
    assert_eq!(reuse["not_kept"], 0, "{status}");
    let hits = reuse["hits"].as_u64().unwrap();
    // echo 19, files 4, grow 6, the other tenant's second call 1, the streamed call 1.
    let least = 19 + 4 + 6 + 1 + 1;
    assert!(hits >= least, "{status}");
    assert!(reuse["resets"].as_u64().unwrap() >= hits, "{status}");
    assert!(reuse["idle"].as_u64().unwrap() >= 4, "{status}");
    assert!(reuse["last_reset_us"].as_u64().is_some(), "{status}");
    let text = log(&server);
    assert!(
        text.contains("reused") && text.contains("reuse ") && text.contains("resets"),
        "the log says whether each call's VM was reused: {text}"
    );
}

#[test]
fn a_vm_is_not_kept_after_a_trap_a_timeout_or_cut_output() {
    if !kvm_available() {
        return;
    }
    let server = serve("reuse-not-kept", &["--reuse"]);
    let socket = server.socket.clone();
    let mood = upload(&socket, MOOD);
    let call = |stdin: &str, extra: Value| {
        let mut limits = limits();
        if let (Some(l), Some(e)) = (limits.as_object_mut(), extra.as_object()) {
            l.extend(e.clone());
        }
        run(
            &socket,
            &json!({"module": mood, "tenant": "acme", "stdin": stdin, "limits": limits}),
        )
    };
    let ok = |r: &Value, reused: bool| {
        assert_eq!(
            (&r["status"], &r["stdout"], &r["reused"]),
            (&json!("exited"), &json!("ok\n"), &json!(reused)),
            "{r}\n{}",
            log(&server)
        );
    };
    ok(&call("", json!({})), false);
    // Exiting 1 is a normal end: the VM is kept.
    let r = call("x", json!({}));
    assert_eq!((&r["exit"], &r["reused"]), (&json!(1), &json!(true)), "{r}");
    // A trap: served by the kept VM, which is then killed.
    let r = call("t", json!({}));
    assert_eq!(
        (&r["status"], &r["reused"]),
        (&json!("trapped"), &json!(true)),
        "{r}"
    );
    ok(&call("", json!({})), false);
    // A timeout.
    let r = call("s", json!({"timeout_ms": 1000}));
    assert_eq!(
        (&r["status"], &r["reused"]),
        (&json!("timed_out"), &json!(true)),
        "{r}"
    );
    ok(&call("", json!({})), false);
    // Output cut at the cap.
    let r = call("f", json!({"max_output": 1000}));
    assert_eq!(
        (&r["status"], &r["output_truncated"], &r["reused"]),
        (&json!("exited"), &json!(true), &json!(true)),
        "{r}"
    );
    ok(&call("", json!({})), false);
    // The same flood within the cap is a clean end.
    let r = call("f", json!({}));
    assert_eq!(
        (&r["output_truncated"], &r["reused"]),
        (&json!(false), &json!(true)),
        "{r}"
    );
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1_200_000);
    ok(&call("", json!({})), true);

    let status = settled_pool(&socket);
    assert_eq!(status["reuse"]["not_kept"], 3, "{status}");
    assert_eq!(
        status["reuse"]["reset_failures"],
        0,
        "{status}\n{}",
        log(&server)
    );
    assert_eq!(status["reuse"]["started"], 4, "{status}");
}

/// A VM whose VMM holds more than `--reuse-max-rss` after its reset is killed, not kept: a
/// reset keeps the pages a call touched (zeroed), so a kept VM would otherwise hold what its
/// biggest call touched.
#[test]
fn a_vm_that_holds_too_much_memory_after_its_reset_is_not_kept() {
    if !kvm_available() {
        return;
    }
    let server = serve("reuse-max-rss", &["--reuse", "--reuse-max-rss", "24MiB"]);
    let socket = server.socket.clone();
    let grow = upload(&socket, GROW);
    // One byte of input grows memory by 1 MiB, twenty by 20 MiB (each filled).
    let call = |bytes: usize| {
        run(
            &socket,
            &json!({"module": grow, "tenant": "acme", "stdin": "g".repeat(bytes), "limits": limits()}),
        )
    };
    let sized = |r: &Value, pages: usize, reused: bool| {
        assert_eq!(
            (&r["stdout"], &r["reused"]),
            (&json!(format!("{pages}\n")), &json!(reused)),
            "{r}\n{}",
            log(&server)
        );
    };
    sized(&call(1), 17, false);
    sized(&call(1), 17, true);
    sized(&call(20), 321, true);
    // That VM now holds the 20 MiB its call touched: it was killed after its reset.
    sized(&call(1), 17, false);
    sized(&call(1), 17, true);
    let status = settled_pool(&socket);
    assert_eq!(status["reuse"]["too_big"], 1, "{status}\n{}", log(&server));
    assert_eq!(status["reuse"]["reset_failures"], 0, "{status}");
    assert!(
        log(&server).contains("--reuse-max-rss 24 MiB"),
        "{}",
        log(&server)
    );
}

#[test]
fn without_reuse_a_tenant_changes_nothing_and_bad_tenants_are_refused() {
    if !kvm_available() {
        return;
    }
    let server = serve("reuse-off", &[]);
    let socket = server.socket.clone();
    let echo = upload(&socket, ECHO);
    for i in 0..3 {
        let r = run(
            &socket,
            &json!({"module": echo, "tenant": "acme", "stdin": format!("{i}"), "limits": limits()}),
        );
        assert_eq!(
            (&r["stdout"], &r["reused"]),
            (&json!(format!("tool\n{i}")), &json!(false)),
            "{r}"
        );
    }
    let status = pool(&socket);
    assert_eq!(
        (
            &status["reuse"]["enabled"],
            &status["reuse"]["hits"],
            &status["reuse"]["started"]
        ),
        (&json!(false), &json!(0), &json!(0)),
        "{status}"
    );
    for bad in [String::new(), "t".repeat(129), "a\nb".into()] {
        let (status, e) = request(
            &socket,
            "POST",
            "/v1/runs",
            Some(&json!({"module": echo, "tenant": bad})),
        );
        assert_eq!(status, 400, "{e}");
        assert!(e["error"].as_str().unwrap().contains("tenant"), "{e}");
    }
    let r = run(
        &socket,
        &json!({"module": echo, "tenant": "t".repeat(128), "limits": limits()}),
    );
    assert_eq!(r["status"], "exited", "{r}");
}
