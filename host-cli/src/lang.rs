//! `bulwark python` and `bulwark js`: run code, not only modules.
//!
//! Each is `bulwark run` of a pinned language runtime (CPython's `python.wasm`, QuickJS-NG's
//! `quickjs.wasm`, both from `images/runtimes.txt`) with the argv that runtime expects. The
//! runtime is found beside the executable (or in `$BULWARK_RUNTIMES`) and its SHA-256 checked
//! against the pinned digest before every call. The guest sees only shared directories, so a
//! script file that is not inside a `--dir` travels as an extra in-memory directory at
//! [`SCRIPT_DIR`] holding just that file, never written back.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bulwark_proto::call::MAX_SHARED_DIRS;
use bulwark_proto::tree::{self, Entry, Node, SharedDir};

use crate::call::CallSpec;
use crate::cli::{JsArgs, PythonArgs, RunArgs, RunOptions};
use crate::compile::{ReadError, hex, read_regular_file};
use crate::dirs::DirSpec;

/// The runtime manifest, pinned at build time.
const MANIFEST: &str = include_str!("../../images/runtimes.txt");

/// Environment variable naming the directory that holds the runtimes (default: `runtimes/`
/// beside the executable, else `build/runtimes/` of the checkout it was built in).
pub const RUNTIMES_ENV: &str = "BULWARK_RUNTIMES";

/// Where a script that is not inside a `--dir` is shared with the program.
pub const SCRIPT_DIR: &str = "/script";

/// Largest script (or program read with `-` for JavaScript) carried this way; larger programs
/// belong in a `--dir`.
pub const MAX_SCRIPT: u64 = 4 << 20;

/// The name a JavaScript program read from standard input gets in [`SCRIPT_DIR`].
const STDIN_JS: &str = "stdin.js";

/// A language front-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// CPython 3.12 (`python.wasm`).
    Python,
    /// QuickJS-NG (`quickjs.wasm`, the `qjs` command).
    Js,
}

impl Lang {
    /// The runtime's file name in `build/runtimes/` and in the manifest.
    fn runtime(self) -> &'static str {
        match self {
            Lang::Python => "python.wasm",
            Lang::Js => "quickjs.wasm",
        }
    }

    /// The script file name used when the host's cannot be a guest file name.
    fn fallback_name(self) -> &'static str {
        match self {
            Lang::Python => "script.py",
            Lang::Js => "script.js",
        }
    }
}

/// Where the program comes from, as the command line gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// `-c CODE` / `-e CODE`.
    Code(String),
    /// A script file on this host.
    Script(PathBuf),
    /// `-`: standard input.
    Stdin,
}

/// The program as the runtime is told about it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Program {
    /// Code on the command line.
    Code(String),
    /// A file at this guest path.
    File(String),
    /// The runtime reads the program from its standard input (CPython's `-`).
    Stdin,
}

/// Runs `bulwark python`.
pub fn python(args: PythonArgs) -> ExitCode {
    run(Lang::Python, args.code, args.program, args.opts)
}

/// Runs `bulwark js`.
pub fn js(args: JsArgs) -> ExitCode {
    run(Lang::Js, args.code, args.program, args.opts)
}

fn run(lang: Lang, code: Option<String>, positional: Vec<String>, opts: RunOptions) -> ExitCode {
    match prepare(lang, code, positional, opts) {
        Ok(args) => crate::run::run(&args),
        Err((json, e)) => {
            if json {
                let obj = serde_json::json!({
                    "exit_code": crate::run::code::BULWARK,
                    "error": format!("{e:#}"),
                });
                println!("{obj}");
            } else {
                eprintln!("bulwark: {e:#}");
            }
            ExitCode::from(crate::run::code::BULWARK)
        }
    }
}

