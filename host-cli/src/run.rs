//! `bulwark run`: one tool call in a fresh micro-VM.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use bulwark_proto::call::{
    Artifact, Limits, MAX_SHARED_DIRS, Outcome, PROTOCOL_VERSION, Request, Response,
};

use crate::cli::{Isolation, RunArgs, Target};
use crate::compile::{ModuleFile, hex, sha256};
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
    /// `--trust`/`--policy` refused the module (unsigned, not signed by a trusted key, changed
    /// after signing, or not pinned) before it was compiled.
    pub const REFUSED: u8 = 123;
}

/// Memory the guest needs besides the tool's linear memory (image, stack, engine, the loaded
/// module's bookkeeping, heap bookkeeping), in MiB. The artifact itself is mapped, not in RAM.
const GUEST_OVERHEAD_MIB: u64 = 96;
/// High RAM beyond the tool's linear memory, for the guest's allocations that land there.
const HIGH_HEAP_SLACK_MIB: u64 = 64;

/// Where the time went, in microseconds.
#[derive(Default)]
struct Timings {
    compile_us: u64,
    vm_start_us: u64,
    call_us: u64,
    total_us: u64,
    /// The VMM's peak resident set (its VmHWM) when the answer was in, with `--json`.
    vmm_peak_rss_kib: Option<u64>,
    /// KVM's counts for the VM, with `--json`.
    vmm: vm::VmmReport,
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
    timings.total_us = local::micros(started.elapsed());
    report(args, result, &timings)
}

