//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Bulwark runs untrusted WebAssembly tools inside KVM micro-VMs: wasmtime's sandbox inside a
/// guest with no kernel, behind hardware virtualization.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Precompile a WebAssembly module (.wasm or .wat) for the Bulwark guest.
    ///
    /// The output is a wasmtime artifact for target x86_64-unknown-none with Bulwark's engine
    /// settings; only the guest loads it. The same input always gives the same bytes.
    Compile(CompileArgs),
    /// Run a WASI command module (.wasm or .wat) in a fresh Bulwark micro-VM.
    ///
    /// The module is compiled (once: artifacts are cached by module and engine digest) in a
    /// separate process, then runs inside wasmtime inside a KVM guest with no kernel. The tool's
    /// stdout and stderr become ours, printed as the tool writes them (with --json, in the one
    /// object at the end), standard input is passed through, and bulwark exits with the tool's
    /// exit code.
    #[command(after_help = RUN_EXIT_CODES)]
    Run(RunArgs),
    /// Run Python code (CPython 3.12) in a fresh Bulwark micro-VM: `-c CODE`, a script file, or
    /// `-` for a program on standard input, as `python` takes them.
    ///
    /// The runtime is the pinned CPython WASI build of images/runtimes.txt
    /// (build/runtimes/python.wasm, or $BULWARK_RUNTIMES/python.wasm), checked against its pinned SHA-256
    /// before every call; this is `bulwark run python.wasm` with the same options. A SCRIPT
    /// inside a --dir runs from there (its guest path; modules next to it import); any other
    /// is shared read-only at /script/NAME. Standard input goes to the program, except with `-`.
    /// An uncaught exception prints its traceback on stderr and exits 1. Pure-Python packages
    /// import from a --dir on PYTHONPATH: `--dir ./lib::/lib --env PYTHONPATH=/lib`.
    #[command(
        override_usage = "bulwark python [OPTIONS] -c CODE [ARGS]...\n       bulwark python [OPTIONS] <SCRIPT | -> [ARGS]...",
        after_help = LANG_EXIT_CODES
    )]
    Python(PythonArgs),
    /// Run JavaScript (QuickJS-NG 0.11) in a fresh Bulwark micro-VM: `-e CODE`, a script file,
    /// or `-` for a program on standard input.
    ///
    /// The runtime is the pinned QuickJS-NG WASI build of images/runtimes.txt
    /// (build/runtimes/quickjs.wasm, or $BULWARK_RUNTIMES/quickjs.wasm), checked against its pinned SHA-256
    /// before every call; it runs as `qjs --std`, so `std` and `os` are there, and `scriptArgs`
    /// holds the script's path and then ARGS (just ARGS with -e). A script with `import` or
    /// `export`, or named .mjs, is a module. A SCRIPT inside a --dir runs from there; any other
    /// (or the program read with `-`, as /script/stdin.js) is shared read-only at /script/NAME.
    /// An uncaught exception prints the error and its stack on stderr and exits 1.
    #[command(
        override_usage = "bulwark js [OPTIONS] -e CODE [ARGS]...\n       bulwark js [OPTIONS] <SCRIPT | -> [ARGS]...",
        after_help = LANG_EXIT_CODES
    )]
    Js(JsArgs),
    /// Serve tool calls over HTTP: a Unix socket by default (mode 0600), TCP only with a bearer
    /// token. Keeps VMs booted ahead of calls (a warm pool); each VM serves one call (with
    /// --reuse, calls of one tenant and module may share a VM, reset between them).
    ///
    /// Endpoints: POST /v1/modules (upload a module, get its digest; it is compiled once),
    /// POST /v1/runs (run a module by digest or inline, or Python/JavaScript code), GET /v1/health,
    /// GET /v1/pool, GET /v1/openapi.json. Ctrl-C or SIGTERM stops taking calls and finishes the
    /// ones in flight; a second one cancels them.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(ServeArgs),
    /// Serve tools to an AI agent over the Model Context Protocol (stdio): run_python,
    /// run_javascript (when those runtimes are present) and one tool per registered module.
    ///
    /// A module is registered by a manifest beside it, `NAME.tool.json`: {"name", "description",
    /// "input_schema"} (NAME in [a-zA-Z0-9_-], 1 to 64 characters; the schema an object schema);
    /// its input arrives as JSON on the tool's standard input. A bad manifest stops the server
    /// before it starts. Every call runs in a fresh micro-VM with `bulwark run`'s default limits
    /// and --timeout; its result is the output as text plus structuredContent (exit_code,
    /// outcome, stdout, stderr, output_truncated), and isError unless the tool exited 0.
    /// Standard output carries only the protocol; messages go to standard error.
    Mcp(McpArgs),
    /// Check this host: /dev/kvm, which KVM is behind it, the VMM and guest image, the compile
    /// cache, and a real VM boot. Says what to fix; exits 1 if anything fails.
    Doctor {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make an Ed25519 key pair for signing modules.
    ///
    /// Writes the secret key (mode 0600; keep it private) and the public key, each in the
    /// WebAssembly tool-conventions serialization that `wasmsign2` uses too: 0x81, seed, public
    /// key (65 bytes) and 0x01, public key (33 bytes). Neither file is ever overwritten: if one
    /// exists, nothing is written. Prints the key id and the public key in hex (for a policy
    /// file's `trust-key` line).
    Keygen(KeygenArgs),
    /// Sign a WebAssembly binary module: writes a signed copy.
    ///
    /// The signature goes into a custom section named `signature` at the start of the module,
    /// in the WebAssembly tool-conventions signature format (what `wasmsign2` reads and
    /// writes): Ed25519 over the SHA-256 of everything after that section. The rest of the
    /// module is unchanged, so the copy runs anywhere the original did. Signing an already
    /// signed module adds a signature. The copy is written to a temporary file and renamed over
    /// --output. WebAssembly text (.wat) cannot carry a signature section: convert it to binary
    /// first.
    Sign(SignArgs),
    /// Check a module's signature against trusted public keys, and its SHA-256 against the
    /// digests a policy pins.
    ///
    /// Prints which trusted key verified the module, and its SHA-256; exits 0. A module that
    /// `bulwark run` with the same --trust/--policy would refuse is refused here too, with the
    /// same message, and exit code 123; keys, policy or module that cannot be read exit 1.
    #[command(after_help = crate::policy::SYNTAX)]
    Verify(VerifyArgs),
}

