//! `bulwark run --isolation wasm`: one tool call in this process, with wasmtime and
//! wasmtime-wasi, for hosts without `/dev/kvm`.
//!
//! Only wasmtime's sandbox stands between the tool and this process: there is no hardware
//! isolation. Everything else follows the guest agent (`guest-agent/src/agent.rs` and
//! `wasi.rs`) so a call gives the same answer either way: the engine settings
//! ([`bulwark_engine::shared_config`]), store limits, fuel, how an outcome is classified, and
//! stdout/stderr capped at `max_output` each, where writes past the cap succeed for the tool and
//! are dropped.
//!
//! The call runs on a thread of its own. When the deadline passes, the engine's epoch is
//! incremented, which stops the tool at its next Wasm instruction; a tool blocked inside a host
//! call (a long `poll_oneoff` sleep) is left behind, to end with the process.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bulwark_engine::Metering;
use bulwark_proto::call::{Limits, Outcome, PROTOCOL_VERSION, Response, Timings};
use wasmtime::{Engine, Linker, Module, Store, Trap};

use crate::cancel::Cancel;
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// The WASI preview 1 import module.
const WASI_MODULE: &str = "wasi_snapshot_preview1";
/// Stack of the thread the tool runs on (wasmtime keeps Wasm frames within its own 512 KiB
/// `max_wasm_stack`; the rest is for host calls).
const CALL_STACK: usize = 8 << 20;
/// How often the wait for the tool checks for Ctrl-C.
const INTERRUPT_POLL: Duration = Duration::from_millis(20);
/// How long to wait, after the deadline, for an interrupted tool's thread to finish.
const INTERRUPT_GRACE: Duration = Duration::from_millis(500);
/// Read buffer of the output capture threads.
const CAPTURE_CHUNK: usize = 64 << 10;

/// One call run in this process.
pub struct LocalCall<'a> {
    /// The module, precompiled for this host by `bulwark compile --target host` (the compile
    /// cache's artifact).
    pub artifact: &'a [u8],
    /// argv, program name first.
    pub args: Vec<String>,
    /// Environment variables as (name, value).
    pub env: Vec<(String, String)>,
    /// All of standard input.
    pub stdin: Vec<u8>,
    /// Largest linear memory, most bytes kept of stdout and of stderr, and fuel.
    pub limits: Limits,
    /// Directories to preopen, as (host directory, guest path), with all directory and file
    /// permissions.
    pub preopens: Vec<(PathBuf, String)>,
    /// When the call is interrupted.
    pub deadline: Instant,
}

/// Runs one call in this process. `Ok(None)`: the deadline passed, or the call was cancelled
/// (`cancel` tells which); the tool was stopped.
pub fn run(call: LocalCall<'_>, cancel: &Cancel) -> anyhow::Result<Option<Response>> {
    // The engine of the artifact's variant: fuel metering only for a call with a fuel budget.
    // An artifact of the other variant is refused by deserialize (wasmtime checks the setting).
    let metering = Metering::of(call.limits.fuel);
    let engine = engine(metering)?;
    let started = Instant::now();
    // SAFETY: the artifact is our own compiler's output (`bulwark compile --target host`, run by
    // the compile cache with `bulwark_engine::host_config`), read from the user's own cache directory;
    // deserialize checks its wasmtime version, settings and CPU features against this engine and
    // refuses a mismatch. The tool's code is untrusted, but it runs as Wasm.
    let module = unsafe { Module::deserialize(&engine, call.artifact) }.map_err(|e| {
        anyhow!(
            "cannot load the compiled module from the cache as a {} artifact ({e}); if the cache was copied from another machine, delete {}",
            metering.name(),
            crate::cache::dir().display()
        )
    })?;
    let load_us = micros(started.elapsed());
    let linker = linker(&engine)?;
    let deadline = call.deadline;
    let prepared = prepare(&engine, call)?;
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("bulwark-tool".into())
        .stack_size(CALL_STACK)
        .spawn(move || {
            let result = execute(prepared, &linker, &module, load_us);
            // The receiver is gone only when the call was given up on; nobody is waiting.
            let _ = tx.send(result);
        })
        .context("cannot start the tool's thread")?;
    // Wait for the answer in short slices, so cancelling (Ctrl-C) stops the tool too.
    let waited = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining.min(INTERRUPT_POLL)) {
            Err(RecvTimeoutError::Timeout) if !remaining.is_zero() && !cancel.is_cancelled() => {}
            other => break other,
        }
    };
    match waited {
        Ok(result) => {
            let _ = worker.join();
            result
        }
        Err(RecvTimeoutError::Timeout) => {
            engine.increment_epoch();
            match rx.recv_timeout(INTERRUPT_GRACE) {
                Ok(result) => {
                    let _ = worker.join();
                    // It may have finished just as the deadline passed; then that is the answer.
                    result
                }
                // Still inside a host call: leave the thread, it ends with the process.
                Err(_) => Ok(None),
            }
        }
        Err(RecvTimeoutError::Disconnected) => {
            let _ = worker.join();
            Err(anyhow!("the tool's thread ended without an answer"))
        }
    }
}

