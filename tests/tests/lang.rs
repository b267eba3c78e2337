//! `bulwark python` and `bulwark js` end to end: `-c`/`-e` code, a script file with arguments, a
//! program on standard input (`-`), standard input and `--env` for the program, an uncaught
//! exception (its traceback or stack on stderr, exit 1), pure-Python packages from a `--dir` on
//! PYTHONPATH, a script inside a `--dir` next to its own modules, and the two tools of
//! `examples/` with the commands their READMEs give. Each case runs in a micro-VM and with
//! `--isolation wasm` (wasmtime-wasi, the reference), and the two must agree exactly. The
//! runtimes are the pinned ones `make guest` put in `build/runtimes/`; without them the calls
//! fail with the message that says to fetch them, which is checked too.
//!
//! The compile cache is private to this test binary, so the first Python call of each isolation
//! compiles the 26 MB CPython module (about 30 s on two cores): every call gets a generous
//! `--timeout`, which includes compilation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use bulwark_tests::*;

/// `--timeout` of every call: it bounds the whole call, the first compilation of CPython included.
const TIMEOUT: &str = "300s";

/// The line `--isolation wasm` always starts its stderr with.
const WASM_WARNING: &str = "bulwark: warning: --isolation wasm: hardware isolation is OFF; \
     the tool runs in this process with only the Wasm sandbox around it\n";

/// Where a call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isolation {
    /// A micro-VM (the default).
    Vm,
    /// In-process wasmtime-wasi.
    Wasm,
}

/// One finished call: exit code, stdout, and stderr without the `--isolation wasm` warning.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `bulwark <command> ARGS` (from the repository root, with the built runtimes, the guest
/// image and a compile cache private to this test binary) with `stdin`.
fn bulwark(command: &str, args: &[&str], stdin: &[u8], runtimes: &Path) -> std::process::Output {
    bulwark_command(
        command,
        args,
        stdin,
        &[("BULWARK_RUNTIMES", runtimes.as_os_str())],
    )
}

/// The runtimes `make guest` fetched.
fn runtimes() -> PathBuf {
    let dir = build_dir().join("runtimes");
    built("runtimes/python.wasm");
    built("runtimes/quickjs.wasm");
    dir
}

