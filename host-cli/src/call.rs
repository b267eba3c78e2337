//! One tool call, as a library: a [`CallSpec`] in, a [`Finished`] call or a [`CallError`] out.
//!
//! `bulwark run` (and `bulwark python`, `bulwark js`), the HTTP server and the MCP server are
//! front-ends over [`call`]: they build a spec, hand it a [`Cancel`] token and a [`VmSource`]
//! (a fresh VM per call, or the server's warm pool), and present the result. Nothing here
//! prints, reads standard input or keeps global state.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulwark_proto::call::{
    Artifact, Limits, MAX_SHARED_DIRS, Outcome, PROTOCOL_VERSION, Request, Response,
};
use bulwark_proto::tree::{Entry as TreeEntry, SharedDir};

use crate::cache::{self, Entry};
use crate::cancel::Cancel;
use crate::cli::{Isolation, Target};
use crate::compile::{ModuleFile, hex, sha256};
use crate::dirs::{self, Budget, Changes, DirSpec};
use crate::vm::OutputStream;
use crate::{local, vm};

/// The exit codes a call ends with besides the tool's own (see `cli::RUN_EXIT_CODES`).
pub mod code {
    /// The timeout ran out.
    pub const TIMEOUT: u8 = 124;
    /// Cancelled: Ctrl-C or SIGTERM stopped `bulwark run`, or the server's client went away.
    pub const INTERRUPTED: u8 = 130;
    /// Bulwark failed.
    pub const BULWARK: u8 = 125;
    /// The module cannot run.
    pub const MODULE: u8 = 126;
    /// The tool trapped or ran out of fuel.
    pub const TRAP: u8 = 134;
    /// `--trust`/`--policy` refused the module (unsigned, not signed by a trusted key, changed
    /// after signing, or not pinned) before it was compiled.
    pub const REFUSED: u8 = 123;
}

/// Exit status of a tool whose exit code is outside 0..=255 (see `cli::RUN_EXIT_CODES`).
pub const OUT_OF_RANGE_EXIT: u8 = 255;

/// Memory the guest needs besides the tool's linear memory (image, stack, engine, the loaded
/// module's bookkeeping, heap bookkeeping), in MiB. The artifact itself is mapped, not in RAM.
const GUEST_OVERHEAD_MIB: u64 = 96;
/// High RAM beyond the tool's linear memory, for the guest's allocations that land there.
const HIGH_HEAP_SLACK_MIB: u64 = 64;

/// Most bytes of standard input a call carries.
pub const MAX_STDIN: u64 = 64 << 20;

/// The limits of one call. [`Default`] gives `bulwark run`'s defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Wall-clock time, from the start of the call (compiling counts, except for a pinned
    /// runtime, which compiles on its own clock).
    pub timeout: Duration,
    /// Largest linear memory the tool may have, in bytes.
    pub max_memory: u64,
    /// Most bytes kept of stdout, and of stderr.
    pub max_output: u64,
    /// A fuel budget (compiled with fuel metering), or none.
    pub fuel: Option<u64>,
    /// Most bytes of the shared directories, in and out.
    pub max_dir_size: u64,
    /// Most entries of the shared directories, in and out.
    pub max_dir_files: u32,
    /// The VM's RAM in MiB; `None`: what the call needs.
    pub mem_mib: Option<u64>,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_memory: 256 << 20,
            max_output: 16 << 20,
            fuel: None,
            max_dir_size: 64 << 20,
            max_dir_files: crate::dirs::DEFAULT_MAX_ENTRIES,
            mem_mib: None,
        }
    }
}

/// What one call runs, and with what.
#[derive(Clone, Debug)]
pub struct CallSpec {
    /// The module file (binary WebAssembly or text).
    pub module: PathBuf,
    /// `argv[0]`, the program's name; `None`: the module's file name.
    pub program: Option<String>,
    /// The tool's arguments after `argv[0]`.
    pub args: Vec<String>,
    /// Environment variables as (name, value).
    pub env: Vec<(String, String)>,
    /// All of standard input (at most [`MAX_STDIN`] bytes).
    pub stdin: Vec<u8>,
    /// Host directories shared with the tool and written back when it exits 0.
    pub dirs: Vec<DirSpec>,
    /// Directories made in memory, shared after `dirs`; what the tool leaves in them comes back
    /// in [`Finished::files`], never written anywhere.
    pub files: Vec<SharedDir>,
    /// The call's limits.
    pub limits: CallLimits,
    /// A VM, or this process with only the Wasm sandbox (`--isolation wasm`).
    pub isolation: Isolation,
    /// Public keys of which one must have signed the module (none: no signature needed).
    pub trust: Vec<PathBuf>,
    /// A policy file the module must satisfy.
    pub policy: Option<PathBuf>,
    /// The SHA-256 the module must have (a pinned runtime); it then compiles on its own clock.
    pub pinned_sha256: Option<[u8; 32]>,
    /// The SHA-256 the module must have (a module the call names by digest); checked before
    /// anything compiles or runs.
    pub expect_sha256: Option<[u8; 32]>,
    /// Measure the VM: its peak RSS and KVM's exit and fault counts (the VMM is stopped with
    /// SIGTERM for its report, which costs a little time).
    pub measure: bool,
}