/// Arguments of `bulwark keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the secret key (created with mode 0600; must not exist).
    #[arg(short = 'k', long, value_name = "FILE")]
    pub secret_key: PathBuf,

    /// Where to write the public key (must not exist).
    #[arg(short = 'K', long, value_name = "FILE")]
    pub public_key: PathBuf,

    /// Print one JSON object instead of sentences.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bulwark sign`.
#[derive(Args, Debug)]
pub struct SignArgs {
    /// The module to sign: binary WebAssembly (.wasm).
    pub module: PathBuf,

    /// The secret key file (`bulwark keygen -k`; PEM and DER Ed25519 keys work too).
    #[arg(short = 'k', long, value_name = "FILE")]
    pub secret_key: PathBuf,

    /// Where to write the signed module (replaced atomically; may be the input itself).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bulwark verify`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("trusted").required(true).multiple(true).args(["trust", "policy"])))]
pub struct VerifyArgs {
    /// The module to check.
    pub module: PathBuf,

    /// A trusted public key file (repeatable: a signature by any one of them will do).
    #[arg(long = "trust", value_name = "PUBLIC_KEY")]
    pub trust: Vec<PathBuf>,

    /// A policy file: trusted keys and pinned SHA-256 digests (syntax below).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Print one JSON object: ok, sha256, pinned, signatures, verified_by or error.
    #[arg(long)]
    pub json: bool,
}

/// Exit codes of `bulwark run`, also in its `--help`.
pub const RUN_EXIT_CODES: &str = "\
Exit codes:
  0-255  the tool's own exit code (proc_exit(n), or 0 when _start returns)
  255    also: the tool exited with a code outside 0-255 (proc_exit takes a u32: 256 and
         up, or a negative i32); --json `exit` has the exact code as a signed 32-bit number
  123    refused by --trust/--policy before anything was compiled: the module is not
         signed, not signed by a trusted key, changed since it was signed, or its SHA-256
         is not pinned (the message says which, and what to do)
  124    the --timeout ran out (it bounds the whole call, compilation included); the
         compiler or the VM was killed
  125    Bulwark failed or refused the call (bad --dir or limits, the VM could not start
         or crashed, a bad answer from the VM, the guest agent itself failed, a --dir
         write-back failed)
  126    the module cannot run, and none of it ran (not WebAssembly, compile error,
         unknown import, no _start, memories or tables over --max-memory or the store's
         caps, an artifact the VM cannot load); also a request the guest agent refuses
         (over one of its limits, or a guest image of another protocol version)
  130    interrupted by Ctrl-C, SIGTERM or SIGHUP; the VM was killed
  134    the tool trapped or ran out of fuel (message on stderr)
A tool may itself exit with 123-126, 130, 134 or 255; --json tells the cases apart.";

/// Exit codes of `bulwark python` and `bulwark js`, also in their `--help`.
pub const LANG_EXIT_CODES: &str = "\
Exit codes: those of `bulwark run --help`. The program's own: 0, 1 for an uncaught exception,
or what it passed to sys.exit() / std.exit(). Also 125: the script cannot be read, or the
runtime is missing or not the build images/runtimes.txt pins (run `make runtimes`).";

/// Arguments of `bulwark python`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["code", "program"])))]
pub struct PythonArgs {
    /// Run CODE, as `python -c CODE`: every positional argument then goes to `sys.argv[1:]`
    /// (`sys.argv[0]` is `-c`).
    #[arg(short = 'c', value_name = "CODE", allow_hyphen_values = true)]
    pub code: Option<String>,