/// Runs `bulwark <command>` in `isolation` with `args` and `stdin`.
fn call(isolation: Isolation, command: &str, args: &[&str], stdin: &str) -> Call {
    let mut cli: Vec<&str> = vec!["--timeout", TIMEOUT];
    if isolation == Isolation::Wasm {
        cli.extend(["--isolation", "wasm"]);
    }
    cli.extend(args);
    let started = Instant::now();
    let out = bulwark(command, &cli, stdin.as_bytes(), &runtimes());
    eprintln!(
        "{isolation:?}: {command} {args:?}: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let mut stderr = stderr(&out);
    if isolation == Isolation::Wasm {
        stderr = stderr
            .strip_prefix(WASM_WARNING)
            .unwrap_or_else(|| panic!("--isolation wasm did not warn first: {stderr:?}"))
            .to_owned();
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

/// Writes `text` to `dir/name` (creating `dir`'s subdirectories) and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Path as a command-line argument.
fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// The Python cases in `isolation`; returns every call, for comparing the isolations.
fn python(isolation: Isolation) -> Vec<Call> {
    let dir = scratch_dir(&format!("lang-python-{isolation:?}"));
    let py = |args: &[&str], stdin: &str| call(isolation, "python", args, stdin);
    let mut calls = Vec::new();

    // -c with arguments that look like options, --env, and standard input for the program.
    let c = py(
        &[
            "--env",
            "GREETING=hi",
            "-c",
            "import os, sys; print(sys.argv, os.environ['GREETING'], sys.stdin.read())",
            "a",
            "-b",
            "--timeout",
        ],
        "piped",
    );
    assert_ok(&c, "['-c', 'a', '-b', '--timeout'] hi piped\n");
    calls.push(c);

    // The program's exit status is bulwark's.
    let c = py(&["-c", "print('bye'); raise SystemExit(3)"], "");
    assert_eq!(
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        (Some(3), "bye\n", ""),
        "SystemExit(3): exit code, stdout, stderr"
    );
    calls.push(c);

    // A script file outside any --dir: shared at /script/NAME; its stdin is still the program's.
    let script = write(
        &dir,
        "tool/t.py",
        "import sys\nprint(__file__, sys.argv[1:], sys.stdin.read().upper())\n",
    );
    let c = py(&[&arg(&script), "x", "--y"], "text");
    assert_ok(&c, "/script/t.py ['x', '--y'] TEXT\n");
    calls.push(c);

    // `-`: the program is standard input, as with python.
    let c = py(&["-", "a"], "import sys\nprint('from stdin', sys.argv)\n");
    assert_ok(&c, "from stdin ['-', 'a']\n");
    calls.push(c);

    // An uncaught exception: what ran before is printed, the traceback names the script's
    // lines, and the exit code is CPython's 1.
    let boom = write(
        &dir,
        "boom.py",
        "print('before')\ndef f(x):\n    raise ValueError(f'bad input {x}')\nf(3)\n",
    );
    let c = py(&[&arg(&boom)], "");
    assert_eq!(c.code, Some(1), "an uncaught exception: {c:?}");
    assert_eq!(c.stdout, "before\n");
    assert!(
        c.stderr.starts_with("Traceback (most recent call last):\n")
            && c.stderr
                .contains("  File \"/script/boom.py\", line 4, in <module>\n")
            && c.stderr
                .contains("  File \"/script/boom.py\", line 3, in f\n")
            && c.stderr.ends_with("ValueError: bad input 3\n"),
        "the traceback: {:?}",
        c.stderr
    );
    calls.push(c);

    // A pure-Python package from a --dir on PYTHONPATH, and a script inside another --dir that
    // imports the module next to it and writes its result there (written back on exit 0).
    write(
        &dir,
        "pkgs/shout/__init__.py",
        "from .core import shout\n__all__ = ['shout']\n",
    );
    write(
        &dir,
        "pkgs/shout/core.py",
        "def shout(s):\n    return s.upper() + '!'\n",
    );
    write(&dir, "app/helper.py", "def twice(s):\n    return s + s\n");
    let main = write(
        &dir,
        "app/main.py",
        "import sys, helper, shout\n\
         out = shout.shout(helper.twice(sys.argv[1]))\n\
         open('/app/out.txt', 'w').write(out + '\\n')\n\
         print(__file__, out)\n",
    );
    let pkgs = format!("{}::/pkgs", arg(&dir.join("pkgs")));
    let app = format!("{}::/app", arg(&dir.join("app")));
    let c = py(
        &[
            "--dir",
            &pkgs,
            "--dir",
            &app,
            "--env",
            "PYTHONPATH=/pkgs",
            "--env",
            "PYTHONDONTWRITEBYTECODE=1",
            &arg(&main),
            "ab",
        ],
        "",
    );
    assert_ok(&c, "/app/main.py ABAB!\n");
    calls.push(c);
    let written = std::fs::read_to_string(dir.join("app/out.txt"))
        .unwrap_or_else(|e| panic!("the script's out.txt did not come back: {e}"));
    assert_eq!(written, "ABAB!\n");
    assert!(
        !dir.join("pkgs/shout/__pycache__").exists(),
        "PYTHONDONTWRITEBYTECODE=1 reached CPython"
    );

    // examples/python-tool, with the command its README gives.
    let c = py(
        &[
            "--dir",
            "examples/python-tool/lib::/lib",
            "--env",
            "PYTHONPATH=/lib",
            "--env",
            "PYTHONDONTWRITEBYTECODE=1",
            "examples/python-tool/wordfreq.py",
            "3",
        ],
        "The cat and the hat.\nThe cat sat; the hat did not.\n",
    );
    assert_ok(&c, "2\tcat\n2\that\n1\tdid\n");
    calls.push(c);
    assert_readme_shows("examples/python-tool/README.md", "2\tcat\n2\that\n1\tdid\n");

    let _ = std::fs::remove_dir_all(&dir);
    calls
}

/// The JavaScript cases in `isolation`; returns every call, for comparing the isolations.
fn js(isolation: Isolation) -> Vec<Call> {
    let dir = scratch_dir(&format!("lang-js-{isolation:?}"));
    let js = |args: &[&str], stdin: &str| call(isolation, "js", args, stdin);
    let mut calls = Vec::new();

    // -e with arguments that look like options (qjs would take them as its own), --env, stdin.
    let c = js(
        &[
            "--env",
            "GREETING=hi",
            "-e",
            "console.log(JSON.stringify(scriptArgs), std.getenv('GREETING'), std.in.readAsString())",
            "a",
            "-b",
            "--std",
        ],
        "piped",
    );
    assert_ok(&c, "[\"a\",\"-b\",\"--std\"] hi piped\n");
    calls.push(c);

    // The program's exit status is bulwark's.
    let c = js(&["-e", "std.out.puts('bye\\n'); std.exit(5)"], "");
    assert_eq!(
        (c.code, c.stdout.as_str(), c.stderr.as_str()),
        (Some(5), "bye\n", ""),
        "std.exit(5): exit code, stdout, stderr"
    );
    calls.push(c);

    // A script file: scriptArgs[0] is its guest path.
    let script = write(
        &dir,
        "t.js",
        "console.log(JSON.stringify(scriptArgs), typeof os.getcwd)\n",
    );
    let c = js(&[&arg(&script), "x", "-y"], "");
    assert_ok(&c, "[\"/script/t.js\",\"x\",\"-y\"] function\n");
    calls.push(c);

    // `-`: the program is standard input (qjs cannot read it there: it becomes a script file).
    let c = js(
        &["-", "a"],
        "console.log('from stdin', JSON.stringify(scriptArgs))\n",
    );
    assert_ok(&c, "from stdin [\"/script/stdin.js\",\"a\"]\n");
    calls.push(c);

    // An uncaught exception: the error and its stack on stderr, exit 1.
    let throw = write(
        &dir,
        "throw.js",
        "console.log('before')\nfunction f() { throw new Error('boom') }\nf()\n",
    );
    let c = js(&[&arg(&throw)], "");
    assert_eq!(c.code, Some(1), "an uncaught exception: {c:?}");
    assert_eq!(c.stdout, "before\n");
    assert!(
        c.stderr.starts_with("Error: boom\n") && c.stderr.contains("/script/throw.js:2"),
        "the error: {:?}",
        c.stderr
    );
    calls.push(c);

    // A module inside a --dir imports its neighbour.
    write(&dir, "mod/lib.js", "export const twice = (s) => s + s;\n");
    let main = write(
        &dir,
        "mod/main.js",
        "import { twice } from './lib.js';\nimport * as std from 'qjs:std';\n\
         std.out.puts(twice(scriptArgs[1]) + ' ' + scriptArgs[0] + '\\n');\n",
    );
    let share = format!("{}::/mod", arg(&dir.join("mod")));
    let c = js(&["--dir", &share, &arg(&main), "ab"], "");
    assert_ok(&c, "abab /mod/main.js\n");
    calls.push(c);

    // examples/js-tool, with the command its README gives.
    let c = js(
        &["examples/js-tool/json2csv.js", "name", "score", "langs"],
        "[{\"name\":\"ada\",\"langs\":\"py, js\",\"score\":7},{\"name\":\"bo\",\"score\":2}]\n",
    );
    assert_ok(&c, "name,score,langs\r\nada,7,\"py, js\"\r\nbo,2,\r\n");
    calls.push(c);
    assert_readme_shows(
        "examples/js-tool/README.md",
        "name,score,langs\nada,7,\"py, js\"\nbo,2,\n",
    );

    let _ = std::fs::remove_dir_all(&dir);
    calls
}

/// Asserts an example's README shows `output` (so the README and the tested command agree).
fn assert_readme_shows(readme: &str, output: &str) {
    let path = repo_root().join(readme);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        text.contains(&format!("```\n{output}```")),
        "{readme} does not show the output {output:?}"
    );
}

#[test]
fn python_runs_code_scripts_and_packages_alike_in_both_isolations() {
    let wasm = python(Isolation::Wasm);
    if kvm_available() {
        assert_eq!(
            python(Isolation::Vm),
            wasm,
            "the VM and wasmtime-wasi disagree"
        );
    }
}

#[test]
fn js_runs_code_scripts_and_modules_alike_in_both_isolations() {
    let wasm = js(Isolation::Wasm);
    if kvm_available() {
        assert_eq!(js(Isolation::Vm), wasm, "the VM and wasmtime-wasi disagree");
    }
}

#[test]
fn a_missing_or_unpinned_runtime_is_refused_with_what_to_run() {
    let dir = scratch_dir("lang-runtimes");
    let out = bulwark("python", &["-c", "print(1)"], b"", &dir);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("python.wasm") && err.contains("make runtimes"),
        "{err}"
    );

    // A module that is not the pinned build is never run, whatever it is.
    std::fs::copy(built("runtimes/quickjs.wasm"), dir.join("python.wasm"))
        .unwrap_or_else(|e| panic!("cannot copy: {e}"));
    let out = bulwark("python", &["-c", "print(1)"], b"", &dir);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("is not the pinned build")
            && err.contains("e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"),
        "{err}"
    );
    assert_eq!(stdout(&out), "", "nothing ran");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_script_that_cannot_be_read_is_refused_before_any_call() {
    let out = bulwark(
        "js",
        &["--json", "/nonexistent/bulwark-test.js"],
        b"",
        &runtimes(),
    );
    assert_eq!(out.status.code(), Some(125));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("--json printed no object ({e}): {}", stdout(&out)));
    assert_eq!(json["exit_code"], 125);
    let error = json["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot read the script /nonexistent/bulwark-test.js"),
        "{json}"
    );
}