/// The engine of one metering variant: the guest's shared settings (so the same modules
/// validate, with the same fuel costs when metered), compiled for this host, plus epoch
/// interruption for the deadline (`bulwark_engine::host_config`).
fn engine(metering: Metering) -> anyhow::Result<Engine> {
    Engine::new(&bulwark_engine::host_config(metering))
        .map_err(|e| anyhow!("cannot create the wasmtime engine: {e:?}"))
}

/// What a store's data holds.
struct Data {
    wasi: WasiP1Ctx,
    limits: bulwark_engine::CallLimits,
}

/// WASI preview 1 from wasmtime-wasi, with `proc_exit` as the guest agent has it.
fn linker(engine: &Engine) -> anyhow::Result<Linker<Data>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |d: &mut Data| &mut d.wasi)
        .map_err(|e| anyhow!("cannot add WASI to the linker: {e:?}"))?;
    // wasmtime-wasi turns proc_exit(n) for n >= 126 into an error; the guest agent passes any
    // code through (and `bulwark run` maps codes outside 0..=255 to 255), so this does too.
    linker.allow_shadowing(true);
    linker
        .func_wrap(
            WASI_MODULE,
            "proc_exit",
            |code: i32| -> wasmtime::Result<()> { Err(wasmtime::Error::new(I32Exit(code))) },
        )
        .map_err(|e| anyhow!("cannot define proc_exit: {e:?}"))?;
    // Symbolic and hard links are wasmtime-wasi's own (the reference the guest follows): made in
    // the tool's scratch copies, resolved only inside them; the write-back takes back a link
    // only when it stays inside its directory (`dirs::write_back`).
    linker.allow_shadowing(false);
    Ok(linker)
}

/// A store ready to run, and the threads collecting its output.
struct Prepared {
    store: Store<Data>,
    limits: Limits,
    stdout: JoinHandle<Captured>,
    stderr: JoinHandle<Captured>,
}

fn prepare(engine: &Engine, call: LocalCall<'_>) -> anyhow::Result<Prepared> {
    let max_output = usize::try_from(call.limits.max_output).unwrap_or(usize::MAX);
    let (stdout, stdout_reader) = capture(max_output, "stdout")?;
    let (stderr, stderr_reader) = capture(max_output, "stderr")?;
    let mut builder = WasiCtxBuilder::new();
    builder
        .args(&call.args)
        .envs(&call.env)
        .stdin(MemoryInputPipe::new(call.stdin))
        .stdout(stdout)
        .stderr(stderr);
    for (host, guest) in &call.preopens {
        builder
            .preopened_dir(host, guest, FsPerms::ReadWrite)
            .map_err(|e| anyhow!("cannot open {} for the tool: {e:?}", host.display()))?;
    }
    let limits = bulwark_engine::store_limits(call.limits.max_memory);
    let store = Store::new(
        engine,
        Data {
            wasi: builder.build_p1(),
            limits,
        },
    );
    Ok(Prepared {
        store,
        limits: call.limits,
        stdout: stdout_reader,
        stderr: stderr_reader,
    })
}