    /// The program, SCRIPT (a file on this host) or `-` (read from standard input), then its
    /// arguments (`sys.argv[1:]`).
    #[arg(
        value_name = "PROGRAM",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub program: Vec<String>,

    /// The options of `bulwark run`.
    #[command(flatten)]
    pub opts: RunOptions,
}

/// Arguments of `bulwark js`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["code", "program"])))]
pub struct JsArgs {
    /// Evaluate CODE, as `qjs -e CODE`: every positional argument then goes to `scriptArgs`.
    #[arg(
        short = 'e',
        long = "eval",
        value_name = "CODE",
        allow_hyphen_values = true
    )]
    pub code: Option<String>,

    /// The program, SCRIPT (a file on this host) or `-` (read from standard input), then its
    /// arguments (`scriptArgs.slice(1)`).
    #[arg(
        value_name = "PROGRAM",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub program: Vec<String>,

    /// The options of `bulwark run`.
    #[command(flatten)]
    pub opts: RunOptions,
}

/// Arguments of `bulwark run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The module: binary WebAssembly or the text format.
    pub module: PathBuf,

    /// Arguments for the tool (`argv[1..]`; `argv[0]` is the module's file name).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,

    /// The options `bulwark python` and `bulwark js` share (read through `Deref`, so
    /// `args.timeout` works as if they were fields here).
    #[command(flatten)]
    pub opts: RunOptions,

    /// Run the module only if it is signed by this public key (repeatable: a signature by any
    /// one of them will do; see `bulwark keygen`, `bulwark sign`). An unsigned or wrongly
    /// signed module, or one changed after signing, is refused before it is compiled (exit
    /// 123). WebAssembly text (.wat) cannot carry a signature, so it is refused too.
    #[arg(long = "trust", value_name = "PUBLIC_KEY")]
    pub trust: Vec<PathBuf>,

    /// Run the module only if this policy file allows it: signed by one of its trusted keys
    /// (and --trust keys), if it names any, and with one of its pinned SHA-256 digests, if it
    /// pins any. Refused modules exit 123 before they are compiled. Syntax: `bulwark verify
    /// --help`.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Directories shared with the tool besides the `--dir` ones, made in memory by
    /// `bulwark python` and `bulwark js` (the script file): shared after the `--dir` ones and
    /// never written back anywhere.
    #[arg(skip)]
    pub extra_dirs: Vec<bulwark_proto::tree::SharedDir>,

    /// The SHA-256 the module must have (`bulwark python` and `bulwark js`: the pinned
    /// runtime); checked before anything compiles or runs.
    #[arg(skip)]
    pub pinned_sha256: Option<[u8; 32]>,
}