/// A pinned runtime is compiled once per machine on its own clock: with an empty compile cache,
/// `bulwark js --timeout 400ms` compiles QuickJS (1.4 MB of Wasm: over a second on two cores)
/// and then runs the call, while `bulwark run` of the same module gives up when its 400 ms
/// call deadline, which includes compiling, passes.
#[test]
fn a_pinned_runtime_compiles_outside_the_call_timeout() {
    if !kvm_available() {
        return;
    }
    let runtimes = runtimes();
    let fresh = |name: &str| scratch_dir(name).join("cache");
    let out = Command::new(bulwark_binary())
        .args(["js", "--timeout", "400ms", "-e", "console.log(6 * 7)"])
        .env("BULWARK_CACHE_DIR", fresh("lang-own-clock-js"))
        .env("BULWARK_RUNTIMES", &runtimes)
        .env("BULWARK_GUEST", guest_image())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42\n");
    let out = Command::new(bulwark_binary())
        .args(["run", "--timeout", "400ms"])
        .arg(runtimes.join("quickjs.wasm"))
        .args(["--std", "-e", "console.log(6 * 7)"])
        .env("BULWARK_CACHE_DIR", fresh("lang-own-clock-run"))
        .env("BULWARK_GUEST", guest_image())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("took too long"), "{}", stderr(&out));
}
