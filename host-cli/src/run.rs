//! `bulwark run`: one tool call in a fresh micro-VM.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use bulwark_proto::call::{Artifact, Limits, Outcome, PROTOCOL_VERSION, Request, Response};

use crate::cli::{Isolation, RunArgs, Target};
use crate::compile::{hex, read_module, sha256};
use crate::dirs::{self, Budget, Changes};
use crate::{cache, interrupt, local, vm};

/// `bulwark run`'s own exit codes (see `cli::RUN_EXIT_CODES`).
pub mod code {
    /// The timeout ran out.
    pub const TIMEOUT: u8 = 124;
    /// Ctrl-C or SIGTERM stopped the call.
    pub const INTERRUPTED: u8 = 130;
    /// Bulwark failed.
    pub const BULWARK: u8 = 125;
    /// The module cannot run.
    pub const MODULE: u8 = 126;
    /// The tool trapped or ran out of fuel.
    pub const TRAP: u8 = 134;
}

/// Memory the guest needs besides the tool's linear memory (image, stack, heap bookkeeping,
/// artifact), in MiB.
const GUEST_OVERHEAD_MIB: u64 = 96;

/// Where the time went, in microseconds.
#[derive(Default)]
struct Timings {
    compile_us: u128,
    vm_start_us: u128,
    call_us: u128,
    total_us: u128,
}

/// What happened, for printing.
enum Result {
    /// The tool ran; for each `--dir`, what was written back (none unless it exited 0).
    Done(Response, Vec<Changes>),
    TimedOut,
    /// Ctrl-C or SIGTERM stopped the call.
    Interrupted,
    Failed(u8, String),
}

fn seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    seed
}

/// Most bytes of standard input a call carries.
pub const MAX_STDIN: u64 = 64 << 20;

/// All of standard input (none from a terminal), at most [`MAX_STDIN`] bytes.
fn stdin_bytes() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    let mut data = Vec::new();
    if !stdin.is_terminal() {
        stdin
            .lock()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut data)
            .context("cannot read standard input")?;
    }
    if data.len() as u64 > MAX_STDIN {
        anyhow::bail!(
            "standard input is over the {} MiB a call may carry; pass large data with --dir",
            MAX_STDIN >> 20
        );
    }
    Ok(data)
}

/// Runs `bulwark run`.
pub fn run(args: &RunArgs) -> ExitCode {
    let started = Instant::now();
    if args.isolation == Isolation::Wasm {
        eprintln!(
            "bulwark: warning: --isolation wasm: hardware isolation is OFF; the tool runs in this process with only the Wasm sandbox around it"
        );
    }
    // Ctrl-C and SIGTERM end the call; the VM and its files are cleaned up on the way out.
    interrupt::install();
    let mut timings = Timings::default();
    let result = call(args, started, &mut timings);
    timings.total_us = started.elapsed().as_micros();
    report(args, result, &timings)
}