impl std::ops::Deref for RunArgs {
    type Target = RunOptions;

    fn deref(&self) -> &RunOptions {
        &self.opts
    }
}

/// The options of a tool call that `bulwark run`, `bulwark python` and `bulwark js` share:
/// directories, environment, limits, output and isolation.
#[derive(Args, Debug, Clone)]
pub struct RunOptions {
    /// Share a host directory with the tool, seen by it as GUEST (repeatable, at most 64 times;
    /// GUEST defaults to HOST). The tool works on a copy in the VM's memory; when it exits with code 0, its
    /// changes (new, changed and removed files, directories and symbolic links) are written
    /// back, each file and link atomically. On any other outcome the host directory is left
    /// untouched. A symbolic link is carried as a link, never followed, when its relative target
    /// stays inside HOST; one that points outside HOST or at an absolute path is refused, going in
    /// and coming back. Sockets, FIFOs and devices in HOST are refused.
    #[arg(long = "dir", value_name = "HOST::GUEST", value_parser = crate::dirs::parse_dir)]
    pub dirs: Vec<crate::dirs::DirSpec>,

    /// Most bytes of file data in all --dir directories together, going in and coming back.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_dir_size: u64,

    /// Most files and directories in all --dir directories together.
    #[arg(long, value_name = "N", default_value_t = crate::dirs::DEFAULT_MAX_ENTRIES)]
    pub max_dir_files: u32,

    /// Set an environment variable for the tool (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// Wall-clock limit for the whole call, e.g. 500ms, 10s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    /// Run with this much fuel (roughly, Wasm instructions); out of fuel is a trap. The module
    /// is then compiled (and cached) with fuel metering, apart from its faster unmetered
    /// artifact that calls without --fuel use.
    #[arg(long, value_name = "N")]
    pub fuel: Option<u64>,

    /// Most Wasm linear memory, all the tool's memories together, e.g. 64MiB.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_memory: u64,

    /// Most bytes kept of stdout, and of stderr; the rest is dropped with a warning.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_output: u64,

    /// Guest RAM of the VM, in MiB. By default it is sized from the call: --max-memory, the
    /// compiled module, standard input and the --dir copies, plus what the guest itself needs,
    /// so a tool can grow its memory to --max-memory as it can under --isolation wasm. RAM the
    /// tool does not touch costs the host nothing. Give a size to cap the VM; a size too small
    /// for the call is refused with the size it needs.
    #[arg(long, value_name = "MIB")]
    pub mem_mib: Option<u64>,

    /// Print one JSON object (outcome, stdout, stderr, timings in microseconds; in a VM also the
    /// VMM's peak RSS and KVM's counts of VM exits and page faults) instead of the tool's output.
    #[arg(long)]
    pub json: bool,

    /// Where the tool runs: `vm` (a KVM micro-VM) or `wasm` (wasmtime in this process, for hosts
    /// without /dev/kvm: only the Wasm sandbox isolates the tool; a warning says so on stderr).
    #[arg(long, value_enum, value_name = "KIND", default_value_t = Isolation::Vm)]
    pub isolation: Isolation,
}