/// The `bulwark run` call that runs the program: the checked runtime, its argv, and the script's
/// directory when it needs one. The error carries whether `--json` was asked for.
fn prepare(
    lang: Lang,
    code: Option<String>,
    positional: Vec<String>,
    opts: RunOptions,
) -> Result<RunArgs, (bool, anyhow::Error)> {
    let json = opts.json;
    let (source, args) = split_source(code, positional).map_err(|e| (json, e))?;
    let runtime = locate(lang.runtime()).map_err(|e| (json, e))?;
    let pinned = pinned(lang.runtime()).map_err(|e| (json, e))?;
    let (program, extra) =
        place(lang, &source, &opts.dirs, opts.max_dir_size).map_err(|e| (json, e))?;
    Ok(RunArgs {
        module: runtime,
        args: argv(lang, &program, &args),
        opts,
        trust: Vec::new(),
        policy: None,
        extra_dirs: extra.into_iter().collect(),
        pinned_sha256: Some(pinned),
    })
}

/// A call that runs `code` (Python's `-c CODE`, JavaScript's `-e CODE`) in `lang`'s pinned
/// runtime with `args` after it: what the server and the MCP server run for a language call.
pub fn code_spec(lang: Lang, code: String, args: &[String]) -> anyhow::Result<CallSpec> {
    let mut spec = CallSpec::new(locate(lang.runtime())?);
    spec.args = argv(lang, &Program::Code(code), args);
    spec.pinned_sha256 = Some(pinned(lang.runtime())?);
    Ok(spec)
}

/// Whether `lang`'s runtime is on this machine.
pub fn available(lang: Lang) -> bool {
    locate(lang.runtime()).is_ok()
}

/// Splits the command line into the program's source and its arguments. Clap already made sure
/// that there is `-c`/`-e` CODE or at least one positional.
fn split_source(
    code: Option<String>,
    mut positional: Vec<String>,
) -> anyhow::Result<(Source, Vec<String>)> {
    if let Some(code) = code {
        return Ok((Source::Code(code), positional));
    }
    if positional.is_empty() {
        bail!("give the program: -c/-e CODE, a SCRIPT file, or - to read it from standard input");
    }
    let first = positional.remove(0);
    let source = if first == "-" {
        Source::Stdin
    } else {
        Source::Script(PathBuf::from(first))
    };
    Ok((source, positional))
}

/// The runtime's argv after `argv[0]` (which `bulwark run` sets to its file name).
fn argv(lang: Lang, program: &Program, args: &[String]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    match lang {
        // CPython stops reading its own options at -c CODE, a script or `-`: what follows is
        // sys.argv[1:] whatever it looks like.
        Lang::Python => match program {
            Program::Code(code) => v.extend(["-c".to_owned(), code.clone()]),
            Program::File(path) => v.push(path.clone()),
            Program::Stdin => v.push("-".to_owned()),
        },
        // qjs reads options until `--` or the script: after -e CODE it would go on reading
        // them, so `--` always ends them (it is not passed on to scriptArgs).
        Lang::Js => {
            v.push("--std".to_owned());
            match program {
                Program::Code(code) => {
                    v.extend(["-e".to_owned(), code.clone(), "--".to_owned()]);
                }
                Program::File(path) => v.extend(["--".to_owned(), path.clone()]),
                // `place` turns a JavaScript program from stdin into a file.
                Program::Stdin => v.extend(["--".to_owned(), format!("{SCRIPT_DIR}/{STDIN_JS}")]),
            }
        }
    }
    v.extend(args.iter().cloned());
    v
}

