//! The language runtimes of `images/runtimes.txt` (CPython 3.12.0 and QuickJS-NG 0.11.0, taken
//! from a pinned PyPI wheel by `images/runtimes.sh` into `build/runtimes/`) run agent-style code
//! with `bulwark run`, once in a micro-VM and once with `--isolation wasm` (wasmtime-wasi, the
//! reference): an expression, exit codes, an uncaught exception, and a script read from a `--dir`
//! directory that writes its result back there.
//!
//! The compile cache is private to this test binary, so the first call of each isolation compiles
//! the 26 MB CPython module (28 to 38 s measured on two cores, more while other tests compile):
//! every call gets a generous deadline, which includes compilation.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use bulwark_tests::*;

/// `--timeout` of every call: it bounds the whole call, the first compilation of CPython included.
const TIMEOUT: &str = "300s";

/// The line `bulwark run --isolation wasm` always starts its stderr with.
const WASM_WARNING: &str = "bulwark: warning: --isolation wasm: hardware isolation is OFF; \
     the tool runs in this process with only the Wasm sandbox around it\n";

/// What `bulwark run` adds to stderr when a tool with `--dir` directories exits non-zero.
const DISCARDED: &str =
    "bulwark: the tool did not exit 0: its changes to --dir directories were discarded\n";

/// Where a tool runs.
#[derive(Clone, Copy, Debug)]
enum Isolation {
    /// A micro-VM (the default).
    Vm,
    /// In-process wasmtime-wasi.
    Wasm,
}

/// One finished call: exit code, stdout, and the tool's own stderr (the `--isolation wasm`
/// warning checked and removed).
struct Call {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `build/runtimes/<runtime>` with `args`, sharing `dir` as `/data` when given.
fn run(isolation: Isolation, runtime: &str, dir: Option<&Path>, args: &[&str]) -> Call {
    let module = built(&format!("runtimes/{runtime}"));
    let module = module.display().to_string();
    let share = dir.map(|d| format!("{}::/data", d.display()));
    let mut cli: Vec<&str> = vec!["--timeout", TIMEOUT];
    if let Isolation::Wasm = isolation {
        cli.extend(["--isolation", "wasm"]);
    }
    if let Some(share) = &share {
        cli.extend(["--dir", share]);
    }
    cli.push(&module);
    cli.push("--");
    cli.extend(args);
    let started = Instant::now();
    let out: Output = bulwark_run(&cli, b"");
    eprintln!(
        "{isolation:?}: {runtime} {args:?}: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let mut stderr = stderr(&out);
    if let Isolation::Wasm = isolation {
        stderr = stderr
            .strip_prefix(WASM_WARNING)
            .unwrap_or_else(|| panic!("--isolation wasm did not warn first: {stderr:?}"))
            .to_string();
    }
    Call {
        code: out.status.code(),
        stdout: stdout(&out),
        stderr,
    }
}

/// Asserts a call printed `stdout`, nothing on stderr, and exited 0.
fn assert_ok(call: &Call, stdout: &str) {
    assert_eq!(
        (call.code, call.stdout.as_str(), call.stderr.as_str()),
        (Some(0), stdout, ""),
        "exit code, stdout, stderr"
    );
}

/// The CPython cases, in `isolation`.
fn python(isolation: Isolation) {
    let py = |args: &[&str]| run(isolation, "python.wasm", None, args);

    assert_ok(&py(&["-c", "print(1+1)"]), "2\n");
    assert_ok(
        &py(&["-c", "import sys; print(sys.version_info[:3])"]),
        "(3, 12, 0)\n",
    );

    let exit = py(&["-c", "raise SystemExit(3)"]);
    assert_eq!(
        (exit.code, exit.stdout.as_str(), exit.stderr.as_str()),
        (Some(3), "", ""),
        "SystemExit(3): exit code, stdout, stderr"
    );

    let error = py(&["-c", "print('before'); 1/0"]);
    assert_eq!(
        error.code,
        Some(1),
        "an uncaught exception: {:?}",
        error.stderr
    );
    assert_eq!(error.stdout, "before\n");
    assert!(
        error
            .stderr
            .starts_with("Traceback (most recent call last):\n")
            && error
                .stderr
                .ends_with("ZeroDivisionError: division by zero\n"),
        "stderr of 1/0: {:?}",
        error.stderr
    );

    // A script file from a shared directory reads its input there and writes its result back.
    let dir = scratch_dir(&format!("python-{isolation:?}"));
    std::fs::write(
        dir.join("sum.py"),
        "import json, sys\n\
         with open('/data/in.json') as f:\n    numbers = json.load(f)\n\
         with open('/data/out.txt', 'w') as f:\n    f.write(str(sum(numbers)) + '\\n')\n\
         print('args', sys.argv[1:])\n",
    )
    .unwrap_or_else(|e| panic!("cannot write the script: {e}"));
    std::fs::write(dir.join("in.json"), "[1, 2, 3, 36]\n")
        .unwrap_or_else(|e| panic!("cannot write the input: {e}"));
    let script = run(
        isolation,
        "python.wasm",
        Some(&dir),
        &["/data/sum.py", "a", "b c"],
    );
    assert_ok(&script, "args ['a', 'b c']\n");
    let written = std::fs::read_to_string(dir.join("out.txt"))
        .unwrap_or_else(|e| panic!("the script's out.txt did not come back: {e}"));
    assert_eq!(written, "42\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The QuickJS cases (scripts from a `--dir` directory, `qjs --std`), in `isolation`.
fn quickjs(isolation: Isolation) {
    let dir = scratch_dir(&format!("quickjs-{isolation:?}"));
    for (name, text) in [
        ("add.js", "console.log(1+1)\n"),
        ("exit.js", "std.out.puts('out\\n'); std.exit(5)\n"),
        (
            "throw.js",
            "console.log('before'); throw new Error('boom')\n",
        ),
    ] {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
    }
    let qjs = |script: &str| run(isolation, "quickjs.wasm", Some(&dir), &["--std", script]);

    assert_ok(&qjs("/data/add.js"), "2\n");

    let exit = qjs("/data/exit.js");
    assert_eq!(
        (exit.code, exit.stdout.as_str(), exit.stderr.as_str()),
        (Some(5), "out\n", DISCARDED),
        "std.exit(5): exit code, stdout, stderr"
    );

    let error = qjs("/data/throw.js");
    assert_eq!(
        error.code,
        Some(1),
        "an uncaught exception: {:?}",
        error.stderr
    );
    assert_eq!(error.stdout, "before\n");
    assert!(
        error.stderr.starts_with("Error: boom\n") && error.stderr.ends_with(DISCARDED),
        "stderr of the throw: {:?}",
        error.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_in_vm() {
    if kvm_available() {
        python(Isolation::Vm);
    }
}

#[test]
fn python_with_isolation_wasm() {
    python(Isolation::Wasm);
}

#[test]
fn quickjs_in_vm() {
    if kvm_available() {
        quickjs(Isolation::Vm);
    }
}

#[test]
fn quickjs_with_isolation_wasm() {
    quickjs(Isolation::Wasm);
}