impl CallSpec {
    /// A call of `module` with no arguments, input or directories and the default limits.
    pub fn new(module: impl Into<PathBuf>) -> Self {
        Self {
            module: module.into(),
            program: None,
            args: Vec::new(),
            env: Vec::new(),
            stdin: Vec::new(),
            dirs: Vec::new(),
            files: Vec::new(),
            limits: CallLimits::default(),
            isolation: Isolation::Vm,
            trust: Vec::new(),
            policy: None,
            pinned_sha256: None,
            expect_sha256: None,
            measure: false,
        }
    }
}

/// Where the time went, in microseconds, and what the VM cost.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// From the start to a compiled artifact (a cache hit included).
    pub compile_us: u64,
    /// Getting a VM ready for the call (a fresh start, or taking one from a pool).
    pub vm_start_us: u64,
    /// The call itself, request to answer.
    pub call_us: u64,
    /// The whole call.
    pub total_us: u64,
    /// The VMM's peak resident set (its VmHWM) when the answer was in, when measured.
    pub vmm_peak_rss_kib: Option<u64>,
    /// KVM's counts for the VM, when measured.
    pub vmm: vm::VmmReport,
    /// The VM had served an earlier call of the same tenant and module, and was reset to its
    /// snapshot since.
    pub reused: bool,
}

/// A call whose tool ran (to an exit, a trap, or a refusal inside the guest).
#[derive(Debug)]
pub struct Finished {
    /// The guest's answer, its output cut to `max_output`.
    pub response: Response,
    /// For each of [`CallSpec::dirs`], what was written back (empty unless the tool exited 0).
    pub changes: Vec<Changes>,
    /// For each of [`CallSpec::files`], what the tool left there (empty unless it exited 0).
    pub files: Vec<Vec<TreeEntry>>,
    /// Where the time went.
    pub timings: Timings,
}

impl Finished {
    /// The exit status a process reports for this call: the tool's exit code in 0..=255 as it
    /// is; any other (WASI's `proc_exit` takes a u32: 256 and up, or a negative i32) is
    /// [`OUT_OF_RANGE_EXIT`], never its low byte, so a tool that did not exit 0 never looks
    /// like success; a trap [`code::TRAP`].
    pub fn exit_code(&self) -> u8 {
        match &self.response.outcome {
            Outcome::Exited(code) => u8::try_from(*code).unwrap_or(OUT_OF_RANGE_EXIT),
            Outcome::Trap(_) | Outcome::OutOfFuel => code::TRAP,
            Outcome::Refused(_) => code::MODULE,
            Outcome::AgentFailed(_) => code::BULWARK,
        }
    }
}

/// Why a call did not run its tool to an end; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call's deadline passed (`message` says whether compiling or running).
    #[error("{message}")]
    TimedOut {
        /// What ran out of time.
        message: String,
        /// Where the time went until then.
        timings: Timings,
    },
    /// The call was cancelled ([`Cancel::cancel`]); the VM was killed.
    #[error("cancelled; the call was stopped")]
    Cancelled,
    /// `--trust`/`--policy` refused the module before it compiled.
    #[error("{0}")]
    Refused(String),
    /// The module cannot be read, compiled or loaded.
    #[error("{0}")]
    Module(String),
    /// Bulwark itself failed (a bad limit, the VM, the cache, writing back).
    #[error("{0}")]
    Bulwark(String),
}

impl CallError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::TimedOut { .. } => code::TIMEOUT,
            Self::Cancelled => code::INTERRUPTED,
            Self::Refused(_) => code::REFUSED,
            Self::Module(_) => code::MODULE,
            Self::Bulwark(_) => code::BULWARK,
        }
    }

    fn bulwark(e: impl Into<anyhow::Error>) -> Self {
        Self::Bulwark(format!("{:#}", e.into()))
    }

    fn module(e: impl Into<anyhow::Error>) -> Self {
        Self::Module(format!("{:#}", e.into()))
    }
}

/// Which calls may share a kept VM, one after another: the same tenant, the same module
/// compiled the same way (the artifact mapped into the VM is fixed at its snapshot), and
/// enough RAM.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReuseKey {
    /// The tenant ([`VmSource::tenant`]).
    pub tenant: String,
    /// The module's SHA-256.
    pub module: [u8; 32],
    /// Compiled with fuel metering (a call with a fuel budget).
    pub metered: bool,
    /// The VM RAM the call needs, in MiB (a kept VM serves it if it has at least this much).
    pub mem_mib: u64,
}

