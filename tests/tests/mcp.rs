//! `bulwark mcp` end to end, driven by the official Rust MCP SDK's client (`rmcp`) over the
//! server's stdin and stdout, as an agent would: the tool list (the language tools when their
//! runtimes are there, a registered module with its manifest's schema), a registered module that
//! gets its JSON arguments on standard input, a trapping module, a module that runs past
//! `--timeout`, a call the client cancels (its VM is gone at once), `run_python` and
//! `run_javascript` (a result, an uncaught exception, standard input), arguments that do not
//! fit, an unknown tool, and a bad manifest, which stops the server before it serves anything.
//!
//! Every call boots a real micro-VM. The compile cache is private to this test binary, so the
//! first Python call compiles CPython (about 30 s on two cores): its wait is generous.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_tests::*;
use rmcp::model::{CallToolRequestParams, CallToolResult, JsonObject};
use rmcp::service::{RoleClient, RunningService, ServiceExt};
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};

/// Longest wait for one call (the first Python call compiles CPython).
const CALL_WAIT: Duration = Duration::from_secs(900);

/// A module that copies standard input (up to 60000 bytes) to standard output.
const ECHO_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; one iovec at 0: buffer at 1024, 60000 bytes; the count read lands at 8
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))))"#;

/// A module that traps at once.
const TRAP_WAT: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#;

/// A module that never ends.
const LOOP_WAT: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

/// The echo tool's input schema.
fn echo_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"text": {"type": "string"}, "n": {"type": "array", "items": {"type": "integer"}}},
        "required": ["text"]
    })
}

/// Writes module `name` (WAT) and its manifest into `dir`.
fn register(dir: &Path, name: &str, wat: &str, schema: &Value) {
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    };
    write(dir.join(format!("{name}.wat")), wat.as_bytes());
    let manifest = json!({
        "name": name,
        "description": format!("The {name} test tool."),
        "input_schema": schema,
    });
    write(
        dir.join(format!("{name}.tool.json")),
        manifest.to_string().as_bytes(),
    );
}

/// Where the language runtimes are, and whether Python's and JavaScript's are there.
fn runtimes() -> (PathBuf, bool, bool) {
    let dir = build_dir().join("runtimes");
    let python = dir.join("python.wasm").is_file();
    let js = dir.join("quickjs.wasm").is_file();
    if !python || !js {
        eprintln!(
            "\n*** {} has no python.wasm or quickjs.wasm (run `make guest`): the language tools \
             must then be absent, and their calls are not tested. ***\n",
            dir.display()
        );
    }
    (dir, python, js)
}

/// `bulwark mcp ARGS` as a command, with the guest image, the runtimes in `runtimes` and a
/// compile cache private to this test binary.
fn mcp_command(args: &[&str], runtimes: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bulwark_binary());
    let guest = build_dir().join("bulwark-guest.elf");
    if guest.is_file() {
        cmd.env("BULWARK_GUEST", guest);
    }
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    cmd.arg("mcp")
        .args(args)
        .current_dir(repo_root())
        .env("BULWARK_CACHE_DIR", cache)
        .env("BULWARK_RUNTIMES", runtimes);
    cmd
}

/// Starts `bulwark mcp ARGS` and connects the MCP client to it (its stderr goes to the test's).
async fn connect(args: &[&str], runtimes: &Path) -> RunningService<RoleClient, ()> {
    connect_with_pid(args, runtimes).await.0
}

/// [`connect`], and the server's process id.
async fn connect_with_pid(args: &[&str], runtimes: &Path) -> (RunningService<RoleClient, ()>, u32) {
    let (transport, _) = TokioChildProcess::builder(mcp_command(args, runtimes))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start bulwark mcp: {e}"));
    let pid = transport
        .id()
        .unwrap_or_else(|| panic!("bulwark mcp has no process id"));
    let client = match tokio::time::timeout(Duration::from_secs(60), ().serve(transport)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => panic!("the MCP session did not start: {e}"),
        Err(_) => panic!("the MCP session did not start within 60 s"),
    };
    (client, pid)
}

/// The live (not zombie) `bulwark-vmm` processes whose parent is `parent`.
fn vmm_children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        panic!("cannot list /proc");
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so split at the last ')'.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let (Some(state), Some(ppid)) = (rest.next(), rest.next()) else {
            continue;
        };
        if comm == "bulwark-vmm" && state != "Z" && ppid.parse::<u32>().ok() == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Calls `tool` with `arguments` and returns the result.