/// Where the program is for the runtime, and the extra directory that carries it if any.
fn place(
    lang: Lang,
    source: &Source,
    dirs: &[DirSpec],
    max_dir_size: u64,
) -> anyhow::Result<(Program, Option<SharedDir>)> {
    let (name, bytes) = match (source, lang) {
        (Source::Code(code), _) => return Ok((Program::Code(code.clone()), None)),
        (Source::Stdin, Lang::Python) => return Ok((Program::Stdin, None)),
        (Source::Stdin, Lang::Js) => (STDIN_JS.to_owned(), read_stdin_program()?),
        (Source::Script(path), _) => {
            if let Some(guest) = in_shared_dir(path, dirs) {
                return Ok((Program::File(guest), None));
            }
            (script_name(path, lang), read_script(path)?)
        }
    };
    if let Some(clash) = dirs
        .iter()
        .find(|d| d.guest.trim_end_matches('/') == SCRIPT_DIR)
    {
        bail!(
            "--dir {}::{} is where the script goes ({SCRIPT_DIR}): share that directory under another guest path, or put the script inside a --dir",
            clash.host.display(),
            clash.guest
        );
    }
    if dirs.len() >= MAX_SHARED_DIRS {
        bail!(
            "{} --dir directories and the script's {SCRIPT_DIR} are over the limit of {MAX_SHARED_DIRS} a call may share",
            dirs.len()
        );
    }
    if bytes.len() as u64 > max_dir_size {
        bail!(
            "the script is {} bytes, over --max-dir-size {max_dir_size} (it counts against it)",
            bytes.len()
        );
    }
    let guest = format!("{SCRIPT_DIR}/{name}");
    let dir = SharedDir {
        guest_path: SCRIPT_DIR.to_owned(),
        entries: vec![Entry {
            path: name,
            node: Node::File(bytes),
        }],
    };
    Ok((Program::File(guest), Some(dir)))
}

/// The guest path of `script` when it lies inside a `--dir` HOST shared at an absolute guest
/// path (the runtime then runs it from there, next to its own modules and data).
fn in_shared_dir(script: &Path, dirs: &[DirSpec]) -> Option<String> {
    let script = std::fs::canonicalize(script).ok()?;
    dirs.iter().find_map(|spec| {
        if !spec.guest.starts_with('/') {
            return None;
        }
        let host = std::fs::canonicalize(&spec.host).ok()?;
        let rel = script.strip_prefix(&host).ok()?;
        let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
        let rel = parts?.join("/");
        tree::check_path(&rel).ok()?;
        Some(format!("{}/{rel}", spec.guest.trim_end_matches('/')))
    })
}

/// The script's name in [`SCRIPT_DIR`]: its own file name when that can be a guest file name.
fn script_name(script: &Path, lang: Lang) -> String {
    script
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.contains('/') && tree::check_path(n).is_ok())
        .map_or_else(|| lang.fallback_name().to_owned(), str::to_owned)
}

/// The script's bytes, at most [`MAX_SCRIPT`].
fn read_script(script: &Path) -> anyhow::Result<Vec<u8>> {
    read_regular_file(script, MAX_SCRIPT).map_err(|e| match e {
        ReadError::TooLarge { .. } => anyhow::anyhow!(
            "the script {} is over the {} MiB a script may be: put it in a --dir and run it from there",
            script.display(),
            MAX_SCRIPT >> 20
        ),
        e => anyhow::anyhow!("cannot read the script {}: {e}", script.display()),
    })
}

/// A program given as `-`, read from standard input (at most [`MAX_SCRIPT`] bytes); the tool's
/// own standard input is then empty.
fn read_stdin_program() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("bulwark: reading the program from standard input (end it with Ctrl-D)");
    }
    let mut bytes = Vec::new();
    stdin
        .lock()
        .take(MAX_SCRIPT + 1)
        .read_to_end(&mut bytes)
        .context("cannot read the program from standard input")?;
    if bytes.len() as u64 > MAX_SCRIPT {
        bail!(
            "the program on standard input is over the {} MiB a script may be: put it in a --dir",
            MAX_SCRIPT >> 20
        );
    }
    Ok(bytes)
}

/// The runtime files the manifest pins: (name in `build/runtimes/`, SHA-256).
fn parse_manifest(text: &str) -> Result<Vec<(String, [u8; 32])>, String> {
    let mut files = Vec::new();
    let mut wheel = false;
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => {}
            [first, ..] if first.starts_with('#') => {}
            ["wheel", _, _, _, _] => wheel = true,
            ["file", _, name, sha] if wheel => {
                let digest = parse_sha256(sha)
                    .ok_or_else(|| format!("line {}: `{sha}` is not a SHA-256", i + 1))?;
                files.push(((*name).to_owned(), digest));
            }
            _ => return Err(format!("line {}: malformed: {line}", i + 1)),
        }
    }
    Ok(files)
}