/// How a call's VM ended its call, for [`VmSource::give_back`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// The tool ran to its end and exited (any exit code), its output within the caps, its
    /// answer accepted; not cancelled. Only such a VM may be reset and serve another call.
    Clean,
    /// The VM answered, but the call did not end cleanly (a trap, no fuel left, a refusal, an
    /// agent failure, output cut at the cap, an answer the host refused, a cancel).
    Answered,
    /// No answer: a timeout, a cancel, or an error talking to the VM.
    Unanswered,
}

/// Where a call's VM comes from.
///
/// A source that keeps VMs for reuse is made per call, for the tenant the call runs for
/// ([`VmSource::tenant`]); the key it is given then names that tenant and the call's module.
pub trait VmSource: Sync {
    /// The tenant the calls from this source run for, as the API's caller names it (an opaque
    /// string): a source that keeps VMs may give such a call one that served an earlier call
    /// of the same tenant and module ([`ReuseKey`]), reset to its snapshot in between. `None`
    /// (the default): each call gets a VM no other call ran in.
    fn tenant(&self) -> Option<&str> {
        None
    }

    /// A running VM for the call `req` describes, ready before its deadline.
    fn vm(&self, req: &VmRequest<'_>) -> anyhow::Result<vm::Vm>;

    /// Gives back the VM of a call (not a measured one) that is over, with how it ended and
    /// the call's key: a source that keeps VMs may reset a [`CallEnd::Clean`] one and keep it
    /// for the next call of the same key. By default an answered VM is killed and not waited
    /// for (a process that exits right after the call lets init reap it), and any other is
    /// killed and waited for; a long-lived process overrides this to reap it off the call's
    /// path.
    fn give_back(&self, vm: vm::Vm, end: CallEnd, reuse: Option<&ReuseKey>) {
        let _ = reuse;
        if end == CallEnd::Unanswered {
            drop(vm);
        } else {
            vm.end_without_waiting();
        }
    }
}

/// What a call asks of its [`VmSource`].
#[derive(Clone, Copy, Debug)]
pub struct VmRequest<'a> {
    /// RAM the VM needs, in MiB.
    pub mem_mib: u64,
    /// The compiled module to map into it.
    pub artifact: &'a Entry,
    /// When the VM must be ready by.
    pub deadline: Instant,
    /// A fresh VM of the call's own whose VMM reports KVM's counts; it is not given back
    /// ([`VmSource::give_back`]).
    pub measure: bool,
    /// The call's key when it may reuse a kept VM (it names a tenant and is not measured).
    pub reuse: Option<&'a ReuseKey>,
}

/// A fresh VM for every call, started by the calling thread.
pub struct FreshVm;

impl VmSource for FreshVm {
    fn vm(&self, req: &VmRequest<'_>) -> anyhow::Result<vm::Vm> {
        vm::Vm::start(req.mem_mib, req.artifact, req.deadline, req.measure)
    }
}

fn seed() -> [u8; 32] {
    use std::io::Read;
    let mut seed = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut seed);
    }
    seed
}

/// The RAM a VM for `spec` needs besides the tool's linear memory, in MiB: the guest, the
/// --dir copies and standard input (the guest holds each twice while it reads the request).
fn rest_mib(spec: &CallSpec) -> u64 {
    let dirs_mib = if spec.dirs.is_empty() && spec.files.is_empty() {
        0
    } else {
        2 * spec.limits.max_dir_size.div_ceil(1 << 20)
    };
    GUEST_OVERHEAD_MIB + dirs_mib + 2 * bytes_to_mib(spec.stdin.len())
}

/// The VM RAM, in MiB, a call of `spec` gets (see [`vm_mem_mib`]).
pub fn mem_mib_for(spec: &CallSpec) -> Result<u64, String> {
    let need_mib = ram_need_mib(spec.limits.max_memory.div_ceil(1 << 20), rest_mib(spec));
    vm_mem_mib(
        spec.limits.mem_mib,
        need_mib,
        spec.limits.max_memory,
        !spec.dirs.is_empty() || !spec.files.is_empty(),
    )
}

/// Runs one call: checks the limits, reads (and, under a policy, checks) the module, compiles it
/// through the cache, runs it in a VM from `vms` (or in this process with
/// `Isolation::Wasm`), and writes the shared directories back when the tool exits 0.
pub fn call(spec: CallSpec, cancel: &Cancel, vms: &dyn VmSource) -> Result<Finished, CallError> {
    call_with(spec, cancel, vms, None)
}

/// Where streamed output goes: each chunk, with the stream it belongs to.
pub type OutputSink<'a> = dyn FnMut(OutputStream, &[u8]) + 'a;

/// [`call`], with the tool's output passed to `sink` as the tool writes it (in the VM; with
/// `Isolation::Wasm`, all of it when the tool ends), each stream at most `max_output` bytes in
/// all. The answer's own stdout and stderr are then empty.
pub fn call_streaming(
    spec: CallSpec,
    cancel: &Cancel,
    vms: &dyn VmSource,
    sink: &mut OutputSink<'_>,
) -> Result<Finished, CallError> {
    call_with(spec, cancel, vms, Some(sink))
}