fn call(args: &RunArgs, started: Instant, timings: &mut Timings) -> Result {
    let failed = |code, e: anyhow::Error| Result::Failed(code, format!("{e:#}"));
    // The shared directories' copy lives in guest RAM next to its copy in the request.
    let dirs_mib = if args.dirs.is_empty() {
        0
    } else {
        2 * args.max_dir_size.div_ceil(1 << 20)
    };
    let need_mib = args.max_memory.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB + dirs_mib;
    if args.isolation == Isolation::Vm && args.mem_mib < need_mib {
        return Result::Failed(
            code::BULWARK,
            format!(
                "--mem-mib {} cannot hold --max-memory {} MiB{} plus the guest: use --mem-mib {need_mib} or more",
                args.mem_mib,
                args.max_memory >> 20,
                if dirs_mib > 0 {
                    " and the --dir copies"
                } else {
                    ""
                },
            ),
        );
    }
    let answer_max = 2 * args.max_output + args.max_dir_size + (1 << 20);
    if answer_max > u64::from(bulwark_proto::frame::MAX_RESPONSE_FRAME) {
        return Result::Failed(
            code::BULWARK,
            format!(
                "twice --max-output plus --max-dir-size is over the {} MiB a call's answer may hold: lower them",
                bulwark_proto::frame::MAX_RESPONSE_FRAME >> 20
            ),
        );
    }
    let module = match read_module(&args.module) {
        Ok(m) => m,
        Err(e) => return failed(code::MODULE, e),
    };
    let shared = match dirs::read_all(&args.dirs, budget(args)) {
        Ok(s) => s,
        Err(e) => return failed(code::BULWARK, e),
    };
    let digest = sha256(&module);
    let target = match args.isolation {
        Isolation::Vm => Target::Guest,
        Isolation::Wasm => Target::Host,
    };
    let (artifact, _compiled) = match cache::artifact(&args.module, &hex(&digest), target) {
        Ok(a) => a,
        // Ctrl-C reaches the compiler process too.
        Err(_) if interrupt::requested() => return Result::Interrupted,
        Err(e) => return failed(code::MODULE, e),
    };
    timings.compile_us = started.elapsed().as_micros();
    let stdin = match stdin_bytes() {
        Ok(s) => s,
        Err(e) => return failed(code::BULWARK, e),
    };
    if args.isolation == Isolation::Wasm {
        return call_in_process(args, &artifact, shared, stdin, timings);
    }
    // The guest holds standard input twice while it reads the request.
    let need_mib = need_mib + 2 * (stdin.len() as u64).div_ceil(1 << 20);
    if args.mem_mib < need_mib {
        return Result::Failed(
            code::BULWARK,
            format!(
                "--mem-mib {} cannot hold this call's standard input as well: use --mem-mib {need_mib} or more",
                args.mem_mib
            ),
        );
    }
    let request = Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact::Inline {
            digest,
            bytes: artifact,
        },
        args: argv(args),
        env: args.env.clone(),
        stdin,
        dirs: shared,
        limits: limits(args),
        random_seed: seed(),
        realtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let vm_started = Instant::now();
    let deadline = vm_started + args.timeout;
    let mut vm = match vm::Vm::start(args.mem_mib, deadline) {
        Ok(vm) => vm,
        Err(e) => return failed(code::BULWARK, e),
    };
    timings.vm_start_us = vm_started.elapsed().as_micros();
    if interrupt::requested() {
        return Result::Interrupted;
    }
    let call_started = Instant::now();
    let outcome = vm.call(&request, deadline);
    timings.call_us = call_started.elapsed().as_micros();
    drop(vm);
    if interrupt::requested() {
        return Result::Interrupted;
    }
    match outcome {
        Ok(Some(mut response)) => {
            cap_output(&mut response, args.max_output);
            let after = std::mem::take(&mut response.dirs);
            finish(args, response, &request.dirs, after)
        }
        Ok(None) => Result::TimedOut,
        Err(e) => failed(code::BULWARK, e),
    }
}

/// The tool's argv: the module's file name, then the arguments.
fn argv(args: &RunArgs) -> Vec<String> {
    let program = args
        .module
        .file_name()
        .map_or_else(|| "tool".into(), |n| n.to_string_lossy().into_owned());
    std::iter::once(program)
        .chain(args.args.iter().cloned())
        .collect()
}

/// What `--max-dir-size` and `--max-dir-files` allow, for reading trees.
fn budget(args: &RunArgs) -> Budget {
    Budget {
        bytes: args.max_dir_size,
        entries: args.max_dir_files,
    }
}

/// Holds the guest's answer to `--max-output` on this side too: the answer is the guest's word,
/// and a guest that sends more than it was allowed does not get it printed.
fn cap_output(response: &mut Response, max_output: u64) {
    let cap = usize::try_from(max_output).unwrap_or(usize::MAX);
    for out in [&mut response.stdout, &mut response.stderr] {
        if out.len() > cap {
            out.truncate(cap);
            response.output_truncated = true;
        }
    }
}

/// The call's limits from the command line.
fn limits(args: &RunArgs) -> Limits {
    Limits {
        max_memory: args.max_memory,
        max_output: args.max_output,
        fuel: args.fuel,
        max_dir_bytes: args.max_dir_size,
        max_dir_entries: args.max_dir_files,
    }
}