/// 64 lower-case hex digits as 32 bytes.
fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 `images/runtimes.txt` pins for the runtime file `name`.
fn pinned(name: &str) -> anyhow::Result<[u8; 32]> {
    let files = parse_manifest(MANIFEST)
        .map_err(|e| anyhow::anyhow!("images/runtimes.txt (built in): {e}"))?;
    files
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, digest)| digest)
        .with_context(|| format!("images/runtimes.txt (built in) pins no {name}"))
}

/// What to run to get the runtimes.
const GET_RUNTIMES: &str =
    "run `make runtimes` (images/runtimes.sh: it fetches the pinned runtimes into build/runtimes)";

/// The runtime file `name`: in `$BULWARK_RUNTIMES`, else `runtimes/` beside the executable,
/// else `build/runtimes/` of the checkout whose `target/<profile>/` holds the executable.
fn locate(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(RUNTIMES_ENV) {
        let path = PathBuf::from(dir).join(name);
        if !path.is_file() {
            bail!(
                "{RUNTIMES_ENV} names no {name}: {} is not a file; {GET_RUNTIMES}, or set {RUNTIMES_ENV} to that directory",
                path.display()
            );
        }
        return Ok(path);
    }
    crate::vm::beside_executable(&Path::new("runtimes").join(name))?.map_err(|[a, b]| {
        anyhow::anyhow!(
            "cannot find the runtime {name} (looked in {} and {}); {GET_RUNTIMES}, or set {RUNTIMES_ENV} to a directory holding it",
            a.display(),
            b.display()
        )
    })
}

