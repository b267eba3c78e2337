//! `bulwark serve` end to end: the HTTP API over its Unix socket (and TCP with a bearer token),
//! calls from the warm pool in real VMs, uploads, inline modules, Python with files in and out,
//! bad requests, 429 when every slot is taken, and a graceful stop that finishes the call in
//! flight.

// A test step that fails panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::http::{self, Server, base64};
use bulwark_tests::wat;
use bulwark_tests::*;
use serde_json::{Value, json};

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()))
}

/// Starts `bulwark serve --socket SOCKET ARGS` with this test binary's compile cache.
fn serve(args: &[&str], socket: &Path) -> Server {
    Server::start(socket, &cache_dir(), args)
}

fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let a = http::json(socket, method, path, body).unwrap();
    (a.status, a.json())
}

fn upload(socket: &Path, module: &[u8]) -> (u16, Value) {
    let a = http::unix(socket, "POST", "/v1/modules", "application/wasm", module).unwrap();
    (a.status, a.json())
}

fn socket_in(test: &str) -> PathBuf {
    http::socket_dir(test).join("api.sock")
}

fn python_present() -> bool {
    let present = build_dir().join("runtimes/python.wasm").is_file();
    if !present {
        eprintln!(
            "\n*** the Python part is skipped: build/runtimes/python.wasm is missing (make runtimes) ***\n"
        );
    }
    present
}