/// Writes the shared directories back when the tool exited 0 (`after`: what each holds now).
fn finish(
    args: &RunArgs,
    response: Response,
    before: &[bulwark_proto::tree::SharedDir],
    after: Vec<Vec<bulwark_proto::tree::Entry>>,
) -> Result {
    if response.outcome != Outcome::Exited(0) {
        return Result::Done(response, Vec::new());
    }
    if after.len() != before.len() {
        return Result::Failed(
            code::BULWARK,
            format!(
                "the call answered for {} shared directories, not {}; nothing was written back",
                after.len(),
                before.len()
            ),
        );
    }
    let mut changes = Vec::new();
    for ((spec, sent), now) in args.dirs.iter().zip(before).zip(&after) {
        match dirs::write_back(&spec.host, &sent.entries, now) {
            Ok(c) => changes.push(c),
            Err(e) => {
                return Result::Failed(
                    code::BULWARK,
                    format!(
                        "the tool exited 0, but its changes to --dir {} could not be written back ({e:#}); files already replaced there are complete, the rest are as before",
                        spec.host.display()
                    ),
                );
            }
        }
    }
    Result::Done(response, changes)
}

/// `--isolation wasm`: the call runs in this process (see `local`), from an artifact the compile
/// cache holds for this host: no VM.
fn call_in_process(
    args: &RunArgs,
    artifact: &[u8],
    shared: Vec<bulwark_proto::tree::SharedDir>,
    stdin: Vec<u8>,
    timings: &mut Timings,
) -> Result {
    // The tool gets scratch copies of the shared directories, so a failed call leaves the host's
    // untouched exactly as in a VM.
    let scratch = match Scratch::new(&shared) {
        Ok(s) => s,
        Err(e) => return Result::Failed(code::BULWARK, format!("{e:#}")),
    };
    let preopens = scratch
        .dirs
        .iter()
        .cloned()
        .zip(args.dirs.iter().map(|d| d.guest.clone()))
        .collect();
    let call_started = Instant::now();
    let outcome = local::run(local::LocalCall {
        artifact,
        args: argv(args),
        env: args.env.clone(),
        stdin,
        limits: limits(args),
        preopens,
        deadline: call_started + args.timeout,
    });
    timings.call_us = call_started.elapsed().as_micros();
    if interrupt::requested() {
        return Result::Interrupted;
    }
    match outcome {
        Ok(Some(response)) => {
            if response.outcome != Outcome::Exited(0) {
                return Result::Done(response, Vec::new());
            }
            let mut budget = budget(args);
            let after: anyhow::Result<Vec<_>> = scratch
                .dirs
                .iter()
                .map(|d| dirs::read_tree(d, &mut budget))
                .collect();
            match after {
                Ok(after) => finish(args, response, &shared, after),
                Err(e) => Result::Failed(
                    code::BULWARK,
                    format!(
                        "the tool exited 0, but what it left in a --dir cannot be written back: {e:#}"
                    ),
                ),
            }
        }
        Ok(None) => Result::TimedOut,
        Err(e) => Result::Failed(code::BULWARK, format!("{e:#}")),
    }
}

/// Scratch copies of the shared directories for `--isolation wasm`, removed on drop.
struct Scratch {
    root: Option<std::path::PathBuf>,
    dirs: Vec<std::path::PathBuf>,
}