/// Instantiates the module and runs `_start`, as the guest agent's `Agent::call` does.
/// `Ok(None)`: the epoch interrupt stopped it.
fn execute(
    prepared: Prepared,
    linker: &Linker<Data>,
    module: &Module,
    load_us: u64,
) -> anyhow::Result<Option<Response>> {
    let Prepared {
        mut store,
        limits,
        stdout,
        stderr,
    } = prepared;
    let mut timings = Timings {
        load_us,
        ..Timings::default()
    };
    let t0 = Instant::now();
    store.limiter(|d| &mut d.limits);
    // Only the metered engine has fuel (`run` chose it from `limits.fuel`).
    if let Some(fuel) = limits.fuel {
        store
            .set_fuel(fuel)
            .map_err(|e| anyhow!("cannot set fuel: {e:?}"))?;
    }
    store.set_epoch_deadline(1);
    let instance = linker.instantiate(&mut store, module);
    let t1 = Instant::now();
    timings.instantiate_us = micros(t1 - t0);
    let mut started = false;
    let result = instance.and_then(|instance| {
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
        started = true;
        start.call(&mut store, ())
    });
    timings.run_us = micros(t1.elapsed());
    let outcome = match result {
        Ok(()) => Outcome::Exited(0),
        Err(e) if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => return Ok(None),
        Err(e) => outcome_of(&e, started),
    };
    let fuel_consumed = limits
        .fuel
        .and_then(|fuel| store.get_fuel().ok().map(|left| fuel.saturating_sub(left)));
    // Dropping the store closes the write ends of the output pipes, so the readers finish.
    drop(store);
    let stdout = stdout
        .join()
        .map_err(|_| anyhow!("the stdout reader panicked"))?;
    let stderr = stderr
        .join()
        .map_err(|_| anyhow!("the stderr reader panicked"))?;
    Ok(Some(Response {
        version: PROTOCOL_VERSION,
        outcome,
        output_truncated: stdout.truncated || stderr.truncated,
        stdout: stdout.bytes,
        stderr: stderr.bytes,
        fuel_consumed,
        // The tool changed scratch copies in place; `run` reads them back from there.
        dirs: Vec::new(),
        timings,
    }))
}

/// Classifies a failed instantiation or run (`started`: `_start` was called), exactly as the
/// guest agent does.
fn outcome_of(e: &wasmtime::Error, started: bool) -> Outcome {
    let exit = e.downcast_ref::<I32Exit>().map(|I32Exit(code)| *code);
    bulwark_engine::outcome_of(e, exit, started)
}

