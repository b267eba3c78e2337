//! `bulwark run`: one tool call in a fresh micro-VM, printed for a terminal or as JSON. The call
//! itself is `call::call`.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::Context;
use bulwark_proto::call::Outcome;

use crate::call::{self, CallError, CallLimits, CallSpec, Finished, MAX_STDIN, Timings};
use crate::cli::{Isolation, RunArgs};
use crate::interrupt;
use crate::vm::OutputStream;

pub use crate::call::code;

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

/// The call `args` asks for, with `stdin`.
pub fn spec(args: &RunArgs, stdin: Vec<u8>) -> CallSpec {
    CallSpec {
        module: args.module.clone(),
        program: None,
        args: args.args.clone(),
        env: args.env.clone(),
        stdin,
        dirs: args.dirs.clone(),
        files: args.extra_dirs.clone(),
        limits: CallLimits {
            timeout: args.timeout,
            max_memory: args.max_memory,
            max_output: args.max_output,
            fuel: args.fuel,
            max_dir_size: args.max_dir_size,
            max_dir_files: args.max_dir_files,
            mem_mib: args.mem_mib,
        },
        isolation: args.isolation,
        trust: args.trust.clone(),
        policy: args.policy.clone(),
        pinned_sha256: args.pinned_sha256,
        expect_sha256: None,
        measure: args.json,
    }
}

/// Runs `bulwark run`.
pub fn run(args: &RunArgs) -> ExitCode {
    if args.isolation == Isolation::Wasm {
        eprintln!(
            "bulwark: warning: --isolation wasm: hardware isolation is OFF; the tool runs in this process with only the Wasm sandbox around it"
        );
    }
    // Ctrl-C, SIGTERM and SIGHUP cancel the call; the VM and its files are cleaned up on the way
    // out.
    let cancel = interrupt::install();
    let result = match stdin_bytes() {
        // --json prints the output inside its one object; otherwise it is printed as the tool
        // writes it.
        Ok(stdin) if args.json => call::call(spec(args, stdin), &cancel, &call::FreshVm),
        Ok(stdin) => call::call_streaming(
            spec(args, stdin),
            &cancel,
            &call::FreshVm,
            &mut print_output,
        ),
        Err(e) => Err(CallError::Bulwark(format!("{e:#}"))),
    };
    report(args, result)
}

/// Prints a chunk of the tool's output on our own stdout or stderr, at once. A closed stdout
/// (`bulwark run … | head`) is not an error: the rest is dropped.
fn print_output(which: OutputStream, bytes: &[u8]) {
    let _ = match which {
        OutputStream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes).and_then(|()| out.flush())
        }
        OutputStream::Stderr => std::io::stderr().lock().write_all(bytes),
    };
}

/// The exit status for `result`.
fn exit_code(result: &Result<Finished, CallError>) -> u8 {
    match result {
        Ok(f) => f.exit_code(),
        Err(e) => e.exit_code(),
    }
}

fn report(args: &RunArgs, result: Result<Finished, CallError>) -> ExitCode {
    let exit = exit_code(&result);
    let empty = Timings::default();
    let t = match &result {
        Ok(f) => &f.timings,
        Err(CallError::TimedOut { timings, .. }) => timings,
        Err(_) => &empty,
    };
    if args.json {
        let mut obj = serde_json::json!({
            "exit_code": exit,
            "isolation": args.isolation.name(),
            "timings_us": {
                "compile": t.compile_us,
                "vm_start": t.vm_start_us,
                "call": t.call_us,
                "total": t.total_us,
            },
        });
        if let Some(kib) = t.vmm_peak_rss_kib {
            obj["vmm_peak_rss_kib"] = kib.into();
        }
        if let Some(exits) = t.vmm.exits {
            obj["vm_exits"] = exits.into();
        }
        if let Some(faults) = t.vmm.page_faults {
            obj["vm_page_faults"] = faults.into();
        }
        match &result {
            Ok(Finished {
                response: r,
                changes,
                ..
            }) => {
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
                    Outcome::Refused(msg) | Outcome::AgentFailed(msg) => {
                        obj["error"] = msg.as_str().into()
                    }
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
            Err(CallError::Cancelled) => {
                obj["error"] = "interrupted (Ctrl-C, SIGTERM or SIGHUP)".into();
            }
            Err(e) => obj["error"] = e.to_string().into(),
        }
        println!("{obj}");
        return ExitCode::from(exit);
    }
    match result {
        Ok(Finished { response: r, .. }) => {
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
                Outcome::Refused(msg) => {
                    eprintln!("bulwark: cannot run {}: {msg}", args.module.display())
                }
                Outcome::AgentFailed(msg) => eprintln!(
                    "bulwark: the guest agent failed while running {}: {msg}",
                    args.module.display()
                ),
            }
        }
        Err(CallError::Cancelled) => eprintln!(
            "bulwark: interrupted; the call was stopped{}",
            if args.dirs.is_empty() {
                ""
            } else {
                " and --dir directories are unchanged"
            }
        ),
        Err(e) => eprintln!("bulwark: {e}"),
    }
    ExitCode::from(exit)
}