/// What isolates a tool call.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Wasm sandbox inside a KVM micro-VM with no kernel: hardware isolation.
    Vm,
    /// Wasm sandbox only, in this process (wasmtime with wasmtime-wasi); no hardware isolation.
    /// For hosts without /dev/kvm.
    Wasm,
}

impl Isolation {
    /// The name used on the command line and in `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Vm => "vm",
            Isolation::Wasm => "wasm",
        }
    }
}

/// Parses `NAME=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

/// Parses a duration: a number with ms, s or m (plain numbers are seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 10s, 2m)"))?;
    let secs = value * scale;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "`{s}` is out of range (more than 0, at most a day)"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// Parses a size: a number with an optional K/KiB/M/MiB/G/GiB suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &t[digits.len()..];
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "k" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use KiB, MiB or GiB)"
            ));
        }
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 64MiB)"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_like_users_write_them() {
        assert_eq!(parse_duration("500ms").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("2m").unwrap().as_secs(), 120);
        assert_eq!(parse_duration("3").unwrap().as_secs(), 3);
        assert!(parse_duration("0s").is_err() && parse_duration("soon").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err() && parse_size("99999999999G").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err() && parse_env("novalue").is_err());
    }

    #[test]
    fn the_dir_help_states_the_shared_directory_limit() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let dir = run.get_arguments().find(|a| a.get_id() == "dirs").unwrap();
        let help = dir.get_help().unwrap().to_string();
        let limit = bulwark_proto::call::MAX_SHARED_DIRS;
        assert!(help.contains(&format!("at most {limit} times")), "{help}");
    }
}

/// Arguments of `bulwark compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The module: binary WebAssembly or the text format; `-` reads it from standard input.
    pub input: PathBuf,

    /// Where to write the precompiled artifact (replaced atomically); `-` writes it to
    /// standard output. With `- -o -` this is the confined compile worker `bulwark run` starts:
    /// no file system, no network, standard input, output and error only.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,

    /// What the artifact is for: `guest` (the Bulwark guest, the default) or `host`
    /// (`bulwark run --isolation wasm` on this machine).
    #[arg(long, value_enum, default_value_t = Target::Guest)]
    pub target: Target,

    /// Compile fuel metering in: the artifact is for calls with `bulwark run --fuel N`, and only
    /// for them. Without it (the default) the code carries no fuel instrumentation, which runs faster,
    /// and cannot be given a fuel budget. wasmtime refuses to load
    /// an artifact of one kind where the other is needed.
    #[arg(long)]
    pub fuel: bool,
}

/// Which engine an artifact is compiled for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The Bulwark guest (x86_64-unknown-none, the shared engine settings).
    Guest,
    /// wasmtime in the `bulwark` process on this machine (`--isolation wasm`).
    Host,
}

impl Target {
    /// The name used on the command line and in cache keys.
    pub fn name(self) -> &'static str {
        match self {
            Target::Guest => "guest",
            Target::Host => "host",
        }
    }
}

/// Examples printed after `bulwark serve --help`.
pub const SERVE_EXAMPLES: &str = "\
Examples:
  bulwark serve --socket /tmp/bulwark.sock &
  curl --unix-socket /tmp/bulwark.sock http://localhost/v1/health
  curl --unix-socket /tmp/bulwark.sock http://localhost/v1/runs \\
       -H 'content-type: application/json' \\
       -d '{\"language\": \"python\", \"code\": \"print(1+1)\"}'";