fn call_with(
    mut spec: CallSpec,
    cancel: &Cancel,
    vms: &dyn VmSource,
    sink: Option<&mut OutputSink<'_>>,
) -> Result<Finished, CallError> {
    let started = Instant::now();
    let mut timings = Timings::default();
    let result = call_timed(&mut spec, cancel, vms, started, &mut timings, sink);
    timings.total_us = local::micros(started.elapsed());
    match result {
        Ok(mut finished) => {
            finished.timings = timings;
            Ok(finished)
        }
        Err(CallError::TimedOut { message, .. }) => Err(CallError::TimedOut { message, timings }),
        Err(e) => Err(e),
    }
}

fn call_timed(
    spec: &mut CallSpec,
    cancel: &Cancel,
    vms: &dyn VmSource,
    started: Instant,
    timings: &mut Timings,
    sink: Option<&mut OutputSink<'_>>,
) -> Result<Finished, CallError> {
    // A copy: parts of `spec` move into the request below.
    let limits = &spec.limits.clone();
    let shared_count = spec.dirs.len() + spec.files.len();
    // The agent refuses a call with more; so does the in-process run, so the two agree.
    if shared_count > MAX_SHARED_DIRS {
        let what = if spec.files.is_empty() {
            "--dir"
        } else {
            "shared"
        };
        return Err(CallError::Bulwark(format!(
            "{shared_count} {what} directories, over the limit of {MAX_SHARED_DIRS} a call may share"
        )));
    }
    if spec.stdin.len() as u64 > MAX_STDIN {
        return Err(CallError::Bulwark(format!(
            "standard input is over the {} MiB a call may carry; pass large data with --dir",
            MAX_STDIN >> 20
        )));
    }
    // What can be checked before compiling is checked first, so a bad size fails at once.
    let mem_mib = if spec.isolation == Isolation::Vm {
        Some(mem_mib_for(spec).map_err(CallError::Bulwark)?)
    } else {
        None
    };
    // The answer holds both outputs and the files, and 1 MiB for the rest. (A tool that makes
    // thousands of long paths can still outgrow the frame: its answer is refused, exit 125,
    // and nothing is written back.)
    let answer_max = limits
        .max_output
        .saturating_mul(2)
        .saturating_add(limits.max_dir_size)
        .saturating_add(1 << 20);
    if answer_max > u64::from(bulwark_proto::frame::MAX_RESPONSE_FRAME) {
        return Err(CallError::Bulwark(format!(
            "twice --max-output plus --max-dir-size is over the {} MiB a call's answer may hold: lower them",
            bulwark_proto::frame::MAX_RESPONSE_FRAME >> 20
        )));
    }
    let module = ModuleFile::open(&spec.module).map_err(CallError::module)?;
    // --trust/--policy: the signature and pinned digest are checked on the module's bytes,
    // before anything compiles or the cache is touched.
    let signed = !spec.trust.is_empty() || spec.policy.is_some();
    let mut bytes = None;
    if signed {
        let read = module.read().map_err(CallError::module)?;
        if let Err(refusal) =
            crate::sign::check_run(&spec.module, &spec.trust, spec.policy.as_deref(), &read)
        {
            let message = format!("{:#}", refusal.error);
            return Err(if refusal.code == code::REFUSED {
                CallError::Refused(message)
            } else {
                CallError::Bulwark(message)
            });
        }
        bytes = Some(read);
    }
    let cache = cache::Cache::open().map_err(CallError::bulwark)?;
    // Without a policy, a module's digest is remembered per file while the file is unchanged
    // (memo.rs), so a cached call of a big module (CPython: 26 MB) neither reads nor hashes it.
    let digest = match (&bytes, cache.remembered_digest(&module.file)) {
        (Some(read), _) => sha256(read),
        (None, Some(digest)) => digest,
        (None, None) => {
            let before = crate::memo::Identity::of(&module.file);
            let read = module.read().map_err(CallError::module)?;
            let digest = sha256(&read);
            if let Ok(before) = before {
                cache.remember_digest(&module.file, &before, &digest);
            }
            bytes = Some(read);
            digest
        }
    };
    if let Some(expected) = &spec.expect_sha256
        && *expected != digest
    {
        return Err(CallError::Module(format!(
            "{} is not the module the call names: its SHA-256 is {}, not {}",
            spec.module.display(),
            hex(&digest),
            hex(expected)
        )));
    }
    if let Some(pinned) = &spec.pinned_sha256 {
        crate::lang::check_runtime(&spec.module, &digest, pinned).map_err(CallError::bulwark)?;
    }
    // The directories stay open until they are written back: that works through these
    // descriptors, never through paths that could be swapped for links in the meantime.
    let dirs::Shared {
        trees: mut shared,
        hosts,
    } = dirs::read_all(&spec.dirs, budget(limits)).map_err(CallError::bulwark)?;
    // The in-memory directories: after the --dir ones, never written back. They and standard
    // input (up to 64 MiB each) move into the request: the call owns its spec.
    shared.extend(std::mem::take(&mut spec.files));
    let target = match spec.isolation {
        Isolation::Vm => Target::Guest,
        Isolation::Wasm => Target::Host,
    };
    // The call's deadline starts with the call: compiling counts against it. A pinned runtime
    // (`bulwark python`, `bulwark js`) is a known, trusted build compiled once per machine
    // (CPython: ~30 s): that compile has its own limit, and the call's clock starts after it.
    let runtime = spec.pinned_sha256.is_some();
    let compile_deadline = if runtime {
        Instant::now() + cache::COMPILE_TIMEOUT
    } else {
        started + limits.timeout
    };
    // Fuel metering is compiled in only for calls that give a fuel budget; the guest (or
    // `local`) picks the engine of the same variant from `limits.fuel`.
    let metering = bulwark_engine::Metering::of(limits.fuel);
    let compiled = cache.artifact(
        &module,
        bytes.as_deref(),
        &hex(&digest),
        target,
        metering,
        cache::Stop {
            deadline: compile_deadline,
            cancel,
        },
    );
    timings.compile_us = local::micros(started.elapsed());
    let deadline = if runtime {
        Instant::now() + limits.timeout
    } else {
        compile_deadline
    };
    let (artifact, _compiled) = match compiled {
        Ok(a) => a,
        // Cancelling reaches the compiler process too.
        Err(cache::Error::Interrupted) => return Err(CallError::Cancelled),
        Err(_) if cancel.is_cancelled() => return Err(CallError::Cancelled),
        Err(cache::Error::TimedOut { call_deadline }) => {
            return Err(CallError::TimedOut {
                message: compile_timed_out(spec, call_deadline),
                timings: Timings::default(),
            });
        }
        Err(cache::Error::Module(msg)) => return Err(CallError::Module(msg)),
        Err(cache::Error::Bulwark(e)) => return Err(CallError::bulwark(e)),
    };
    let Some(mem_mib) = mem_mib else {
        let bytes = artifact.read().map_err(|e| {
            CallError::bulwark(
                anyhow::Error::new(e).context("cannot read the compiled module from the cache"),
            )
        })?;
        let mut finished =
            call_in_process(spec, &bytes, shared, &hosts, deadline, cancel, timings)?;
        if let Some(sink) = sink {
            let r = &mut finished.response;
            for (which, bytes) in [
                (OutputStream::Stdout, std::mem::take(&mut r.stdout)),
                (OutputStream::Stderr, std::mem::take(&mut r.stderr)),
            ] {
                if !bytes.is_empty() {
                    sink(which, &bytes);
                }
            }
        }
        return Ok(finished);
    };
    let request = Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact {
            digest,
            size: artifact.len,
        },
        args: argv(spec),
        env: spec.env.clone(),
        stdin: std::mem::take(&mut spec.stdin),
        dirs: shared,
        limits: proto_limits(limits),
        random_seed: seed(),
        realtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        stream: sink.is_some(),
    };
    // A measured call has a VM of its own, never kept (see `VmSource::vm`).
    let reuse = match (vms.tenant(), spec.measure) {
        (Some(tenant), false) => Some(ReuseKey {
            tenant: tenant.to_owned(),
            module: digest,
            metered: limits.fuel.is_some(),
            mem_mib,
        }),
        _ => None,
    };
    let vm_started = Instant::now();
    let mut vm = vms
        .vm(&VmRequest {
            mem_mib,
            artifact: &artifact,
            deadline,
            measure: spec.measure,
            reuse: reuse.as_ref(),
        })
        .map_err(CallError::bulwark)?;
    vm.watch(cancel);
    timings.vm_start_us = local::micros(vm_started.elapsed());
    timings.reused = vm.resets() > 0;
    if cancel.is_cancelled() {
        if !spec.measure {
            vms.give_back(vm, CallEnd::Unanswered, reuse.as_ref());
        }
        return Err(CallError::Cancelled);
    }
    let call_started = Instant::now();
    // Checked against MAX_RESPONSE_FRAME above, so it fits.
    let max_answer = u32::try_from(answer_max).unwrap_or(u32::MAX);
    let outcome = match sink {
        Some(sink) => vm.call(&request, max_answer, deadline, sink),
        None => vm.call(&request, max_answer, deadline, &mut |_, _| {}),
    };
    timings.call_us = local::micros(call_started.elapsed());
    let answered = matches!(outcome, Ok(Some(_))) && !cancel.is_cancelled();
    if spec.measure {
        timings.vmm_peak_rss_kib = vm.peak_rss_kib();
    }
    // A VM that may be kept waits until its answer is checked; any other is retired now.
    let mut held = None;
    if spec.measure {
        // Measuring: the VMM is stopped with SIGTERM and says what KVM counted (a measured call
        // always has a VM of its own, see `VmSource::vm`).
        if answered {
            timings.vmm = vm.stop_with_report();
        } else {
            drop(vm);
        }
    } else if answered && reuse.is_some() {
        held = Some(vm);
    } else {
        let end = if answered {
            CallEnd::Answered
        } else {
            CallEnd::Unanswered
        };
        vms.give_back(vm, end, reuse.as_ref());
    }
    let give_back = |vm, clean: bool| {
        let end = if clean && !cancel.is_cancelled() {
            CallEnd::Clean
        } else {
            CallEnd::Answered
        };
        vms.give_back(vm, end, reuse.as_ref());
    };
    if cancel.is_cancelled() {
        if let Some(vm) = held {
            give_back(vm, false);
        }
        return Err(CallError::Cancelled);
    }
    let (result, clean) = match outcome {
        Ok(Some(mut response)) => {
            cap_output(&mut response, limits.max_output);
            // The tool ran to its exit, whatever its code, and all its output was kept.
            let ran_out =
                matches!(response.outcome, Outcome::Exited(_)) && !response.output_truncated;
            let after = std::mem::take(&mut response.dirs);
            let result = finish(response, &hosts, &request.dirs, after, budget(limits));
            let clean = ran_out && result.is_ok();
            (result, clean)
        }
        Ok(None) => (
            Err(CallError::TimedOut {
                message: run_timed_out(spec),
                timings: Timings::default(),
            }),
            false,
        ),
        Err(e) => (Err(CallError::bulwark(e)), false),
    };
    if let Some(vm) = held {
        give_back(vm, clean);
    }
    result
}

