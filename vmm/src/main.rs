//! `bulwark-vmm`: runs one Bulwark guest in a KVM micro-VM and exits with its status.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulwark_abi::boot::TestMode;
use std::sync::Arc;

use bulwark_vmm::artifact::ArtifactFile;
use bulwark_vmm::confine::{Probe, confine_process};
use bulwark_vmm::cpu::probe::CpuProbe;
use bulwark_vmm::vm::Unconfined;
use bulwark_vmm::{Console, Vm, VmConfig};
use clap::{Parser, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0-63  the guest's own exit status (larger statuses are reported as 63)
  2     the command line could not be parsed
  64    an option's value is unusable (--mem-mib too small, payload, artifact or console file)
  65    the guest image is missing, not an x86_64 ELF executable, or does not fit guest RAM
  66    /dev/kvm is missing, not accessible, or refused to set up the VM
  70    the guest crashed: CPU exception (vector and RIP reported), triple fault, KVM internal
        error, or an access to an I/O port or MMIO address no device serves
  71    a KVM call failed while the guest ran
  124   the --timeout ran out
  143   SIGTERM stopped the guest (with --timings, the report is printed first)

Every way a guest ends other than status 0 is reported on stderr in one line.";

/// Runs one Bulwark guest (a freestanding ELF for x86_64-unknown-none) in a KVM micro-VM.
///
/// The guest starts in 64-bit mode at CPL3 with the CPU state, page tables and boot info this
/// VMM builds; it has a serial console and a control port, and nothing else.
#[derive(Parser, Debug)]
#[command(version, after_help = EXIT_CODES)]
struct Args {
    /// The guest ELF image (build/bulwark-guest.elf after `make guest`).
    guest: PathBuf,

    /// Guest RAM in MiB (a multiple of 2, at most 3072).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    mem_mib: u64,

    /// A file loaded into guest RAM for the guest (the precompiled Wasm self-test module).
    #[arg(long, value_name = "FILE")]
    payload: Option<PathBuf>,

    /// Map a precompiled module read-only into the guest's artifact window, from the file that
    /// is this process's standard input (a regular file the caller opened; the VMM opens no
    /// path for it). The guest loads it in place: `bulwark run` passes its cache entry so.
    #[arg(long)]
    artifact_from_stdin: bool,

    /// Boot with an empty artifact window and take the artifact later, once, on standard input,
    /// which must then be a Unix stream socket (the caller's socketpair end): one message of 16
    /// bytes (offset and length, u64 little-endian each) with the artifact file's descriptor
    /// attached (SCM_RIGHTS), answered `OK\n` once mapped or `ERR <reason>\n`. For warm VMs;
    /// see vmm/src/late.rs.
    #[arg(long, conflicts_with = "artifact_from_stdin")]
    artifact_later: bool,

    /// Keep the guest heap on 4 KiB pages, without transparent huge pages. A call that touches
    /// little memory starts faster (the first touch of a huge page zeroes 2 MiB: ~0.4 ms of a
    /// hello call here); one that touches much (CPython) takes more page faults. A reusable VM
    /// always has small pages.
    #[arg(long)]
    small_pages: bool,

    /// Make the VM reusable: once its artifact is mapped, it takes SNAPSHOT and RESET commands
    /// on the same socket (16 bytes, no descriptor: the 8-byte name, NUL-padded, then 8 zero
    /// bytes). SNAPSHOT saves the VM when its agent next rests (listening, no connection);
    /// RESET puts back every page of RAM written since, the vCPU and the devices, closing all
    /// vsock connections. Answers: `OK snapshot <pages>`, `OK reset <written> <copied>
    /// <zeroed> <micros>`, or `ERR <reason>` (then do not reuse the VM). Needs Linux 6.7+
    /// (PAGEMAP_SCAN); see vmm/src/reset/.
    #[arg(long, requires = "artifact_later")]
    reusable: bool,

    /// With --reusable, keep a full copy of guest RAM at the snapshot and compare all of RAM
    /// with it after each reset; a difference answers ERR. For tests: costs a copy of RAM.
    #[arg(long, requires = "reusable")]
    verify_reset: bool,

    /// Where the artifact starts in that file (a multiple of 4096).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 0,
        requires = "artifact_from_stdin"
    )]
    artifact_offset: u64,

    /// The artifact's length. Default: the rest of the file.
    #[arg(long, value_name = "BYTES", requires = "artifact_from_stdin")]
    artifact_len: Option<u64>,

    /// Where the guest's serial console goes: a file, or - for standard output. Default: discarded.
    #[arg(long, value_name = "PATH|-")]
    console: Option<PathBuf>,

    /// Most bytes of console output recorded; the rest is dropped.
    #[arg(long, value_name = "BYTES", default_value_t = bulwark_vmm::devices::serial::DEFAULT_CONSOLE_LIMIT)]
    console_limit: u64,

    /// Stop the guest after this many seconds of wall-clock time (e.g. 0.5). Default: no limit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<Duration>,

    /// Print setup and run times to standard error when the guest ends.
    #[arg(long)]
    timings: bool,

    /// Serve a virtio-vsock device whose host side is this Unix socket (Firecracker's
    /// convention): connect and write `CONNECT <port>\n` to reach guest port <port>; guest
    /// connections to host port P go to the socket `PATH_P`. A confined VMM (the default) has
    /// no file-system access, so it leaves PATH behind when it exits: remove it, or put it in a
    /// directory you remove (as `bulwark run` does). With --no-confine it removes PATH itself.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,

    /// Let the guest open vsock connections to host ports: a connection to port P goes to the
    /// Unix socket `PATH_P` (see --vsock-uds). Off by default, when the guest's requests are
    /// refused and the confined VMM may not create or connect sockets at all. With it, the
    /// VMM may connect to Unix sockets by path (on kernels with Landlock ABI 9 or later only
    /// below PATH's directory).
    #[arg(long)]
    vsock_guest_connect: bool,

    /// The guest's vsock context ID (3 to 4294967294).
    #[arg(long, default_value_t = bulwark_abi::vsock::DEFAULT_GUEST_CID)]
    cid: u64,

    /// The KVM device node.
    #[arg(long, value_name = "PATH", default_value = bulwark_vmm::vm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,

    /// For tests: make the guest fault on purpose after it is ready.
    #[arg(long, value_enum, value_name = "MODE")]
    guest_test: Option<GuestTest>,

    /// Die with process PID: exit at once (status 64) unless PID is this VMM's parent, and be
    /// killed (SIGKILL) when it ends, whatever ends it. `bulwark run` passes its own PID.
    #[arg(long, value_name = "PID")]
    parent_pid: Option<libc::pid_t>,

    /// Run without confinement (no user namespace, Landlock, seccomp or rlimits). For
    /// debugging only: a guest that escapes Wasm then meets a VMM with every right its user has.
    #[arg(long)]
    no_confine: bool,

    /// Print which confinement layers are on, in one line on stderr, before the guest runs.
    #[arg(long)]
    report_confinement: bool,

    /// For tests: weaken the CPU state to show whether SMEP or SMAP is enforced (use with
    /// `--guest-test ud2`; see vmm/src/cpu/probe.rs for what each outcome means).
    #[arg(long, value_enum, value_name = "PROBE", hide = true)]
    cpu_probe: Option<CpuProbeArg>,

    /// For tests: make the confined VMM misbehave, to prove the confinement holds.
    #[arg(long, value_enum, value_name = "PROBE", hide = true)]
    confine_probe: Option<ConfineProbe>,
}