/// Checks that the runtime at `path`, whose SHA-256 is `actual`, is the pinned build
/// `pinned`. `bulwark run` calls this once it has the module's digest (remembered per file, so
/// a cached call does not hash the 26 MB CPython again).
pub fn check_runtime(path: &Path, actual: &[u8; 32], pinned: &[u8; 32]) -> anyhow::Result<()> {
    if actual != pinned {
        bail!(
            "the runtime {} is not the pinned build: its SHA-256 is {}, images/runtimes.txt pins {}; {GET_RUNTIMES}",
            path.display(),
            hex(actual),
            hex(pinned)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_built_in_manifest_pins_both_runtimes() {
        let files = parse_manifest(MANIFEST).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["python.wasm", "quickjs.wasm"]);
        assert_eq!(
            hex(&pinned("python.wasm").unwrap()),
            "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
        );
        assert!(pinned("ruby.wasm").is_err());
    }

    #[test]
    fn a_malformed_manifest_is_refused() {
        let wheel = "wheel p 1 p.whl ".to_owned() + &"ab".repeat(32) + "\n";
        let good = format!("# c\n\n{wheel}file bin/x.wasm x.wasm {}\n", "0f".repeat(32));
        let files = parse_manifest(&good).unwrap();
        assert_eq!(files, [("x.wasm".to_owned(), [0x0f; 32])]);
        for bad in [
            format!("{wheel}file bin/x.wasm x.wasm {}\n", "0F".repeat(32)),
            format!("{wheel}file bin/x.wasm x.wasm {}\n", "0f".repeat(31)),
            format!("{wheel}file bin/x.wasm x.wasm\n"),
            format!("file bin/x.wasm x.wasm {}\n", "0f".repeat(32)),
            "binary x\n".to_owned(),
        ] {
            assert!(parse_manifest(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_gets_the_argv_python_takes() {
        let args = strings(&["a", "-x", "--y"]);
        assert_eq!(
            argv(Lang::Python, &Program::Code("print(1)".into()), &args),
            strings(&["-c", "print(1)", "a", "-x", "--y"])
        );
        assert_eq!(
            argv(Lang::Python, &Program::File("/script/t.py".into()), &args),
            strings(&["/script/t.py", "a", "-x", "--y"])
        );
        assert_eq!(argv(Lang::Python, &Program::Stdin, &[]), strings(&["-"]));
    }

    #[test]
    fn qjs_gets_std_and_its_options_ended() {
        let args = strings(&["-x"]);
        assert_eq!(
            argv(Lang::Js, &Program::Code("1".into()), &args),
            strings(&["--std", "-e", "1", "--", "-x"])
        );
        assert_eq!(
            argv(Lang::Js, &Program::File("/w/t.js".into()), &args),
            strings(&["--std", "--", "/w/t.js", "-x"])
        );
        assert_eq!(
            argv(Lang::Js, &Program::Stdin, &[]),
            strings(&["--std", "--", "/script/stdin.js"])
        );
    }

    #[test]
    fn the_command_line_splits_into_source_and_arguments() {
        assert_eq!(
            split_source(Some("x".into()), strings(&["a"])).unwrap(),
            (Source::Code("x".into()), strings(&["a"]))
        );
        assert_eq!(
            split_source(None, strings(&["-", "a"])).unwrap(),
            (Source::Stdin, strings(&["a"]))
        );
        assert_eq!(
            split_source(None, strings(&["t.py", "-c", "b"])).unwrap(),
            (Source::Script("t.py".into()), strings(&["-c", "b"]))
        );
        assert!(split_source(None, Vec::new()).is_err());
    }

    /// A scratch directory for one test, removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("bulwark-lang-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("sub")).unwrap();
            Self(dir)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec(host: &Path, guest: &str) -> DirSpec {
        DirSpec {
            host: host.to_owned(),
            guest: guest.to_owned(),
        }
    }

    #[test]
    fn a_script_inside_a_dir_runs_from_there_and_any_other_is_carried() {
        let tmp = Tmp::new("place");
        let script = tmp.0.join("sub/tool.py");
        std::fs::write(&script, "print(1)\n").unwrap();
        let source = Source::Script(script.clone());

        let inside = [spec(&tmp.0, "/work/")];
        let (program, extra) = place(Lang::Python, &source, &inside, 1 << 20).unwrap();
        assert_eq!(program, Program::File("/work/sub/tool.py".into()));
        assert!(extra.is_none());

        // A relative guest path has no fixed place to name the script by: it is carried.
        let elsewhere = [spec(&tmp.0, "data")];
        let (program, extra) = place(Lang::Python, &source, &elsewhere, 1 << 20).unwrap();
        assert_eq!(program, Program::File("/script/tool.py".into()));
        let extra = extra.unwrap();
        assert_eq!(extra.guest_path, "/script");
        assert_eq!(
            extra.entries,
            [Entry {
                path: "tool.py".into(),
                node: Node::File(b"print(1)\n".to_vec())
            }]
        );

        let clash = [spec(&tmp.0.join("sub"), "/script")];
        let tmp2 = Tmp::new("place-other");
        let other = tmp2.0.join("t.py");
        std::fs::write(&other, "").unwrap();
        let e = place(
            Lang::Python,
            &Source::Script(other.clone()),
            &clash,
            1 << 20,
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("is where the script goes"));

        let e = place(Lang::Python, &Source::Script(script), &[], 4).unwrap_err();
        assert!(format!("{e:#}").contains("over --max-dir-size 4"), "{e:#}");
        let e = place(
            Lang::Js,
            &Source::Script(tmp.0.join("none.js")),
            &[],
            1 << 20,
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("cannot read the script"));
        let e = place(Lang::Js, &Source::Script(tmp.0.join("sub")), &[], 1 << 20);
        assert!(e.is_err(), "a directory is not a script");
    }

    #[test]
    fn a_wrong_runtime_is_refused_with_what_to_run() {
        let path = Path::new("runtimes/python.wasm");
        let digest: [u8; 32] = Sha256::digest(b"\0asm").into();
        let e = check_runtime(path, &digest, &[0; 32]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("not the pinned build") && msg.contains("make runtimes"),
            "{msg}"
        );
        assert!(check_runtime(path, &digest, &digest).is_ok());
    }
}