#[test]
fn calls_run_from_the_pool_by_digest_inline_and_as_python_with_files() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("calls");
    let server = serve(
        &[
            "--pool",
            "1",
            "--pool-python",
            "1",
            "--pool-javascript",
            "0",
        ],
        &socket,
    );
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is private");

    let (status, health) = request(&socket, "GET", "/v1/health", None);
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let hello = std::fs::read(repo_root().join("examples/hello.wat")).unwrap();
    let (status, stored) = upload(&socket, &hello);
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored["new"], true);
    let digest = stored["digest"].as_str().unwrap().to_owned();
    assert_eq!(digest.len(), 64);
    let (status, again) = upload(&socket, &hello);
    assert_eq!(
        (status, &again["digest"], &again["new"]),
        (200, &json!(digest), &json!(false))
    );

    // Let the pools fill (one Wasm VM, one Python VM), then a call takes a pooled VM.
    let until = Instant::now() + Duration::from_secs(10);
    while request(&socket, "GET", "/v1/pool", None).1["ready"] != 2 {
        assert!(Instant::now() < until, "the pool never filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..3 {
        let (status, run) = request(
            &socket,
            "POST",
            "/v1/runs",
            Some(&json!({"module": digest})),
        );
        assert_eq!(status, 200, "{run}");
        assert_eq!(run["status"], "exited", "{run}");
        assert_eq!(run["exit_code"], 0);
        assert_eq!(run["stdout"], "hello from a Bulwark micro-VM\n");
    }
    let (_, pool) = request(&socket, "GET", "/v1/pool", None);
    assert!(pool["hits"].as_u64().unwrap() >= 1, "{pool}");
    assert_eq!(pool["failures"], 0, "{pool}");
    let wasm = &pool["runtimes"][0];
    assert_eq!(
        (&wasm["runtime"], &wasm["target"], &wasm["small_pages"]),
        (&json!("wasm"), &json!(1), &json!(true)),
        "{pool}"
    );
    assert!(wasm["hits"].as_u64().unwrap() >= 1, "{pool}");
    assert_eq!(pool["runtimes"][1]["hits"], 0, "no Python call yet: {pool}");

    // An inline module that traps.
    let trap = json!({"module_base64": base64(wat::TRAP.as_bytes())});
    let (status, run) = request(&socket, "POST", "/v1/runs", Some(&trap));
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "trapped", "{run}");
    assert_eq!(run["exit_code"], 134);
    assert!(
        run["message"].as_str().unwrap().contains("unreachable"),
        "{run}"
    );

    // Bad requests.
    let missing = "0".repeat(64);
    let (status, e) = request(
        &socket,
        "POST",
        "/v1/runs",
        Some(&json!({"module": missing})),
    );
    assert_eq!(status, 404, "{e}");
    let (status, e) = request(
        &socket,
        "POST",
        "/v1/runs",
        Some(&json!({"module": digest, "language": "python", "code": "1"})),
    );
    assert_eq!(status, 400, "{e}");
    assert!(e["error"].as_str().unwrap().contains("exactly one"), "{e}");
    let (status, e) = request(
        &socket,
        "POST",
        "/v1/runs",
        Some(&json!({"module": digest, "files": [{"path": "../escape", "content": "x"}]})),
    );
    assert_eq!(status, 400, "{e}");
    let (status, _) = request(
        &socket,
        "POST",
        "/v1/runs",
        Some(&json!({"module": digest, "bogus": 1})),
    );
    assert!(
        (400..500).contains(&status),
        "an unknown field is refused: {status}"
    );
    let (status, e) = request(
        &socket,
        "POST",
        "/v1/runs",
        Some(&json!({"module": digest, "limits": {"timeout_ms": 3_600_000}})),
    );
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("--max-timeout"),
        "{e}"
    );
    let (status, e) = upload(&socket, b"not wasm at all");
    assert_eq!(status, 422, "{e}");

    if python_present() {
        let call = json!({
            "language": "python",
            "code": "import sys\ndata = open('/work/in/names.txt').read().split()\nopen('/work/out.txt', 'w').write(','.join(sorted(data)))\nprint(len(data), sys.argv[1:])\nsys.stderr.write('done\\n')",
            "args": ["a", "b"],
            "files": [{"path": "in/names.txt", "content": "cy ada bo"}],
            "return_files": ["out.txt"],
            "limits": {"timeout_ms": 60000}
        });
        let (status, run) = request(&socket, "POST", "/v1/runs", Some(&call));
        assert_eq!(status, 200, "{run}");
        assert_eq!(run["status"], "exited", "{run}");
        assert_eq!(run["stdout"], "3 ['a', 'b']\n", "{run}");
        assert_eq!(run["stderr"], "done\n", "{run}");
        assert_eq!(
            run["files"],
            json!([{"path": "out.txt", "kind": "file", "content": "ada,bo,cy"}]),
            "{run}"
        );
        let (status, run) = request(
            &socket,
            "POST",
            "/v1/runs",
            Some(&json!({"language": "python", "code": "raise ValueError('no')"})),
        );
        assert_eq!(status, 200);
        assert_eq!(
            (&run["status"], &run["exit"]),
            (&json!("exited"), &json!(1)),
            "{run}"
        );
        assert!(
            run["stderr"].as_str().unwrap().contains("ValueError: no"),
            "{run}"
        );
        // Python calls come from the Python pool, on huge pages.
        let (_, pool) = request(&socket, "GET", "/v1/pool", None);
        let python = &pool["runtimes"][1];
        assert_eq!(
            (&python["runtime"], &python["small_pages"]),
            (&json!("python"), &json!(false)),
            "{pool}"
        );
        let served = python["hits"].as_u64().unwrap() + python["misses"].as_u64().unwrap();
        assert!(served >= 2, "{pool}");
        assert!(python["hits"].as_u64().unwrap() >= 1, "{pool}");
    }
    drop(server);
}