/// CPU protections a probe can check.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CpuProbeArg {
    /// Supervisor-mode execution prevention.
    Smep,
    /// Supervisor-mode access prevention.
    Smap,
}

/// Deliberate misbehaviour of the confined VMM, for its own tests.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ConfineProbe {
    /// The vCPU thread calls `openat`: seccomp must kill the VMM with SIGSYS.
    ForbiddenSyscall,
    /// Seccomp off; the vCPU thread opens a file: Landlock must refuse it (reported on stderr).
    OpenFile,
}

/// Deliberate guest faults, for the VMM's own tests.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum GuestTest {
    /// Execute `ud2` (exception vector 6).
    Ud2,
    /// Read an MMIO address no device serves.
    UnclaimedMmio,
    /// Spin forever (needs --timeout).
    Spin,
    /// Serve the vsock echo service on guest port 1234 (needs --vsock-uds).
    VsockEcho,
    /// Connect to host port 5000 over vsock, greet, echo until EOF (needs --vsock-uds).
    VsockConnect,
    /// Write to the CPL0 exception stubs from CPL3 (must be a page fault).
    WriteStubs,
    /// Write to the artifact window (must be a page fault; needs --artifact-from-stdin).
    WriteArtifact,
    /// Read just past the artifact's memory slot (must be an unclaimed MMIO access).
    ReadPastArtifact,
    /// Wait for an artifact given with --artifact-later, then read just past its memory slot
    /// (must be an unclaimed MMIO access).
    ReadPastLateArtifact,
    /// Map 64 KiB of a linear-memory window and read past it (the page fault must be delivered
    /// to the guest's trap entry, which exits with status 0).
    WindowTrap,
    /// Write to the window page tables from CPL3 (must be a page fault).
    WriteWindowTables,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err("the timeout must be between 0 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Peak resident set size of this process, in KiB.
fn peak_rss_kib() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a complete `rusage` into the pointer it is given, which points to
    // memory of that type; it is read only if the call succeeded.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    // SAFETY: the call succeeded, so the struct is initialized.
    ok.then(|| unsafe { usage.assume_init() }.ru_maxrss)
}