/// Arguments of `bulwark serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The Unix socket to listen on (created mode 0600; its directory must be ours and not
    /// writable by others). Default: $XDG_RUNTIME_DIR/bulwark.sock, else
    /// /tmp/bulwark-UID/bulwark.sock (UID: your user id).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub socket: Option<PathBuf>,

    /// Listen on TCP instead (such as 127.0.0.1:8088). Needs --token-file: every request must
    /// then carry `Authorization: Bearer <token>`.
    #[arg(long, value_name = "ADDR:PORT", requires = "token_file")]
    pub listen: Option<std::net::SocketAddr>,

    /// A file holding the bearer token for --listen (at least 32 characters; the file must not
    /// be readable by others).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Most calls running at once; one more is answered 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_concurrent: usize,

    /// Largest request body (a module upload, or a run with its inputs).
    #[arg(long, value_name = "SIZE", default_value = "96MiB", value_parser = parse_size)]
    pub max_body: u64,

    /// Most bytes the module store holds, uploaded modules (also `module_base64` runs) and
    /// their compiled forms together; beyond it the modules used least recently are forgotten
    /// (a call naming one is answered 404: upload it again).
    #[arg(long, value_name = "SIZE", default_value = "2GiB", value_parser = parse_size)]
    pub max_store: u64,

    /// Largest `timeout_ms` a call may ask for (a call asking more is refused, 400).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub max_timeout: std::time::Duration,

    /// Largest `max_memory` (linear memory) a call may ask for.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub max_memory: u64,

    /// Largest `max_output` (of stdout, and of stderr) a call may ask for.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_output: u64,

    /// Largest `max_files_size` (the call's /work, in and out) a call may ask for.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_files_size: u64,

    /// VMs kept booted ahead of calls of Wasm modules (0: each such call starts its own VM).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub pool: usize,

    /// VMs kept booted ahead of Python calls (`language: python`). Their heap is on huge pages:
    /// CPython touches tens of MiB.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub pool_python: usize,

    /// VMs kept booted ahead of JavaScript calls (`language: javascript`), on huge pages too.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub pool_javascript: usize,

    /// What backs the heap of the Wasm pool's VMs: `small` (4 KiB) pages start a call that
    /// touches little memory fastest (the first touch of a huge page zeroes 2 MiB); `huge`
    /// pages take fewer faults for a tool that touches much.
    #[arg(long, value_name = "PAGES", default_value = "small")]
    pub pool_pages: PoolPages,

    /// RAM of each pooled VM, in MiB; calls that need more start their own VM. Untouched RAM
    /// costs the host nothing.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub pool_mem_mib: u64,

    /// Let a call that names its `tenant` get a VM kept from an earlier call of the same
    /// tenant, module and memory size, reset to its snapshot in between (every page that call
    /// wrote, the vCPU and the devices). A VM is never kept after a trap, timeout, cut output or
    /// error. Off: every call gets a VM of its own.
    #[arg(long)]
    pub reuse: bool,

    /// With --reuse: most VMs kept idle for reuse, all tenants together; the oldest is killed
    /// beyond it.
    #[arg(long, value_name = "N", default_value_t = 8, requires = "reuse")]
    pub reuse_idle: usize,

    /// With --reuse: a VM kept idle longer than this is killed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, requires = "reuse")]
    pub reuse_ttl: std::time::Duration,

    /// With --reuse: a VM whose VMM holds more memory than this after its reset is killed
    /// instead of kept (a reset keeps the pages a call touched, zeroed, so that the next call
    /// does not pay their first touch: an idle kept VM would otherwise hold what its biggest
    /// call touched).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size, requires = "reuse")]
    pub reuse_max_rss: u64,
}

/// What backs the heap of pooled VMs (`bulwark serve --pool-pages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolPages {
    /// 4 KiB pages.
    Small,
    /// Transparent huge pages (2 MiB) where the kernel has them.
    Huge,
}

/// Arguments of `bulwark mcp`.
#[derive(Args, Debug)]
pub struct McpArgs {
    /// A directory of registered modules: each `NAME.wasm` (or .wat) with a `NAME.tool.json`
    /// manifest beside it becomes a tool (repeatable).
    #[arg(long = "tools", value_name = "DIR")]
    pub tools: Vec<PathBuf>,

    /// Wall-clock limit of each call.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    /// VMs kept booted ahead of calls of each runtime that has a tool (registered modules,
    /// Python, JavaScript): a call then skips the VM's start. Each VM still serves one call.
    /// 0: every call starts its own VM.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub pool: usize,
}