/// `d` in whole microseconds; over 584,000 years reads as `u64::MAX`.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Output kept from one stream, capped like the guest agent's `Output`.
struct Captured {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Captured {
    fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A stream for the tool that never refuses a write, and the thread that keeps its first `cap`
/// bytes. The tool writes into a pipe; the thread drains it, so writes past the cap succeed for
/// the tool and are dropped (and `truncated` is set). The thread ends when every write end is
/// closed, that is when the store is dropped.
fn capture(cap: usize, name: &str) -> anyhow::Result<(OutputFile, JoinHandle<Captured>)> {
    let (mut reader, writer) =
        std::io::pipe().with_context(|| format!("cannot create a pipe for the tool's {name}"))?;
    let reader_thread = std::thread::Builder::new()
        .name(format!("bulwark-{name}"))
        .spawn(move || {
            let mut out = Captured {
                bytes: Vec::new(),
                cap,
                truncated: false,
            };
            let mut buf = vec![0u8; CAPTURE_CHUNK];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            out
        })
        .with_context(|| format!("cannot start the reader of the tool's {name}"))?;
    Ok((
        OutputFile::new(File::from(OwnedFd::from(writer))),
        reader_thread,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(module: &[u8]) -> Vec<u8> {
        compiled_for(module, Metering::None)
    }

    fn compiled_for(module: &[u8], metering: Metering) -> Vec<u8> {
        crate::compile::compile_bytes(module, crate::cli::Target::Host, metering).unwrap()
    }

    /// Runs `module` compiled for the variant `limits` asks for, as `bulwark run` does.
    fn call(module: &[u8], limits: Limits) -> anyhow::Result<Option<Response>> {
        call_with(&compiled_for(module, Metering::of(limits.fuel)), limits)
    }

    fn call_with(artifact: &[u8], limits: Limits) -> anyhow::Result<Option<Response>> {
        run(
            LocalCall {
                artifact,
                args: vec!["t".into()],
                env: Vec::new(),
                stdin: Vec::new(),
                limits,
                preopens: Vec::new(),
                deadline: Instant::now() + Duration::from_secs(30),
            },
            &Cancel::new(),
        )
    }

    const WRITE: &str = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "0123456789")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 16))
        (i32.store (i32.const 4) (i32.const 10))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        ;; the tool is told every byte was written
        (call $exit (i32.add (i32.const 200) (i32.load (i32.const 8))))))"#;

    #[test]
    fn output_is_capped_and_exit_codes_pass_through() {
        let limits = Limits {
            max_output: 15,
            ..Limits::default()
        };
        let r = call(WRITE.as_bytes(), limits).unwrap().unwrap();
        assert_eq!(r.outcome, Outcome::Exited(210));
        assert_eq!(r.stdout, b"012345678901234");
        assert!(r.output_truncated);
    }

    #[test]
    fn all_memories_and_tables_share_one_budget() {
        let limits = Limits {
            max_memory: 64 << 20,
            ..Limits::default()
        };
        // Twenty 32 MiB memories: each under --max-memory, 640 MiB together.
        let mut many = String::from("(module");
        for _ in 0..20 {
            many.push_str(" (memory 512)");
        }
        many.push_str(r#" (func (export "_start")))"#);
        let r = call(many.as_bytes(), limits).unwrap().unwrap();
        assert!(
            matches!(&r.outcome, Outcome::Refused(m) if m.contains("exceeds memory limits")),
            "{:?}",
            r.outcome
        );
        // Two memories that fill the budget together; then no memory grows by a page.
        let grow = r#"(module
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory $a 512) (memory $b 0)
          (func (export "_start")
            (if (i32.ne (memory.grow $b (i32.const 512)) (i32.const 0))
              (then (call $exit (i32.const 1))))
            (if (i32.ne (memory.grow $a (i32.const 1)) (i32.const -1))
              (then (call $exit (i32.const 2))))
            (if (i32.ne (memory.grow $b (i32.const 1)) (i32.const -1))
              (then (call $exit (i32.const 3))))
            (call $exit (i32.const 0))))"#;
        let r = call(grow.as_bytes(), limits).unwrap().unwrap();
        assert_eq!(r.outcome, Outcome::Exited(0));
        let tables = r#"(module (table 600000 funcref) (table 600000 funcref)
          (func (export "_start")))"#;
        let r = call(tables.as_bytes(), limits).unwrap().unwrap();
        assert!(matches!(&r.outcome, Outcome::Refused(_)), "{:?}", r.outcome);
        // As many memories as a module may declare (validation refuses more), all empty: fine.
        let mut count = String::from("(module");
        for _ in 0..bulwark_engine::MAX_MEMORIES {
            count.push_str(" (memory 0)");
        }
        count.push_str(r#" (func (export "_start")))"#);
        let r = call(count.as_bytes(), limits).unwrap().unwrap();
        assert_eq!(r.outcome, Outcome::Exited(0));
    }

    #[test]
    fn symbolic_links_are_made_by_wasmtime_wasi_in_the_preopen() {
        // path_symlink("target", fd 3, "link"), then path_symlink("/etc", fd 3, "abs"): exits
        // with the first errno times 100 plus the second.
        let symlink = r#"(module
          (import "wasi_snapshot_preview1" "path_symlink"
            (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 0) "target")
          (data (i32.const 16) "link")
          (data (i32.const 32) "/etc")
          (data (i32.const 48) "abs")
          (func (export "_start")
            (call $exit (i32.add
              (i32.mul (i32.const 100)
                (call $symlink (i32.const 0) (i32.const 6) (i32.const 3)
                  (i32.const 16) (i32.const 4)))
              (call $symlink (i32.const 32) (i32.const 4) (i32.const 3)
                (i32.const 48) (i32.const 3))))))"#;
        let dir = std::env::temp_dir().join(format!("bulwark-local-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let artifact = compiled(symlink.as_bytes());
        let r = run(
            LocalCall {
                artifact: &artifact,
                args: vec!["t".into()],
                env: Vec::new(),
                stdin: Vec::new(),
                limits: Limits::default(),
                preopens: vec![(dir.clone(), "/d".into())],
                deadline: Instant::now() + Duration::from_secs(30),
            },
            &Cancel::new(),
        )
        .unwrap()
        .unwrap();
        // The relative link is made (errno 0); the absolute one is refused (ERRNO_PERM, 63).
        assert_eq!(r.outcome, Outcome::Exited(63));
        assert_eq!(
            std::fs::read_link(dir.join("link")).unwrap(),
            PathBuf::from("target")
        );
        assert!(std::fs::symlink_metadata(dir.join("abs")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_modules_unknown_imports_and_deadlines() {
        assert!(
            crate::compile::compile_bytes(b"#!/bin/sh", crate::cli::Target::Host, Metering::None)
                .is_err()
        );
        let e = run(
            LocalCall {
                artifact: b"not an artifact",
                args: vec!["t".into()],
                env: Vec::new(),
                stdin: Vec::new(),
                limits: Limits::default(),
                preopens: Vec::new(),
                deadline: Instant::now() + Duration::from_secs(30),
            },
            &Cancel::new(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("cache"), "{e:#}");
        let import =
            br#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#;
        let r = call(import, Limits::default()).unwrap().unwrap();
        assert!(
            matches!(&r.outcome, Outcome::Refused(m) if m.contains("launch_missiles")),
            "{:?}",
            r.outcome
        );
        let spin = br#"(module (func (export "_start") (loop (br 0))))"#;
        let spin_artifact = compiled(spin);
        let r = run(
            LocalCall {
                artifact: &spin_artifact,
                args: vec!["t".into()],
                env: Vec::new(),
                stdin: Vec::new(),
                limits: Limits::default(),
                preopens: Vec::new(),
                deadline: Instant::now() + Duration::from_millis(200),
            },
            &Cancel::new(),
        )
        .unwrap();
        assert!(r.is_none());
        let fuel = Limits {
            fuel: Some(1000),
            ..Limits::default()
        };
        let r = call(spin, fuel).unwrap().unwrap();
        assert_eq!(r.outcome, Outcome::OutOfFuel);
        assert_eq!(r.fuel_consumed, Some(1000));
    }

    #[test]
    fn an_artifact_of_the_other_metering_variant_is_refused() {
        let spin = br#"(module (func (export "_start") (loop (br 0))))"#;
        let fuel = Limits {
            fuel: Some(1000),
            ..Limits::default()
        };
        // Unmetered code handed to a call with a fuel budget must not run (unmetered, it would
        // spin to the deadline): deserialize refuses it.
        let e = call_with(&compiled_for(spin, Metering::None), fuel).unwrap_err();
        assert!(format!("{e:#}").contains("fuel-metered"), "{e:#}");
        let e = call_with(&compiled_for(spin, Metering::Fuel), Limits::default()).unwrap_err();
        assert!(format!("{e:#}").contains("unmetered"), "{e:#}");
        // Each variant in its own engine works.
        let r = call_with(&compiled_for(spin, Metering::Fuel), fuel)
            .unwrap()
            .unwrap();
        assert_eq!(r.outcome, Outcome::OutOfFuel);
        let r = call_with(
            &compiled_for(WRITE.as_bytes(), Metering::None),
            Limits::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.outcome, Outcome::Exited(210));
        assert_eq!(r.fuel_consumed, None);
    }
}