impl Scratch {
    fn new(shared: &[bulwark_proto::tree::SharedDir]) -> anyhow::Result<Self> {
        let mut scratch = Self {
            root: None,
            dirs: Vec::new(),
        };
        if shared.is_empty() {
            return Ok(scratch);
        }
        let root = vm::private_dir()?;
        scratch.root = Some(root.clone());
        for (i, dir) in shared.iter().enumerate() {
            let path = root.join(i.to_string());
            std::fs::create_dir(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            dirs::materialize(&path, &dir.entries)?;
            scratch.dirs.push(path);
        }
        Ok(scratch)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(root) = &self.root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn exit_code(result: &Result) -> u8 {
    match result {
        Result::Done(r, _) => match &r.outcome {
            Outcome::Exited(code) => (*code & 0xff) as u8,
            Outcome::Trap(_) | Outcome::OutOfFuel => code::TRAP,
            Outcome::Error(_) => code::MODULE,
        },
        Result::TimedOut => code::TIMEOUT,
        Result::Interrupted => code::INTERRUPTED,
        Result::Failed(code, _) => *code,
    }
}

fn report(args: &RunArgs, result: Result, t: &Timings) -> ExitCode {
    let exit = exit_code(&result);
    if args.json {
        let mut obj = serde_json::json!({
            "exit_code": exit,
            "isolation": args.isolation.name(),
            "timings_us": {
                "compile": t.compile_us as u64,
                "vm_start": t.vm_start_us as u64,
                "call": t.call_us as u64,
                "total": t.total_us as u64,
            },
        });
        match &result {
            Result::Done(r, changes) => {
                if !args.dirs.is_empty() {
                    obj["dirs_written_back"] = args
                        .dirs
                        .iter()
                        .zip(changes.iter().map(Some).chain(std::iter::repeat(None)))
                        .map(|(spec, c)| {
                            serde_json::json!({
                                "host": spec.host.display().to_string(),
                                "guest": spec.guest,
                                "written_back": c.is_some(),
                                "files_written": c.map_or(0, |c| c.files_written),
                                "dirs_created": c.map_or(0, |c| c.dirs_created),
                                "removed": c.map_or(0, |c| c.removed),
                            })
                        })
                        .collect();
                }
                match &r.outcome {
                    Outcome::Exited(code) => obj["exit"] = (*code).into(),
                    Outcome::Trap(msg) => obj["trap"] = msg.as_str().into(),
                    Outcome::OutOfFuel => obj["trap"] = "all fuel consumed".into(),
                    Outcome::Error(msg) => obj["error"] = msg.as_str().into(),
                }
                obj["stdout"] = String::from_utf8_lossy(&r.stdout).into();
                obj["stderr"] = String::from_utf8_lossy(&r.stderr).into();
                obj["output_truncated"] = r.output_truncated.into();
                if let Some(f) = r.fuel_consumed {
                    obj["fuel_consumed"] = f.into();
                }
                obj["timings_us"]["guest_load"] = r.timings.load_us.into();
                obj["timings_us"]["guest_instantiate"] = r.timings.instantiate_us.into();
                obj["timings_us"]["guest_run"] = r.timings.run_us.into();
            }
            Result::TimedOut => obj["error"] = format!("timed out after {:?}", args.timeout).into(),
            Result::Interrupted => obj["error"] = "interrupted (Ctrl-C or SIGTERM)".into(),
            Result::Failed(_, msg) => obj["error"] = msg.as_str().into(),
        }
        println!("{obj}");
        return ExitCode::from(exit);
    }
    match result {
        Result::Done(r, _) => {
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&r.stderr);
            if r.output_truncated {
                eprintln!(
                    "bulwark: output over --max-output {} bytes was dropped",
                    args.max_output
                );
            }
            if !args.dirs.is_empty() && r.outcome != Outcome::Exited(0) {
                eprintln!(
                    "bulwark: the tool did not exit 0: its changes to --dir directories were discarded"
                );
            }
            match &r.outcome {
                Outcome::Exited(_) => {}
                Outcome::Trap(msg) => eprintln!("bulwark: the tool trapped: {msg}"),
                Outcome::OutOfFuel => eprintln!(
                    "bulwark: the tool ran out of fuel (--fuel {})",
                    args.fuel.unwrap_or(0)
                ),
                Outcome::Error(msg) => {
                    eprintln!("bulwark: cannot run {}: {msg}", args.module.display())
                }
            }
        }
        Result::TimedOut => eprintln!(
            "bulwark: {} timed out after {:?} (--timeout); {}{}",
            args.module.display(),
            args.timeout,
            match args.isolation {
                Isolation::Vm => "the VM was killed",
                Isolation::Wasm => "the tool was stopped",
            },
            if args.dirs.is_empty() {
                ""
            } else {
                "; --dir directories are unchanged"
            }
        ),
        Result::Interrupted => eprintln!(
            "bulwark: interrupted; the call was stopped{}",
            if args.dirs.is_empty() {
                ""
            } else {
                " and --dir directories are unchanged"
            }
        ),
        Result::Failed(_, msg) => eprintln!("bulwark: {msg}"),
    }
    ExitCode::from(exit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_over_the_cap_from_the_guest_is_cut_and_flagged() {
        let mut r = Response::new(Outcome::Exited(0));
        r.stdout = vec![b'o'; 10];
        r.stderr = vec![b'e'; 3];
        cap_output(&mut r, 4);
        assert_eq!(r.stdout, b"oooo");
        assert_eq!(r.stderr, b"eee");
        assert!(r.output_truncated);
        let mut r = Response::new(Outcome::Exited(0));
        r.stdout = vec![b'o'; 4];
        cap_output(&mut r, 4);
        assert!(!r.output_truncated, "at the cap is not over it");
    }
}