/// The artifact range of the file on standard input (checked again when it is mapped).
fn artifact_from_stdin(offset: u64, len: Option<u64>) -> std::io::Result<ArtifactFile> {
    use std::os::fd::AsFd;
    let file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let len = match len {
        Some(len) => len,
        None => file.metadata()?.len().saturating_sub(offset),
    };
    Ok(ArtifactFile {
        file: Arc::new(file),
        offset,
        len,
    })
}

fn main() -> ExitCode {
    let started = Instant::now();
    // One malloc arena for both threads. A second thread's arena, when it shrinks, makes glibc
    // read /proc/sys/vm/overcommit_memory the first time, and the confined vCPU thread may not
    // open files: seccomp killed the VMM in the middle of a large vsock transfer.
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args = Args::parse();
    if let Some(parent) = args.parent_pid
        && let Err(e) = bulwark_confine::die_with_parent(parent)
    {
        eprintln!(
            "bulwark-vmm: --parent-pid {parent}: the parent is gone or cannot be watched ({e})"
        );
        return ExitCode::from(bulwark_vmm::outcome::code::CONFIG);
    }
    let mut config = VmConfig::new(args.guest);
    config.mem_mib = args.mem_mib;
    config.payload = args.payload;
    if args.artifact_from_stdin {
        match artifact_from_stdin(args.artifact_offset, args.artifact_len) {
            Ok(a) => config.artifact = Some(a),
            Err(e) => {
                eprintln!("bulwark-vmm: --artifact-from-stdin: {e}");
                return ExitCode::from(bulwark_vmm::outcome::code::CONFIG);
            }
        }
    }
    if args.artifact_later {
        use std::os::fd::AsFd;
        match std::io::stdin().as_fd().try_clone_to_owned() {
            Ok(socket) => config.artifact_later = Some(Arc::new(socket)),
            Err(e) => {
                eprintln!("bulwark-vmm: --artifact-later: standard input: {e}");
                return ExitCode::from(bulwark_vmm::outcome::code::CONFIG);
            }
        }
    }
    config.console = match args.console {
        None => Console::None,
        Some(p) if p.as_os_str() == "-" => Console::Stdout,
        Some(p) => Console::File(p),
    };
    config.console_limit = args.console_limit;
    config.timeout = args.timeout;
    config.kvm_stats = args.timings;
    config.reusable = args.reusable;
    config.small_pages = args.small_pages;
    config.verify_reset = args.verify_reset;
    config.kvm_device = args.kvm_device;
    config.vsock_uds = args.vsock_uds;
    config.cid = args.cid;
    config.remove_vsock_socket = args.no_confine;
    config.vsock_guest_connections = args.vsock_guest_connect;
    config.cpu_probe = args.cpu_probe.map(|p| match p {
        CpuProbeArg::Smep => CpuProbe::Smep,
        CpuProbeArg::Smap => CpuProbe::Smap,
    });
    config.test_mode = match args.guest_test {
        None => TestMode::None,
        Some(GuestTest::Ud2) => TestMode::InvalidOpcode,
        Some(GuestTest::UnclaimedMmio) => TestMode::UnclaimedMmio,
        Some(GuestTest::Spin) => TestMode::Spin,
        Some(GuestTest::VsockEcho) => TestMode::VsockEcho,
        Some(GuestTest::VsockConnect) => TestMode::VsockConnect,
        Some(GuestTest::WriteStubs) => TestMode::WriteStubs,
        Some(GuestTest::WriteArtifact) => TestMode::WriteArtifact,
        Some(GuestTest::ReadPastArtifact) => TestMode::ReadPastArtifact,
        Some(GuestTest::ReadPastLateArtifact) => TestMode::ReadPastLateArtifact,
        Some(GuestTest::WindowTrap) => TestMode::WindowTrap,
        Some(GuestTest::WriteWindowTables) => TestMode::WriteWindowTables,
    };

    let result = Vm::build(&config).and_then(|vm| {
        if args.no_confine {
            if args.report_confinement {
                eprintln!(
                    "bulwark-vmm: confinement: off (--no-confine); {}",
                    vm.cpu_protections()
                );
            }
            return vm.run(Arc::new(Unconfined));
        }
        let probe = args.confine_probe.map(|p| match p {
            ConfineProbe::ForbiddenSyscall => Probe::ForbiddenSyscall,
            ConfineProbe::OpenFile => Probe::OpenFile,
        });
        let seccomp = probe != Some(Probe::OpenFile);
        let confinement = confine_process(&config, seccomp, probe, vm.late_fds())?;
        if args.report_confinement {
            eprintln!(
                "bulwark-vmm: confinement: {}; {}",
                confinement.report,
                vm.cpu_protections()
            );
        }
        vm.run(confinement)
    });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("bulwark-vmm: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let exit_code = report.exit.exit_code();
    if exit_code != 0 {
        eprintln!("bulwark-vmm: {}", report.exit);
    }
    if args.timings {
        let t = report.times;
        let count = |n: Option<u64>| n.map_or("?".into(), |n| n.to_string());
        // "N VM exits" counts the exits that reached the VMM (benchmarks parse it); KVM's
        // counters add those it handled itself.
        eprintln!(
            "bulwark-vmm: {}; setup {:.2} ms, guest ran {:.2} ms, total {:.2} ms, {} VM exits, {} exits counted by KVM, {} page faults fixed by KVM, peak RSS {} KiB",
            report.exit,
            ms(t.entered - started),
            ms(t.stopped - t.entered),
            ms(started.elapsed()),
            t.exits,
            count(t.kvm.exits),
            count(t.kvm.page_faults_fixed),
            peak_rss_kib().map_or("?".into(), |k| k.to_string()),
        );
    }
    ExitCode::from(exit_code)
}
