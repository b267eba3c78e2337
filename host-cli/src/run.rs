//! `bulwark run`: one tool call in a fresh micro-VM.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use bulwark_proto::call::{Artifact, Limits, Outcome, PROTOCOL_VERSION, Request, Response};

use crate::cli::RunArgs;
use crate::compile::{read_module, sha256_hex};
use crate::{cache, vm};

/// `bulwark run`'s own exit codes (see `cli::RUN_EXIT_CODES`).
pub mod code {
    /// The timeout ran out.
    pub const TIMEOUT: u8 = 124;
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
    Done(Response),
    TimedOut,
    Failed(u8, String),
}

fn seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    seed
}

fn stdin_bytes() -> anyhow::Result<Vec<u8>> {
    let mut stdin = std::io::stdin();
    let mut data = Vec::new();
    if !stdin.is_terminal() {
        stdin
            .read_to_end(&mut data)
            .context("cannot read standard input")?;
    }
    Ok(data)
}

/// Runs `bulwark run`.
pub fn run(args: &RunArgs) -> ExitCode {
    let started = Instant::now();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        // Ctrl-C and SIGTERM end the call; the VM and its files are cleaned up on the way out.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let mut timings = Timings::default();
    let result = call(args, started, &mut timings, &interrupted);
    timings.total_us = started.elapsed().as_micros();
    report(args, result, &timings)
}

fn call(
    args: &RunArgs,
    started: Instant,
    timings: &mut Timings,
    interrupted: &AtomicBool,
) -> Result {
    let failed = |code, e: anyhow::Error| Result::Failed(code, format!("{e:#}"));
    let need_mib = args.max_memory.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB;
    if args.mem_mib < need_mib {
        return Result::Failed(
            code::BULWARK,
            format!(
                "--mem-mib {} cannot hold --max-memory {} MiB plus the guest: use --mem-mib {need_mib} or more",
                args.mem_mib,
                args.max_memory >> 20
            ),
        );
    }
    let module = match read_module(&args.module) {
        Ok(m) => m,
        Err(e) => return failed(code::MODULE, e),
    };
    let digest_hex = sha256_hex(&module);
    let (artifact, _compiled) = match cache::artifact(&args.module, &digest_hex) {
        Ok(a) => a,
        Err(e) => return failed(code::MODULE, e),
    };
    timings.compile_us = started.elapsed().as_micros();
    let stdin = match stdin_bytes() {
        Ok(s) => s,
        Err(e) => return failed(code::BULWARK, e),
    };
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digest_hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    let program = args
        .module
        .file_name()
        .map_or_else(|| "tool".into(), |n| n.to_string_lossy().into_owned());
    let request = Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact::Inline {
            digest,
            bytes: artifact,
        },
        args: std::iter::once(program)
            .chain(args.args.iter().cloned())
            .collect(),
        env: args.env.clone(),
        stdin,
        limits: Limits {
            max_memory: args.max_memory,
            max_output: args.max_output,
            fuel: args.fuel,
        },
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
    if interrupted.load(Ordering::SeqCst) {
        return Result::Failed(code::BULWARK, "interrupted".into());
    }
    let call_started = Instant::now();
    let outcome = vm.call(&request, deadline);
    timings.call_us = call_started.elapsed().as_micros();
    drop(vm);
    if interrupted.load(Ordering::SeqCst) {
        return Result::Failed(code::BULWARK, "interrupted".into());
    }
    match outcome {
        Ok(Some(response)) => Result::Done(response),
        Ok(None) => Result::TimedOut,
        Err(e) => failed(code::BULWARK, e),
    }
}

fn exit_code(result: &Result) -> u8 {
    match result {
        Result::Done(r) => match &r.outcome {
            Outcome::Exited(code) => (*code & 0xff) as u8,
            Outcome::Trap(_) | Outcome::OutOfFuel => code::TRAP,
            Outcome::Error(_) => code::MODULE,
        },
        Result::TimedOut => code::TIMEOUT,
        Result::Failed(code, _) => *code,
    }
}

fn report(args: &RunArgs, result: Result, t: &Timings) -> ExitCode {
    let exit = exit_code(&result);
    if args.json {
        let mut obj = serde_json::json!({
            "exit_code": exit,
            "timings_us": {
                "compile": t.compile_us as u64,
                "vm_start": t.vm_start_us as u64,
                "call": t.call_us as u64,
                "total": t.total_us as u64,
            },
        });
        match &result {
            Result::Done(r) => {
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
            Result::Failed(_, msg) => obj["error"] = msg.as_str().into(),
        }
        println!("{obj}");
        return ExitCode::from(exit);
    }
    match result {
        Result::Done(r) => {
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&r.stderr);
            if r.output_truncated {
                eprintln!(
                    "bulwark: output over --max-output {} bytes was dropped",
                    args.max_output
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
            "bulwark: {} timed out after {:?} (--timeout); the VM was killed",
            args.module.display(),
            args.timeout
        ),
        Result::Failed(_, msg) => eprintln!("bulwark: {msg}"),
    }
    ExitCode::from(exit)
}