fn call(args: &RunArgs, started: Instant, timings: &mut Timings) -> Result {
    let failed = |code, e: anyhow::Error| Result::Failed(code, format!("{e:#}"));
    // The agent refuses a call with more; so does the in-process run, so the two agree.
    if args.dirs.len() > MAX_SHARED_DIRS {
        return Result::Failed(
            code::BULWARK,
            format!(
                "{} --dir directories, over the limit of {MAX_SHARED_DIRS} a call may share",
                args.dirs.len()
            ),
        );
    }
    // The shared directories' copy lives in guest RAM next to its copy in the request.
    let dirs_mib = if args.dirs.is_empty() {
        0
    } else {
        2 * args.max_dir_size.div_ceil(1 << 20)
    };
    // RAM for everything but the tool's linear memory; ram_need_mib adds that.
    let rest_mib = GUEST_OVERHEAD_MIB + dirs_mib;
    let need_mib = ram_need_mib(args.max_memory.div_ceil(1 << 20), rest_mib);
    // What can be checked before compiling is checked first, so a bad size fails at once.
    if args.isolation == Isolation::Vm
        && let Err(e) = vm_mem_mib(args.mem_mib, need_mib, args.max_memory, dirs_mib > 0)
    {
        return Result::Failed(code::BULWARK, e);
    }
    // The answer holds both outputs and the files, and 1 MiB for the rest. (A tool that makes
    // thousands of long paths can still outgrow the frame: its answer is refused, exit 125,
    // and nothing is written back.)
    let answer_max = args
        .max_output
        .saturating_mul(2)
        .saturating_add(args.max_dir_size)
        .saturating_add(1 << 20);
    if answer_max > u64::from(bulwark_proto::frame::MAX_RESPONSE_FRAME) {
        return Result::Failed(
            code::BULWARK,
            format!(
                "twice --max-output plus --max-dir-size is over the {} MiB a call's answer may hold: lower them",
                bulwark_proto::frame::MAX_RESPONSE_FRAME >> 20
            ),
        );
    }
    let module = match ModuleFile::open(&args.module) {
        Ok(m) => m,
        Err(e) => return failed(code::MODULE, e),
    };
    // --trust/--policy: the signature and pinned digest are checked on the module's bytes,
    // before anything compiles or the cache is touched.
    let signed = !args.trust.is_empty() || args.policy.is_some();
    let mut bytes = None;
    if signed {
        let read = match module.read() {
            Ok(b) => b,
            Err(e) => return failed(code::MODULE, e),
        };
        if let Err(refusal) = crate::sign::check_run(args, &read) {
            return failed(refusal.code, refusal.error);
        }
        bytes = Some(read);
    }
    let cache = match cache::Cache::open() {
        Ok(c) => c,
        Err(e) => return failed(code::BULWARK, e),
    };
    // Without a policy, a module's digest is remembered per file while the file is unchanged
    // (memo.rs), so a cached call of a big module (CPython: 26 MB) neither reads nor hashes it.
    let digest = match (&bytes, cache.remembered_digest(&module.file)) {
        (Some(read), _) => sha256(read),
        (None, Some(digest)) => digest,
        (None, None) => {
            let before = crate::memo::Identity::of(&module.file);
            let read = match module.read() {
                Ok(b) => b,
                Err(e) => return failed(code::MODULE, e),
            };
            let digest = sha256(&read);
            if let Ok(before) = before {
                cache.remember_digest(&module.file, &before, &digest);
            }
            bytes = Some(read);
            digest
        }
    };
    if let Some(pinned) = &args.pinned_sha256
        && let Err(e) = crate::lang::check_runtime(&args.module, &digest, pinned)
    {
        return failed(code::BULWARK, e);
    }
    // The directories stay open until they are written back: that works through these
    // descriptors, never through paths that could be swapped for links in the meantime.
    let dirs::Shared {
        trees: mut shared,
        hosts,
    } = match dirs::read_all(&args.dirs, budget(args)) {
        Ok(s) => s,
        Err(e) => return failed(code::BULWARK, e),
    };
    // `bulwark python`/`js`'s script directory: after the --dir ones, never written back.
    shared.extend(args.extra_dirs.iter().cloned());
    let target = match args.isolation {
        Isolation::Vm => Target::Guest,
        Isolation::Wasm => Target::Host,
    };
    // The call's deadline started with `bulwark run`: compiling counts against it. A pinned
    // runtime (`bulwark python`, `bulwark js`) is a known, trusted build compiled once per
    // machine (CPython: ~30 s): that compile has its own limit, and the call's clock starts
    // after it.
    let runtime = args.pinned_sha256.is_some();
    let compile_deadline = if runtime {
        Instant::now() + cache::COMPILE_TIMEOUT
    } else {
        started + args.timeout
    };
    // Fuel metering is compiled in only for calls that give a fuel budget; the guest (or
    // `local`) picks the engine of the same variant from `limits.fuel`.
    let metering = bulwark_engine::Metering::of(args.fuel);
    let compiled = cache.artifact(
        &module,
        bytes.as_deref(),
        &hex(&digest),
        target,
        metering,
        compile_deadline,
    );
    timings.compile_us = local::micros(started.elapsed());
    let deadline = if runtime {
        Instant::now() + args.timeout
    } else {
        compile_deadline
    };
    let (artifact, _compiled) = match compiled {
        Ok(a) => a,
        // Ctrl-C reaches the compiler process too.
        Err(cache::Error::Interrupted) => return Result::Interrupted,
        Err(_) if interrupt::requested() => return Result::Interrupted,
        Err(cache::Error::TimedOut { call_deadline }) => {
            return Result::Failed(code::TIMEOUT, compile_timed_out(args, call_deadline));
        }
        Err(cache::Error::Module(msg)) => return Result::Failed(code::MODULE, msg),
        Err(cache::Error::Bulwark(e)) => return failed(code::BULWARK, e),
    };
    let stdin = match stdin_bytes() {
        Ok(s) => s,
        Err(e) => return failed(code::BULWARK, e),
    };
    if args.isolation == Isolation::Wasm {
        let bytes = match artifact.read() {
            Ok(b) => b,
            Err(e) => {
                return failed(
                    code::BULWARK,
                    anyhow::Error::new(e).context("cannot read the compiled module from the cache"),
                );
            }
        };
        return call_in_process(args, &bytes, shared, &hosts, stdin, deadline, timings);
    }
    // The guest holds standard input twice while it reads the request; the artifact is mapped
    // into its own window, outside RAM.
    let rest_mib = rest_mib + 2 * bytes_to_mib(stdin.len());
    let need_mib = ram_need_mib(args.max_memory.div_ceil(1 << 20), rest_mib);
    let mem_mib = match vm_mem_mib(args.mem_mib, need_mib, args.max_memory, dirs_mib > 0) {
        Ok(mib) => mib,
        Err(e) => {
            return Result::Failed(
                code::BULWARK,
                format!("{e} (the compiled module and standard input count too)"),
            );
        }
    };
    let request = Request {
        version: PROTOCOL_VERSION,
        artifact: Artifact {
            digest,
            size: artifact.len,
        },
        args: argv(args),
        env: args.env.clone(),
        stdin,
        dirs: shared,
        limits: limits(args),
        random_seed: seed(),
        realtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
    };
    let vm_started = Instant::now();
    let mut vm = match vm::Vm::start(mem_mib, &artifact, deadline, args.json) {
        Ok(vm) => vm,
        Err(e) => return failed(code::BULWARK, e),
    };
    timings.vm_start_us = local::micros(vm_started.elapsed());
    if interrupt::requested() {
        return Result::Interrupted;
    }
    let call_started = Instant::now();
    // Checked against MAX_RESPONSE_FRAME above, so it fits.
    let max_answer = u32::try_from(answer_max).unwrap_or(u32::MAX);
    let outcome = vm.call(&request, max_answer, deadline);
    timings.call_us = local::micros(call_started.elapsed());
    if args.json {
        timings.vmm_peak_rss_kib = vm.peak_rss_kib();
    }
    if args.json && matches!(outcome, Ok(Some(_))) && !interrupt::requested() {
        // Measuring: the VMM is stopped with SIGTERM and says what KVM counted.
        timings.vmm = vm.stop_with_report();
    } else if matches!(outcome, Ok(Some(_))) && !interrupt::requested() {
        // The answer is in and `bulwark run` exits right after this: the VMM is killed, not
        // waited for. Any other end waits until the VMM is gone.
        vm.end_without_waiting();
    } else {
        drop(vm);
    }
    if interrupt::requested() {
        return Result::Interrupted;
    }
    match outcome {
        Ok(Some(mut response)) => {
            cap_output(&mut response, args.max_output);
            let after = std::mem::take(&mut response.dirs);
            finish(response, &hosts, &request.dirs, after, budget(args))
        }
        Ok(None) => Result::TimedOut,
        Err(e) => failed(code::BULWARK, e),
    }
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
fn compile_timed_out(args: &RunArgs, call_deadline: bool) -> String {
    let limit = if call_deadline {
        format!("the call's --timeout of {:?}", args.timeout)
    } else {
        format!(
            "the {} s any compilation may take",
            cache::COMPILE_TIMEOUT.as_secs()
        )
    };
    format!(
        "compiling {} took too long: it did not finish within {limit}; the compiler was stopped and nothing was cached{}",
        args.module.display(),
        if call_deadline {
            " (a larger --timeout lets it finish, and later calls use the cached artifact)"
        } else {
            ""
        }
    )
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

/// Writes the shared directories back when the tool exited 0 (`hosts`: the directories opened
/// when they were read; `after`: what each holds now).
fn finish(
    response: Response,
    hosts: &[dirs::HostDir],
    before: &[bulwark_proto::tree::SharedDir],
    after: Vec<Vec<bulwark_proto::tree::Entry>>,
    budget: Budget,
) -> Result {
    if response.outcome != Outcome::Exited(0) {
        return Result::Done(response, Vec::new());
    }
    // The answer is the guest's word: it must fit the limits the call gave the tool, or
    // nothing is written back.
    if let Err(e) = dirs::check_answer_size(&after, budget) {
        return Result::Failed(code::BULWARK, format!("{e:#}; nothing was written back"));
    }
    // `before` may end with `RunArgs::extra_dirs`, which have no host directory: only the
    // first `hosts.len()` are written back.
    if after.len() != before.len() || hosts.len() > before.len() {
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
    for ((host, sent), now) in hosts.iter().zip(before).zip(&after) {
        match dirs::write_back(host, &sent.entries, now) {
            Ok(c) => changes.push(c),
            Err(e) => {
                return Result::Failed(
                    code::BULWARK,
                    format!(
                        "the tool exited 0, but its changes to --dir {} could not be written back ({e:#}); files already replaced there are complete, the rest are as before",
                        host.path().display()
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
    hosts: &[dirs::HostDir],
    stdin: Vec<u8>,
    deadline: Instant,
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
        .zip(shared.iter().map(|d| d.guest_path.clone()))
        .collect();
    let call_started = Instant::now();
    let outcome = local::run(local::LocalCall {
        artifact,
        args: argv(args),
        env: args.env.clone(),
        stdin,
        limits: limits(args),
        preopens,
        deadline,
    });
    timings.call_us = local::micros(call_started.elapsed());
    if interrupt::requested() {
        return Result::Interrupted;
    }
    match outcome {
        Ok(Some(response)) => {
            if response.outcome != Outcome::Exited(0) {
                return Result::Done(response, Vec::new());
            }
            let mut left = budget(args);
            let after: anyhow::Result<Vec<_>> = scratch
                .dirs
                .iter()
                .take(hosts.len())
                .map(|d| dirs::read_scratch(&dirs::HostDir::open(d)?, &mut left))
                .collect();
            match after {
                Ok(after) => finish(response, hosts, &shared[..hosts.len()], after, budget(args)),
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

/// Exit status of a tool whose exit code is outside 0..=255 (see `cli::RUN_EXIT_CODES`).
pub const OUT_OF_RANGE_EXIT: u8 = 255;

/// `bulwark run`'s exit status for `result`. A tool's exit code in 0..=255 is passed through;
/// any other (WASI's `proc_exit` takes a u32: 256 and up, or a negative i32) is
/// [`OUT_OF_RANGE_EXIT`], never its low byte, so a tool that did not exit 0 never looks like
/// success.
fn exit_code(result: &Result) -> u8 {
    match result {
        Result::Done(r, _) => match &r.outcome {
            Outcome::Exited(code) => u8::try_from(*code).unwrap_or(OUT_OF_RANGE_EXIT),
            Outcome::Trap(_) | Outcome::OutOfFuel => code::TRAP,
            Outcome::Refused(_) => code::MODULE,
            Outcome::AgentFailed(_) => code::BULWARK,
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
            Result::TimedOut => obj["error"] = format!("timed out after {:?}", args.timeout).into(),
            Result::Interrupted => obj["error"] = "interrupted (Ctrl-C, SIGTERM or SIGHUP)".into(),
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
                Outcome::Refused(msg) => {
                    eprintln!("bulwark: cannot run {}: {msg}", args.module.display())
                }
                Outcome::AgentFailed(msg) => eprintln!(
                    "bulwark: the guest agent failed while running {}: {msg}",
                    args.module.display()
                ),
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
    fn exit_codes_outside_a_byte_never_look_like_success() {
        let exited = |code| {
            exit_code(&Result::Done(
                Response::new(Outcome::Exited(code)),
                Vec::new(),
            ))
        };
        for code in [0, 1, 3, 126, 130, 255] {
            assert_eq!(i32::from(exited(code)), code);
        }
        for code in [256, 512, 65536, i32::MAX, -1, -256, i32::MIN] {
            assert_eq!(exited(code), OUT_OF_RANGE_EXIT, "{code}");
        }
    }

    #[test]
    fn each_outcome_has_its_documented_exit_code() {
        let of = |outcome| exit_code(&Result::Done(Response::new(outcome), Vec::new()));
        assert_eq!(of(Outcome::Trap("unreachable".into())), 134);
        assert_eq!(of(Outcome::OutOfFuel), 134);
        assert_eq!(of(Outcome::Refused("unknown import".into())), 126);
        assert_eq!(of(Outcome::AgentFailed("cannot set fuel".into())), 125);
        assert_eq!(exit_code(&Result::TimedOut), 124);
        assert_eq!(exit_code(&Result::Interrupted), 130);
        for code in [124, 125, 126, 130, 134] {
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