/// The message of a call whose tool ran out of time.
fn run_timed_out(spec: &CallSpec) -> String {
    format!(
        "{} timed out after {:?} (--timeout); {}{}",
        spec.module.display(),
        spec.limits.timeout,
        match spec.isolation {
            Isolation::Vm => "the VM was killed",
            Isolation::Wasm => "the tool was stopped",
        },
        if spec.dirs.is_empty() {
            ""
        } else {
            "; --dir directories are unchanged"
        }
    )
}

/// Whole MiB that hold `bytes`.
fn bytes_to_mib(bytes: usize) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX).div_ceil(1 << 20)
}

/// The VM RAM, in MiB, that a call needs: `rest_mib` for the guest, the artifact's copies,
/// standard input and the --dir copies, and `max_memory_mib` for the tool's linear memory.
///
/// A linear memory is one block of the guest's heap. Past 3 GiB (`LOW_RAM_END`), RAM goes on
/// above 4 GiB and the guest has two heaps that do not touch, so then the high one alone is
/// made big enough for the whole linear memory (with some slack for the guest's other
/// allocations that land there); the low 3 GiB cost nothing while untouched.
fn ram_need_mib(max_memory_mib: u64, rest_mib: u64) -> u64 {
    let low_mib = bulwark_abi::layout::LOW_RAM_END >> 20;
    let flat = max_memory_mib + rest_mib;
    if flat <= low_mib {
        flat
    } else {
        low_mib.max(rest_mib) + max_memory_mib + HIGH_HEAP_SLACK_MIB
    }
}