async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &str,
    arguments: Value,
) -> CallToolResult {
    let Value::Object(arguments) = arguments else {
        panic!("arguments must be an object");
    };
    let started = Instant::now();
    let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
    let result = tokio::time::timeout(CALL_WAIT, client.call_tool(params))
        .await
        .unwrap_or_else(|_| panic!("{tool} did not answer within {CALL_WAIT:?}"))
        .unwrap_or_else(|e| panic!("{tool} failed: {e}"));
    eprintln!("{tool}: {:.3} s", started.elapsed().as_secs_f64());
    result
}

/// The text of each content block.
fn texts(result: &CallToolResult) -> Vec<String> {
    result
        .content
        .iter()
        .map(|c| {
            c.as_text()
                .map(|t| t.text.clone())
                .unwrap_or_else(|| panic!("not a text block: {c:?}"))
        })
        .collect()
}

/// The structured content, which every result has.
fn structured(result: &CallToolResult) -> &Value {
    result
        .structured_content
        .as_ref()
        .unwrap_or_else(|| panic!("a result without structuredContent: {result:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_listed_and_run_in_vms() {
    if !kvm_available() {
        return;
    }
    let tools = scratch_dir("mcp-tools");
    register(&tools, "echo", ECHO_WAT, &echo_schema());
    register(&tools, "trap", TRAP_WAT, &json!({"type": "object"}));
    let (runtimes, python, js) = runtimes();
    let client = connect(&["--tools", tools.to_str().unwrap()], &runtimes).await;

    // The list: the language tools exactly when their runtimes are there, then the modules.
    let listed = client.list_all_tools().await.expect("tools/list");
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_ref()).collect();
    let mut expected = Vec::new();
    if python {
        expected.push("run_python");
    }
    if js {
        expected.push("run_javascript");
    }
    expected.extend(["echo", "trap"]);
    assert_eq!(names, expected);
    let echo = listed.iter().find(|t| t.name == "echo").unwrap();
    assert_eq!(
        Value::Object(echo.input_schema.as_ref().clone()),
        echo_schema()
    );
    assert!(
        echo.description
            .as_deref()
            .unwrap_or("")
            .starts_with("The echo test tool.")
    );
    let output_schema = echo.output_schema.as_ref().expect("an output schema");
    assert_eq!(output_schema["type"], "object");

    // A registered module gets its arguments as JSON on standard input.
    let arguments = json!({"text": "héllo \"world\"", "n": [1, 2, 3]});
    let r = call(&client, "echo", arguments.clone()).await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let s = structured(&r);
    assert_eq!(s["outcome"], "exited");
    assert_eq!(s["exit_code"], 0);
    let stdout = s["stdout"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(stdout).unwrap(), arguments);
    assert_eq!(texts(&r), [stdout]);

    // Calls run side by side, each in its own VM.
    let (a, b) = tokio::join!(
        call(&client, "echo", json!({"text": "a"})),
        call(&client, "echo", json!({"text": "b"}))
    );
    assert_eq!(texts(&a), [r#"{"text":"a"}"#]);
    assert_eq!(texts(&b), [r#"{"text":"b"}"#]);

    // A trap is an error, and says so.
    let r = call(&client, "trap", json!({})).await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    let s = structured(&r);
    assert_eq!(s["outcome"], "trapped");
    assert_eq!(s["exit_code"], 134);
    assert!(
        s["message"].as_str().unwrap().contains("unreachable"),
        "{s}"
    );
    assert!(texts(&r).iter().any(|t| t.contains("trapped")), "{r:?}");

    // An unknown tool is a protocol error.
    let unknown = client
        .call_tool(CallToolRequestParams::new("no_such_tool").with_arguments(JsonObject::new()))
        .await;
    assert!(unknown.is_err(), "{unknown:?}");

    if python {
        let r = call(&client, "run_python", json!({"code": "print(1+1)"})).await;
        assert_eq!(r.is_error, Some(false), "{r:?}");
        assert_eq!(texts(&r), ["2\n"]);
        assert_eq!(structured(&r)["stdout"], "2\n");

        let r = call(&client, "run_python", json!({"code": "x = 1\n1 / 0"})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        let s = structured(&r);
        assert_eq!(s["exit_code"], 1);
        assert_eq!(s["outcome"], "exited");
        let text = texts(&r).join("\n");
        assert!(
            text.contains("Traceback (most recent call last)")
                && text.contains("ZeroDivisionError"),
            "{text}"
        );

        let r = call(
            &client,
            "run_python",
            json!({"code": "import sys; print(sys.stdin.read().upper(), sys.argv[1:])",
                   "args": ["a", "-b"], "stdin": "abc"}),
        )
        .await;
        assert_eq!(texts(&r), ["ABC ['a', '-b']\n"], "{r:?}");

        // Arguments that do not fit the schema run nothing and say why.
        let r = call(&client, "run_python", json!({"cod": "print(1)"})).await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert_eq!(structured(&r)["outcome"], "invalid_arguments");
        assert!(texts(&r).join("\n").contains("code"), "{r:?}");
    }
    if js {
        let r = call(
            &client,
            "run_javascript",
            json!({"code": "console.log(1+1)"}),
        )
        .await;
        assert_eq!(r.is_error, Some(false), "{r:?}");
        assert_eq!(texts(&r), ["2\n"]);
        let r = call(
            &client,
            "run_javascript",
            json!({"code": "throw new Error('boom')"}),
        )
        .await;
        assert_eq!(r.is_error, Some(true), "{r:?}");
        assert!(texts(&r).join("\n").contains("boom"), "{r:?}");
    }

    client.cancel().await.expect("the session closes");
    let _ = std::fs::remove_dir_all(&tools);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_the_timeout_is_an_error() {
    if !kvm_available() {
        return;
    }
    let tools = scratch_dir("mcp-timeout");
    register(&tools, "spin", LOOP_WAT, &json!({"type": "object"}));
    let (runtimes, _, _) = runtimes();
    let client = connect(
        &["--tools", tools.to_str().unwrap(), "--timeout", "2s"],
        &runtimes,
    )
    .await;
    let started = Instant::now();
    let r = call(&client, "spin", json!({})).await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    let s = structured(&r);
    assert_eq!(s["outcome"], "timed_out");
    assert_eq!(s["exit_code"], 124);
    assert!(texts(&r).iter().any(|t| t.contains("timed out")), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the call was not stopped near its 2 s limit"
    );
    client.cancel().await.expect("the session closes");
    let _ = std::fs::remove_dir_all(&tools);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_stops_its_vm() {
    if !kvm_available() {
        return;
    }
    let tools = scratch_dir("mcp-cancel");
    register(&tools, "spin", LOOP_WAT, &json!({"type": "object"}));
    register(&tools, "echo", ECHO_WAT, &echo_schema());
    let (runtimes, _, _) = runtimes();
    // No pool: the only VMM the server has is then the call's.
    let (client, server) = connect_with_pid(
        &[
            "--tools",
            tools.to_str().unwrap(),
            "--timeout",
            "300s",
            "--pool",
            "0",
        ],
        &runtimes,
    )
    .await;
    let params = CallToolRequestParams::new("spin").with_arguments(JsonObject::new());
    let mut pending = Box::pin(client.call_tool(params));
    // Wait until the call's VM runs.
    let started = Instant::now();
    while vmm_children(server).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no VM started for the call"
        );
        tokio::select! {
            r = &mut pending => panic!("spin ended: {r:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    // Dropping the request's future makes the client send notifications/cancelled.
    drop(pending);
    let cancelled = Instant::now();
    while !vmm_children(server).is_empty() {
        assert!(
            cancelled.elapsed() < Duration::from_secs(10),
            "the VM still runs {:?} after its call was cancelled",
            cancelled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("VM gone {:?} after the cancel", cancelled.elapsed());
    // The server goes on serving.
    let r = call(&client, "echo", json!({"text": "after"})).await;
    assert_eq!(texts(&r), [r#"{"text":"after"}"#]);
    client.cancel().await.expect("the session closes");
    let _ = std::fs::remove_dir_all(&tools);
}

#[test]
fn a_bad_manifest_stops_the_server_naming_the_file() {
    let tools = scratch_dir("mcp-bad");
    register(&tools, "good", TRAP_WAT, &json!({"type": "object"}));
    let bad = tools.join("bad.tool.json");
    std::fs::write(tools.join("bad.wat"), TRAP_WAT).unwrap();
    std::fs::write(
        &bad,
        r#"{"name": "bad", "description": "d", "input_schema": {"type": "array"}}"#,
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = runtime.block_on(async {
        let mut cmd = mcp_command(&["--tools", tools.to_str().unwrap()], &tools);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("bulwark mcp did not stop within 30 s")
            .expect("bulwark mcp ran")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "nothing may reach the MCP channel");
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("\"type\": \"object\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tools);
}