#[test]
fn a_full_server_says_429_and_a_stop_finishes_the_call_in_flight() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("busy");
    let mut server = serve(&["--pool", "0", "--max-concurrent", "1"], &socket);
    let spin =
        json!({"module_base64": base64(wat::SPIN.as_bytes()), "limits": {"timeout_ms": 3000}});
    let in_flight = {
        let socket = socket.clone();
        std::thread::spawn(move || request(&socket, "POST", "/v1/runs", Some(&spin)))
    };
    let until = Instant::now() + Duration::from_secs(10);
    while request(&socket, "GET", "/v1/health", None).1["free_slots"] != 0 {
        assert!(Instant::now() < until, "the call never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let body = json!({"module_base64": base64(wat::TRAP.as_bytes())});
    let busy = http::json(&socket, "POST", "/v1/runs", Some(&body)).unwrap();
    assert_eq!(busy.status, 429);
    assert_eq!(busy.header("retry-after"), Some("1"), "{busy:?}");

    // SIGTERM: no new calls, but the one in flight gets its answer.
    // SAFETY: kill(2) on our own child, which is still running.
    unsafe {
        libc::kill(
            libc::pid_t::try_from(server.child.id()).unwrap(),
            libc::SIGTERM,
        )
    };
    let (status, run) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "timed_out", "{run}");
    assert_eq!(run["exit_code"], 124);
    let exit = server.child.wait().unwrap();
    assert!(
        exit.success(),
        "bulwark serve exits 0 after a graceful stop: {exit}"
    );
    assert!(!socket.exists(), "the socket is removed");
}