/// The VM's RAM in MiB: `--mem-mib` when given (checked by [`check_mem_mib`]), else `need_mib`
/// rounded up to whole 2 MiB pages (guest RAM the tool never touches costs the host nothing).
fn vm_mem_mib(
    mem_mib: Option<u64>,
    need_mib: u64,
    max_memory: u64,
    dirs: bool,
) -> std::result::Result<u64, String> {
    let step_mib = bulwark_abi::layout::PAGE_SIZE >> 20;
    let mib = mem_mib.unwrap_or_else(|| need_mib.next_multiple_of(step_mib));
    check_mem_mib(mib, need_mib, max_memory, dirs).map(|()| mib)
}

/// Checks `--mem-mib` against the VMM's rules (whole 2 MiB pages, at most
/// [`bulwark_abi::layout::MAX_RAM_SIZE`]) and against what the call needs (`need_mib`: its
/// `--max-memory`, the --dir copies when `dirs`, and the guest), so a VM that would refuse to
/// start, or could not hold the tool, is refused here with the allowed values.
fn check_mem_mib(
    mem_mib: u64,
    need_mib: u64,
    max_memory: u64,
    dirs: bool,
) -> std::result::Result<(), String> {
    use bulwark_abi::layout::{MAX_RAM_SIZE, PAGE_SIZE};
    let max_mib = MAX_RAM_SIZE >> 20;
    let step_mib = PAGE_SIZE >> 20;
    // The smallest size that holds the call and is a VM size.
    let least_mib = need_mib.next_multiple_of(step_mib);
    let what = format!(
        "--max-memory {} MiB{} plus the guest",
        max_memory.div_ceil(1 << 20),
        if dirs { " and the --dir copies" } else { "" }
    );
    if need_mib > max_mib {
        return Err(format!(
            "{what} need {need_mib} MiB of VM RAM, over the {max_mib} MiB a VM can have: lower --max-memory{}",
            if dirs { " or --max-dir-size" } else { "" }
        ));
    }
    if !mem_mib.is_multiple_of(step_mib) || mem_mib > max_mib {
        return Err(format!(
            "--mem-mib {mem_mib} is not a VM size: use a multiple of {step_mib} from {least_mib} (what {what} need) to {max_mib}"
        ));
    }
    if mem_mib < need_mib {
        return Err(format!(
            "--mem-mib {mem_mib} cannot hold {what}: use --mem-mib {least_mib} or more (a multiple of {step_mib}, at most {max_mib})"
        ));
    }
    Ok(())
}

/// The message of a call whose compilation ran out of time: the call's `--timeout` (counted
/// from the start of `bulwark run`), or `cache::COMPILE_TIMEOUT`.
fn compile_timed_out(spec: &CallSpec, call_deadline: bool) -> String {
    let limit = if call_deadline {
        format!("the call's --timeout of {:?}", spec.limits.timeout)
    } else {
        format!(
            "the {} s any compilation may take",
            cache::COMPILE_TIMEOUT.as_secs()
        )
    };
    format!(
        "compiling {} took too long: it did not finish within {limit}; the compiler was stopped and nothing was cached{}",
        spec.module.display(),
        if call_deadline {
            " (a larger --timeout lets it finish, and later calls use the cached artifact)"
        } else {
            ""
        }
    )
}

/// The tool's argv: the module's file name, then the arguments.
fn argv(spec: &CallSpec) -> Vec<String> {
    let program = spec.program.clone().unwrap_or_else(|| {
        spec.module
            .file_name()
            .map_or_else(|| "tool".into(), |n| n.to_string_lossy().into_owned())
    });
    std::iter::once(program)
        .chain(spec.args.iter().cloned())
        .collect()
}

/// What `--max-dir-size` and `--max-dir-files` allow, for reading trees.
fn budget(limits: &CallLimits) -> Budget {
    Budget {
        bytes: limits.max_dir_size,
        entries: limits.max_dir_files,
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

/// The limits the guest enforces.
fn proto_limits(limits: &CallLimits) -> Limits {
    Limits {
        max_memory: limits.max_memory,
        max_output: limits.max_output,
        fuel: limits.fuel,
        max_dir_bytes: limits.max_dir_size,
        max_dir_entries: limits.max_dir_files,
    }
}

/// Writes the shared directories back when the tool exited 0 (`hosts`: the directories opened
/// when they were read; `before`: what was sent, the host ones first; `after`: what each holds
/// now). What the in-memory ones hold is answered in [`Finished::files`].
fn finish(
    response: Response,
    hosts: &[dirs::HostDir],
    before: &[SharedDir],
    after: Vec<Vec<TreeEntry>>,
    budget: Budget,
) -> Result<Finished, CallError> {
    let finished = |response, changes, files| Finished {
        response,
        changes,
        files,
        timings: Timings::default(),
    };
    if response.outcome != Outcome::Exited(0) {
        return Ok(finished(response, Vec::new(), Vec::new()));
    }
    // The answer is the guest's word: it must fit the limits the call gave the tool, or
    // nothing is written back.
    if let Err(e) = dirs::check_answer_size(&after, budget) {
        return Err(CallError::Bulwark(format!(
            "{e:#}; nothing was written back"
        )));
    }
    // `before` ends with `CallSpec::files`, which have no host directory: only the first
    // `hosts.len()` are written back.
    if after.len() != before.len() || hosts.len() > before.len() {
        return Err(CallError::Bulwark(format!(
            "the call answered for {} shared directories, not {}; nothing was written back",
            after.len(),
            before.len()
        )));
    }
    let mut after = after;
    let files = after.split_off(hosts.len());
    for (sent, now) in before[hosts.len()..].iter().zip(&files) {
        dirs::check_tree(&sent.entries, now).map_err(|e| {
            CallError::Bulwark(format!(
                "the answer for {} is refused: {e:#}",
                sent.guest_path
            ))
        })?;
    }
    let mut changes = Vec::new();
    for ((host, sent), now) in hosts.iter().zip(before).zip(&after) {
        match dirs::write_back(host, &sent.entries, now) {
            Ok(c) => changes.push(c),
            Err(e) => {
                return Err(CallError::Bulwark(format!(
                    "the tool exited 0, but its changes to --dir {} could not be written back ({e:#}); files already replaced there are complete, the rest are as before",
                    host.path().display()
                )));
            }
        }
    }
    Ok(finished(response, changes, files))
}

/// `--isolation wasm`: the call runs in this process (see `local`), from an artifact the compile
/// cache holds for this host: no VM.
fn call_in_process(
    spec: &mut CallSpec,
    artifact: &[u8],
    shared: Vec<SharedDir>,
    hosts: &[dirs::HostDir],
    deadline: Instant,
    cancel: &Cancel,
    timings: &mut Timings,
) -> Result<Finished, CallError> {
    // The tool gets scratch copies of the shared directories, so a failed call leaves the host's
    // untouched exactly as in a VM.
    let scratch = Scratch::new(&shared).map_err(CallError::bulwark)?;
    let preopens = scratch
        .dirs
        .iter()
        .cloned()
        .zip(shared.iter().map(|d| d.guest_path.clone()))
        .collect();
    let call_started = Instant::now();
    let outcome = local::run(
        local::LocalCall {
            artifact,
            args: argv(spec),
            env: spec.env.clone(),
            stdin: std::mem::take(&mut spec.stdin),
            limits: proto_limits(&spec.limits),
            preopens,
            deadline,
        },
        cancel,
    );
    timings.call_us = local::micros(call_started.elapsed());
    if cancel.is_cancelled() {
        return Err(CallError::Cancelled);
    }
    match outcome {
        Ok(Some(mut response)) => {
            cap_output(&mut response, spec.limits.max_output);
            if response.outcome != Outcome::Exited(0) {
                return finish(response, hosts, &shared, Vec::new(), budget(&spec.limits));
            }
            let mut left = budget(&spec.limits);
            let after: anyhow::Result<Vec<_>> = scratch
                .dirs
                .iter()
                .map(|d| dirs::read_scratch(&dirs::HostDir::open(d)?, &mut left))
                .collect();
            match after {
                Ok(after) => finish(response, hosts, &shared, after, budget(&spec.limits)),
                Err(e) => Err(CallError::Bulwark(format!(
                    "the tool exited 0, but what it left in a shared directory cannot be read back: {e:#}"
                ))),
            }
        }
        Ok(None) => Err(CallError::TimedOut {
            message: run_timed_out(spec),
            timings: Timings::default(),
        }),
        Err(e) => Err(CallError::bulwark(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_outside_a_byte_never_look_like_success() {
        let finished = |outcome| Finished {
            response: Response::new(outcome),
            changes: Vec::new(),
            files: Vec::new(),
            timings: Timings::default(),
        };
        let exited = |code| finished(Outcome::Exited(code)).exit_code();
        for code in [0, 1, 3, 126, 130, 255] {
            assert_eq!(i32::from(exited(code)), code);
        }
        for code in [256, 512, 65536, i32::MAX, -1, -256, i32::MIN] {
            assert_eq!(exited(code), OUT_OF_RANGE_EXIT, "{code}");
        }
    }

    #[test]
    fn each_outcome_has_its_documented_exit_code() {
        let of = |outcome| {
            Finished {
                response: Response::new(outcome),
                changes: Vec::new(),
                files: Vec::new(),
                timings: Timings::default(),
            }
            .exit_code()
        };
        assert_eq!(of(Outcome::Trap("unreachable".into())), 134);
        assert_eq!(of(Outcome::OutOfFuel), 134);
        assert_eq!(of(Outcome::Refused("unknown import".into())), 126);
        assert_eq!(of(Outcome::AgentFailed("cannot set fuel".into())), 125);
        let timed_out = CallError::TimedOut {
            message: String::new(),
            timings: Timings::default(),
        };
        assert_eq!(timed_out.exit_code(), 124);
        assert_eq!(CallError::Cancelled.exit_code(), 130);
        assert_eq!(CallError::Refused(String::new()).exit_code(), 123);
        assert_eq!(CallError::Module(String::new()).exit_code(), 126);
        assert_eq!(CallError::Bulwark(String::new()).exit_code(), 125);
        for code in [123, 124, 125, 126, 130, 134] {
            assert!(
                crate::cli::RUN_EXIT_CODES.contains(&format!("\n  {code}  ")),
                "{code} is not documented"
            );
        }
    }

    #[test]
    fn ram_past_3_gib_holds_the_whole_linear_memory_above_4_gib() {
        assert_eq!(ram_need_mib(256, 96), 352);
        assert_eq!(ram_need_mib(2976, 96), 3072);
        // Past LOW_RAM_END: 3 GiB low (mostly untouched), then the memory and slack above 4 GiB.
        assert_eq!(ram_need_mib(2977, 96), 3072 + 2977 + HIGH_HEAP_SLACK_MIB);
        assert_eq!(ram_need_mib(4096, 96), 3072 + 4096 + HIGH_HEAP_SLACK_MIB);
    }

    #[test]
    fn mem_mib_follows_the_vmms_rules() {
        assert!(check_mem_mib(512, 352, 256 << 20, false).is_ok());
        assert!(check_mem_mib(3072, 352, 256 << 20, false).is_ok());
        assert!(check_mem_mib(16384, 352, 256 << 20, false).is_ok());
        for bad in [3, 513, 3075, 16386, u64::MAX] {
            let e = check_mem_mib(bad, 352, 256 << 20, false).unwrap_err();
            assert!(
                e.contains("multiple of 2 from 352") && e.contains("to 16384"),
                "{e}"
            );
        }
        let e = check_mem_mib(300, 352, 256 << 20, false).unwrap_err();
        assert!(e.contains("use --mem-mib 352 or more"), "{e}");
        let e = check_mem_mib(16384, 16500, 16 << 30, false).unwrap_err();
        assert!(e.contains("over the 16384 MiB a VM can have"), "{e}");
    }

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