#[test]
fn tcp_needs_a_private_token_and_checks_it() {
    let dir = scratch_dir("serve-tcp");
    let token = "t".repeat(40);
    let file = dir.join("token");
    std::fs::write(&file, &token).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let out = bulwark_command(
        "serve",
        &["--listen", &addr, "--token-file", file.to_str().unwrap()],
        b"",
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    let out = bulwark_command("serve", &["--listen", &addr], b"", &[]);
    assert!(!out.status.success(), "TCP without a token is refused");
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new(bulwark_binary());
    let mut child = cmd
        .args([
            "serve",
            "--pool",
            "0",
            "--listen",
            &addr,
            "--token-file",
            file.to_str().unwrap(),
        ])
        .env("BULWARK_CACHE_DIR", cache_dir())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let connect = || loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    };
    let a = http::exchange(connect(), "GET", "/v1/health", &[], b"").unwrap();
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate"), Some("Bearer"));
    let wrong = format!("Bearer {}", "u".repeat(40));
    let a = http::exchange(
        connect(),
        "GET",
        "/v1/health",
        &[("Authorization", &wrong)],
        b"",
    );
    assert_eq!(a.unwrap().status, 401);
    let right = format!("Bearer {token}");
    let auth = [("Authorization", right.as_str())];
    let a = http::exchange(connect(), "GET", "/v1/health", &auth, b"").unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let a = http::exchange(connect(), "GET", "/v1/openapi.json", &auth, b"").unwrap();
    assert_eq!(a.status, 200);
    let doc = a.json();
    assert!(doc["paths"]["/v1/runs"]["post"].is_object(), "{doc}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn mixed_calls_at_once_are_each_answered_once_and_leave_no_vmm() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("mixed");
    let mut server = serve(&["--pool", "2", "--max-concurrent", "8"], &socket);
    let kinds = [
        (
            json!({"module_base64": base64(std::fs::read(repo_root().join("examples/hello.wat")).unwrap().as_slice())}),
            "exited",
        ),
        (
            json!({"module_base64": base64(wat::TRAP.as_bytes())}),
            "trapped",
        ),
        (
            json!({"module_base64": base64(wat::SPIN.as_bytes()), "limits": {"timeout_ms": 200}}),
            "timed_out",
        ),
        (
            json!({"module_base64": base64(wat::FLOOD.as_bytes()), "limits": {"max_output": 100000}}),
            "exited",
        ),
    ];
    let calls = 96;
    let answers: Vec<(usize, Value, u32)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (socket, kinds) = (&socket, &kinds);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in (w..calls).step_by(8) {
                        let (body, _) = &kinds[i % kinds.len()];
                        let mut busy = 0;
                        loop {
                            let a = http::json(socket, "POST", "/v1/runs", Some(body)).unwrap();
                            if a.status == 429 {
                                busy += 1;
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                            assert_eq!(a.status, 200, "{a:?}");
                            mine.push((i, a.json(), busy));
                            break;
                        }
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let mut seen = vec![0; calls];
    for (i, answer, _) in &answers {
        seen[*i] += 1;
        let expected = kinds[i % kinds.len()].1;
        assert_eq!(answer["status"], expected, "call {i}: {answer}");
        match i % kinds.len() {
            0 => assert_eq!(answer["stdout"], "hello from a Bulwark micro-VM\n"),
            3 => {
                assert_eq!(answer["output_truncated"], true, "{answer}");
                assert_eq!(answer["stdout"].as_str().unwrap().len(), 100000);
            }
            _ => {}
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "every call answered exactly once: {seen:?}"
    );
    let server_pid = server.child.id();
    // SAFETY: kill(2) on our own child, which is still running.
    unsafe { libc::kill(libc::pid_t::try_from(server_pid).unwrap(), libc::SIGTERM) };
    assert!(server.child.wait().unwrap().success());
    assert_eq!(
        vmm_children(server_pid),
        Vec::<u32>::new(),
        "no VMM outlives the server"
    );
}

/// A tool that writes "a" to stdout, spins 300 ms (asking the clock), writes "b" to stderr and
/// "c" to stdout, and exits 3.
const SLOW_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $t (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "abc")
  (func $out (param $fd i32) (param $at i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (i32.const 1))
    (drop (call $w (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $now (result i64)
    (drop (call $t (i32.const 1) (i64.const 1) (i32.const 16)))
    (i64.load (i32.const 16)))
  (func (export "_start") (local $until i64)
    (call $out (i32.const 1) (i32.const 100))
    (local.set $until (i64.add (call $now) (i64.const 300000000)))
    (loop (br_if 0 (i64.lt_u (call $now) (local.get $until))))
    (call $out (i32.const 2) (i32.const 101))
    (call $out (i32.const 1) (i32.const 102))
    (call $exit (i32.const 3))))"#;

#[test]
fn a_streamed_run_sends_output_as_the_tool_writes_it() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("stream");
    let _server = serve(&["--pool", "1"], &socket);
    let call = json!({"module_base64": base64(SLOW_WAT.as_bytes())});
    let lines = http::stream_lines(&socket, "/v1/runs", &call).unwrap();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|(_, l)| serde_json::from_str(l).unwrap())
        .collect();
    let (last, chunks) = parsed.split_last().unwrap();
    assert_eq!(last["status"], "exited", "{parsed:?}");
    assert_eq!(last["exit"], 3);
    assert_eq!(last["stdout"], "", "the outcome line carries no output");
    let text = |key: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c[key].as_str())
            .collect::<String>()
    };
    assert_eq!(text("stdout"), "ac", "{parsed:?}");
    assert_eq!(text("stderr"), "b", "{parsed:?}");
    // "a" came while the tool was still spinning: well before the outcome.
    let first = lines
        .iter()
        .zip(&parsed)
        .find(|(_, v)| v["stdout"] == "a")
        .map(|((at, _), _)| *at)
        .expect("a chunk with just \"a\"");
    let end = lines.last().unwrap().0;
    assert!(
        end.duration_since(first) >= Duration::from_millis(150),
        "\"a\" arrived {:?} before the end",
        end.duration_since(first)
    );

    // A bad request is answered as without streaming.
    let stream = UnixStream::connect(&socket).unwrap();
    let body = json!({"module": "zz"}).to_string();
    let a = http::exchange(
        stream,
        "POST",
        "/v1/runs",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "application/x-ndjson"),
        ],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(a.status, 400, "{a:?}");
}

#[test]
fn a_socket_directory_that_is_a_link_or_open_to_others_is_refused() {
    let dir = http::socket_dir("links");
    let real = dir.join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = bulwark_command(
        "serve",
        &["--socket", link.join("api.sock").to_str().unwrap()],
        b"",
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a directory (a link?)"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = bulwark_command(
        "serve",
        &["--socket", real.join("api.sock").to_str().unwrap()],
        b"",
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not private to you"),
        "{}",
        stderr(&out)
    );
    assert!(!real.join("api.sock").exists());
}

#[test]
fn a_second_stop_signal_cancels_the_calls_still_running() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("cancel");
    let mut server = serve(&["--pool", "0"], &socket);
    let spin =
        json!({"module_base64": base64(wat::SPIN.as_bytes()), "limits": {"timeout_ms": 30000}});
    let in_flight = {
        let socket = socket.clone();
        std::thread::spawn(move || request(&socket, "POST", "/v1/runs", Some(&spin)))
    };
    let until = Instant::now() + Duration::from_secs(10);
    while request(&socket, "GET", "/v1/health", None).1["free_slots"] == 8 {
        assert!(Instant::now() < until, "the call never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the call reach its VM.
    std::thread::sleep(Duration::from_millis(300));
    let pid = libc::pid_t::try_from(server.child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which is still running.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above; it is still running, finishing its call.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let (status, run) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["exit_code"], 130);
    assert!(server.child.wait().unwrap().success());
    assert_eq!(vmm_children(server.child.id()), Vec::<u32>::new());
}

/// The module store stays within `--max-store`: the modules used least recently are forgotten
/// (a run naming one is answered 404), one that is used stays; a module that cannot fit is
/// refused. `GET /v1/health` shows the store.
#[test]
fn a_bounded_store_forgets_the_modules_used_least_recently() {
    if !kvm_available() {
        return;
    }
    let socket = socket_in("store");
    // A cache of its own: the bound applies to everything in it.
    let cache = scratch_dir("serve-store-cache");
    let hello = std::fs::read_to_string(repo_root().join("examples/hello.wat")).unwrap();
    let module = |i: usize| format!("{hello}\n;; {i}\n");
    // What one module takes on this file system, compiled form included.
    let each = {
        let server = Server::start(&socket, &cache, &["--pool", "0"]);
        assert_eq!(upload(&socket, module(0).as_bytes()).0, 201);
        let (_, health) = request(&socket, "GET", "/v1/health", None);
        drop(server);
        health["store"]["bytes"].as_u64().unwrap()
    };
    assert!(each > 0);
    // Room for four and a half: module 0 is in already.
    let max = (each * 9 / 2).to_string();
    let server = Server::start(&socket, &cache, &["--pool", "0", "--max-store", &max]);
    let mut digests = Vec::new();
    for i in 0..6 {
        if i == 3 {
            // Module 0 is used before 3, 4 and 5 arrive: it must outlive 1 and 2.
            let (status, run) = request(
                &socket,
                "POST",
                "/v1/runs",
                Some(&json!({"module": digests[0]})),
            );
            assert_eq!((status, &run["status"]), (200, &json!("exited")), "{run}");
        }
        let (status, stored) = upload(&socket, module(i).as_bytes());
        assert_eq!(status, if i == 0 { 200 } else { 201 }, "{stored}");
        digests.push(stored["digest"].as_str().unwrap().to_owned());
    }
    let run = |digest: &str| {
        request(
            &socket,
            "POST",
            "/v1/runs",
            Some(&json!({"module": digest})),
        )
    };
    let (_, health) = request(&socket, "GET", "/v1/health", None);
    let store = &health["store"];
    assert_eq!(
        (&store["modules"], &store["evicted"]),
        (&json!(4), &json!(2)),
        "{health}"
    );
    assert!(store["bytes"].as_u64().unwrap() <= each * 9 / 2, "{health}");
    for forgotten in &digests[1..=2] {
        let (status, body) = run(forgotten);
        assert_eq!(status, 404, "{body}");
    }
    for kept in [&digests[0], &digests[3], &digests[5]] {
        let (status, body) = run(kept);
        assert_eq!((status, &body["status"]), (200, &json!("exited")), "{body}");
    }
    // A module bigger than half the store (its compiled form would not fit) is refused.
    let big = format!(
        "{hello}\n;; {}\n",
        "x".repeat(usize::try_from(each * 3).unwrap())
    );
    let (status, body) = upload(&socket, big.as_bytes());
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("--max-store"),
        "{body}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
}
