//! One VM from configuration to exit, in two phases with a seam between them:
//! [`Vm::build`] checks the inputs and sets up KVM, memory, CPU state and devices, opening every
//! file and socket the VM will use; [`Vm::run`] runs the vCPU on its own thread and enforces the
//! timeout. Between the two the process confines itself ([`crate::confine`]): nothing that
//! needs a path or a privilege happens after `build`.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_abi::boot::TestMode;
use bulwark_abi::virtio::vsock::{
    F_STREAM as VSOCK_F_STREAM, QUEUE_COUNT as VSOCK_QUEUE_COUNT, QUEUE_SIZE as VSOCK_QUEUE_SIZE,
};
use bulwark_abi::{layout, ports};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::artifact::{ArtifactError, ArtifactFile, ArtifactMapping};
use crate::boot::{self, BootError};
use crate::cpu::windows::Windows;
use crate::cpu::{self, CpuError};
use crate::devices::bus::{Bus, BusError};
use crate::devices::control::Control;
use crate::devices::serial::{CappedSink, DEFAULT_CONSOLE_LIMIT, Serial, SharedSink};
use crate::devices::virtio::DeviceFault;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::VsockDevice;
use crate::devices::virtio::vsock::muxer::MuxerError;
use crate::late::{LateArtifact, LateError, LateFds, Served};
use crate::loader::{self, LoaderError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::outcome::{VmExit, code};
use crate::vcpu::{Vcpu, VcpuError, VcpuTimes};

/// The KVM device node used unless configured otherwise.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// Discarded.
    None,
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// Everything that describes one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The guest ELF.
    pub guest: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// A blob loaded at [`bulwark_abi::layout::PAYLOAD_START`] for the guest.
    pub payload: Option<PathBuf>,
    /// The precompiled module mapped read-only at [`bulwark_abi::layout::ARTIFACT_START`].
    pub artifact: Option<ArtifactFile>,
    /// A Unix stream socket the artifact comes on once the guest runs ([`crate::late`]);
    /// excludes [`VmConfig::artifact`].
    pub artifact_later: Option<Arc<std::os::fd::OwnedFd>>,
    /// Where the serial console goes.
    pub console: Console,
    /// Most console bytes recorded.
    pub console_limit: u64,
    /// Wall-clock limit for the guest's run.
    pub timeout: Option<Duration>,
    /// Fault-injection mode for tests.
    pub test_mode: TestMode,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// The Unix socket the vsock device listens on; no vsock device without it.
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    pub cid: u64,
    /// Whether the guest may open vsock connections to host ports (`PATH_<port>` sockets).
    pub vsock_guest_connections: bool,
    /// A test-only CPU probe (SMEP or SMAP enforcement).
    pub cpu_probe: Option<cpu::probe::CpuProbe>,
    /// Whether the vsock socket file is removed when the VM ends. A confined VMM cannot remove
    /// it (no file-system access): the caller that chose the path does.
    pub remove_vsock_socket: bool,
    /// Whether to read KVM's counters for the report (opening them costs ~0.25 ms of set-up).
    pub kvm_stats: bool,
    /// Whether the VM takes snapshot and reset commands on the late artifact's socket
    /// ([`crate::reset`]); needs [`VmConfig::artifact_later`].
    pub reusable: bool,
    /// Leave the guest heap on 4 KiB pages (no transparent huge pages): a first touch then
    /// zeroes 4 KiB instead of 2 MiB, which suits calls that touch little memory.
    pub small_pages: bool,
    /// With `reusable`: keep a copy of all of RAM at the snapshot and check every reset against
    /// it (tests; costs a copy of RAM).
    pub verify_reset: bool,
}

impl VmConfig {
    /// A configuration with the defaults: 256 MiB, no payload, console discarded, no timeout.
    pub fn new(guest: PathBuf) -> Self {
        Self {
            guest,
            mem_mib: 256,
            payload: None,
            artifact: None,
            artifact_later: None,
            console: Console::None,
            console_limit: DEFAULT_CONSOLE_LIMIT,
            timeout: None,
            test_mode: TestMode::None,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            vsock_uds: None,
            cid: bulwark_abi::vsock::DEFAULT_GUEST_CID,
            remove_vsock_socket: true,
            cpu_probe: None,
            vsock_guest_connections: false,
            kvm_stats: false,
            reusable: false,
            verify_reset: false,
            small_pages: false,
        }
    }
}

/// Errors that keep a VM from running.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest image is unusable.
    #[error(transparent)]
    Image(#[from] LoaderError),
    /// The payload or RAM size is unusable.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// CPU state could not be set.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// `/dev/kvm` could not be used.
    #[error("{0}")]
    Kvm(String),
    /// The console file could not be created.
    #[error("cannot create console file {path}: {source}")]
    Console {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A device could not be placed (a bug in the VMM's layout).
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] MuxerError),
    /// The vsock device refused its configuration.
    #[error("vsock device: {0}")]
    VsockDevice(#[from] DeviceFault),
    /// The artifact could not be mapped.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The late artifact's socket is unusable.
    #[error("--artifact-later: {0}")]
    Late(#[from] LateError),
    /// The vCPU failed while running.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The vCPU thread could not be started or panicked.
    #[error("vCPU thread: {0}")]
    Thread(String),
    /// An option's value is unusable.
    #[error("{0}")]
    Config(String),
    /// The process could not confine itself.
    #[error("cannot confine the VMM: {0}")]
    Confine(String),
}

impl VmError {
    /// The VMM's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Image(_) => code::IMAGE,
            Self::Memory(_)
            | Self::Boot(_)
            | Self::Console { .. }
            | Self::Vsock(_)
            | Self::Config(_)
            | Self::Late(_) => code::CONFIG,
            Self::Artifact(ArtifactError::Register(_)) => code::KVM,
            Self::Artifact(_) => code::CONFIG,
            Self::Kvm(_) | Self::Cpu(_) => code::KVM,
            Self::Bus(_)
            | Self::Vcpu(_)
            | Self::Thread(_)
            | Self::VsockDevice(_)
            | Self::Confine(_) => code::VMM_FAILURE,
        }
    }
}

/// How a VM ran.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Why it stopped.
    pub exit: VmExit,
    /// When the vCPU first entered the guest and when it stopped.
    pub times: VcpuTimes,
}

fn kvm_error(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> VmError + '_ {
    move |e| VmError::Kvm(format!("{what} failed: {e}"))
}

/// Opens the KVM device with an error that says what to do.
fn open_kvm(device: &Path) -> Result<Kvm, VmError> {
    let path = CString::new(device.as_os_str().as_bytes())
        .map_err(|_| VmError::Kvm(format!("bad KVM device path {}", device.display())))?;
    let kvm = Kvm::new_with_path(&path).map_err(|e| {
        let hint = match e.errno() {
            libc::ENOENT => "the host has no KVM: load kvm_intel/kvm_amd, or use a VM with nested virtualization",
            libc::EACCES | libc::EPERM => "run as root or add your user to the `kvm` group",
            _ => "check that /dev/kvm is a working KVM device",
        };
        VmError::Kvm(format!("cannot open {}: {e}; {hint}", device.display()))
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::Kvm(format!(
            "{} speaks KVM API version {version}, this VMM needs 12",
            device.display()
        )));
    }
    Ok(kvm)
}

fn console_sink(config: &VmConfig) -> Result<CappedSink, VmError> {
    let out: Box<dyn Write + Send> = match &config.console {
        Console::None => Box::new(std::io::sink()),
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(path) => Box::new(File::create(path).map_err(|source| VmError::Console {
            path: path.clone(),
            source,
        })?),
    };
    Ok(CappedSink::new(out, config.console_limit))
}

/// Does nothing: the signal only has to interrupt `KVM_RUN`.
extern "C" fn interrupt_vcpu(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Set by SIGTERM: stop the guest and end as after a timeout, with the report.
static TERMINATE: AtomicBool = AtomicBool::new(false);

/// The SIGTERM handler: only sets [`TERMINATE`] (async-signal-safe); the main thread, which
/// looks at it every [`TERMINATE_POLL`], stops the vCPU.
extern "C" fn request_termination(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::Release);
}

/// How often the main thread looks for a SIGTERM while the guest runs.
const TERMINATE_POLL: Duration = Duration::from_millis(2);

/// Most late-artifact messages the main thread answers between two looks at the timeout.
const LATE_MESSAGES_PER_ROUND: usize = 8;

/// Whether SIGTERM asked this VMM to stop.
pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::Acquire)
}

/// A VM that is built and ready to run: guest memory loaded, CPU state set, devices in place.
///
/// Fields drop in order: the vCPU (and its file descriptor) first, then the VM file descriptor,
/// then guest memory and the late artifact, so KVM never holds a slot whose memory is gone.
pub struct Vm {
    vcpu: Vcpu,
    vm_fd: Arc<VmFd>,
    /// Keeps guest RAM mapped until after `vm_fd` is closed.
    mem: GuestMemory,
    /// With `--artifact-later`: the socket the artifact comes on, and then its mapping.
    late: Option<LateArtifact>,
    stop: Arc<AtomicBool>,
    timeout: Option<Duration>,
    cr4: u64,
}

/// What the confinement layer does on each thread of a running VM (see [`crate::confine`]).
pub trait ThreadConfinement: Send + Sync {
    /// Runs on the vCPU thread before its first `KVM_RUN`.
    fn vcpu_thread(&self) -> Result<(), String>;
    /// Runs on the main thread once the vCPU thread exists, before the guest runs.
    fn main_thread(&self) -> Result<(), String>;
}

/// No confinement (`--no-confine`).
pub struct Unconfined;

impl ThreadConfinement for Unconfined {
    fn vcpu_thread(&self) -> Result<(), String> {
        Ok(())
    }
    fn main_thread(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Stops a running vCPU from another thread.
///
/// It sets `immediate_exit` in the vCPU's shared `kvm_run` page, so the next `KVM_RUN` returns
/// at once, and signals the vCPU thread out of a `KVM_RUN` already in progress: whichever side
/// of the call the signal lands on, the vCPU stops.
pub struct VcpuHandle {
    run: *mut kvm_bindings::kvm_run,
    stop: Arc<AtomicBool>,
}

// SAFETY: the handle only writes one byte of the kvm_run mapping with a volatile store, which
// the kernel reads at KVM_RUN entry; the mapping outlives every use (see `VcpuHandle::stop`).
unsafe impl Send for VcpuHandle {}
// SAFETY: as above; concurrent volatile byte stores of the same value are harmless.
unsafe impl Sync for VcpuHandle {}

impl VcpuHandle {
    /// Asks the vCPU running on `thread` to stop, and kicks it until it has.
    ///
    /// Only called while the vCPU (which owns the `kvm_run` mapping) is alive on `thread`.
    fn stop<T>(&self, thread: &std::thread::JoinHandle<T>) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: `run` points into the kvm_run mapping of the vCPU owned by `thread`, which is
        // alive until the thread returns it; the caller joins only after this returns.
        unsafe { std::ptr::addr_of_mut!((*self.run).immediate_exit).write_volatile(1) };
        while !thread.is_finished() {
            let _ = thread.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Vm {
    /// Checks `config` and builds the VM: reads the image and payload, opens the console and
    /// the vsock socket, creates the KVM VM, memory, vCPU and devices. Nothing runs yet.
    pub fn build(config: &VmConfig) -> Result<Self, VmError> {
        // Inputs first: a bad file or size is reported before /dev/kvm is touched.
        let mem_size = memory::check_size(config.mem_mib)?;
        let image = loader::read(&config.guest, mem_size)?;
        let (mut info, payload) =
            boot::plan(mem_size, config.payload.as_deref(), config.test_mode, 0)?;
        if config.artifact.is_some() && config.artifact_later.is_some() {
            return Err(VmError::Config(
                "an artifact is given either at start or later, not both".into(),
            ));
        }
        let artifact = config
            .artifact
            .as_ref()
            .map(ArtifactMapping::map)
            .transpose()?;
        info.artifact_size = artifact.as_ref().map_or(0, ArtifactMapping::len);
        // With a late artifact the page tables map the whole window now (user read-only):
        // until the slot exists a guest access is an MMIO access no device serves, and after
        // it, so is one past the slot.
        let window = if config.artifact_later.is_some() {
            layout::ARTIFACT_MAX_SIZE
        } else {
            info.artifact_size
        };
        let mut late = config
            .artifact_later
            .as_ref()
            .map(|socket| LateArtifact::new(Arc::clone(socket)))
            .transpose()?;
        if (config.reusable || config.verify_reset) && !(late.is_some() && config.reusable) {
            return Err(VmError::Config(
                "--reusable needs --artifact-later (snapshot and reset commands come on its \
                 socket), and --verify-reset needs --reusable"
                    .into(),
            ));
        }
        let sink = SharedSink::new(console_sink(config)?);
        if config.cid <= bulwark_abi::vsock::HOST_CID || config.cid >= u64::from(u32::MAX) {
            return Err(VmError::Config(format!(
                "--cid {} is reserved: use 3 to 4294967294",
                config.cid
            )));
        }
        let vsock = match &config.vsock_uds {
            Some(path) => {
                let mut device = VsockDevice::new(config.cid, path)?;
                if !config.remove_vsock_socket {
                    device.keep_socket_file();
                }
                if config.vsock_guest_connections {
                    device.allow_guest_connections();
                }
                Some(Arc::new(Mutex::new(device)))
            }
            None => None,
        };

        let kvm = open_kvm(&config.kvm_device)?;
        // Guest memory before the VM: on an error below, locals drop in reverse order, so the
        // VM's descriptor is closed before its memory is unmapped.
        let mem = memory::create(config.mem_mib)?;
        // A reusable VM keeps 4 KiB pages: a reset restores what was written page by page, and
        // a huge page written anywhere would be restored whole.
        if !config.reusable && !config.small_pages {
            memory::prefer_huge_pages(&mem, info.heap_start);
        }
        loader::load(&mem, &image)?;
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?);
        // A reusable VM's reset drops KVM's mappings built from the windows' page tables by
        // removing their slot: without this quirk, KVM drops just those, not all of RAM's.
        let slots = if config.reusable {
            disable_slot_zap_all(&vm_fd);
            memory::Slots::WindowTablesApart
        } else {
            memory::Slots::PerRegion
        };
        // SAFETY: registered once, for this new VM. Its only vCPU, created next, can run only
        // through `Vcpu::run`, and the `Vcpu` it is moved into holds a clone of `mem` (its
        // `mem` field), which keeps the mapping alive for as long as the vCPU exists.
        unsafe { memory::register(&vm_fd, &mem, slots) }?;
        let readonly = kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
        if let Some(late) = &mut late {
            late.set_readonly(readonly);
        }
        if let Some(artifact) = &artifact {
            // SAFETY: registered once, for this new VM; the mapping moves into the `Vcpu`
            // below (its `artifact` field), which outlives every run of the VM's only vCPU.
            unsafe { artifact.register(&vm_fd, readonly) }?;
        }
        let vcpu_fd = vm_fd.create_vcpu(0).map_err(kvm_error("KVM_CREATE_VCPU"))?;
        // KVM's counters for --timings; a kernel without them runs the VM all the same.
        let stats = config
            .kvm_stats
            .then(|| crate::stats::VcpuStatsReader::open(&vcpu_fd).ok())
            .flatten();

        info.tsc_khz = vcpu_fd.get_tsc_khz().map_or(0, u64::from);
        info.vsock_cid = if vsock.is_some() { config.cid } else { 0 };
        boot::write(&mem, &info, &payload)?;
        cpu::paging::write(&mem, mem_size, window)?;
        cpu::gdt::write(&mem)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        let mut cpuid = cpu::cpuid::filter(&supported)?;
        let cr4 = cpu::regs::with_smep_smap(&mut cpuid);
        vcpu_fd
            .set_cpuid2(&cpuid)
            .map_err(kvm_error("KVM_SET_CPUID2"))?;
        if let Some(probe) = config.cpu_probe {
            cpu::probe::apply(&mem, mem_size, probe)?;
        }
        // A KVM that refuses SMEP/SMAP in CR4 gets the guest without them.
        let cr4 = match cpu::regs::set_special(&vcpu_fd, cr4) {
            Ok(()) => cr4,
            Err(_) => {
                cpu::regs::set_special(&vcpu_fd, cpu::regs::CR4)?;
                cpu::regs::CR4
            }
        };
        cpu::regs::set_general(&vcpu_fd, image.entry)?;

        let mut pio = Bus::new();
        pio.insert(
            u64::from(ports::SERIAL_COM1),
            u64::from(ports::SERIAL_PORT_COUNT),
            Box::new(Serial::new(sink.clone())),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let attention = Arc::new(AtomicBool::new(false));
        pio.insert(
            u64::from(ports::CONTROL_BASE),
            u64::from(ports::CONTROL_PORT_COUNT),
            Box::new(Control::new(
                vsock.clone(),
                Arc::clone(&stop),
                Arc::clone(&attention),
                mem.clone(),
                sink,
                Windows::new(mem.clone(), mem_size, info.heap_start),
            )),
        )?;
        let reuse = match late.as_mut().filter(|_| config.reusable) {
            Some(late) => {
                let (control, end) = crate::reset::session::link(attention);
                late.accept_commands(control);
                Some(reusable(
                    end,
                    &mem,
                    &vm_fd,
                    vsock.clone(),
                    config.verify_reset,
                )?)
            }
            None => None,
        };
        let mut mmio = Bus::new();
        if let Some(vsock) = vsock {
            // The device sees only what the guest may have it write (layout.rs): not the page
            // tables, stubs or window tables, whatever its rings say.
            // SAFETY: the view moves into the transport and the device, which the `Vcpu` below
            // owns; `Vm::run` drops the `Vcpu` before the last clone of `mem`, and on an error
            // here `mem`, declared first, is dropped last.
            let device_mem = unsafe { memory::guest_writable_view(&mem, mem_size) }?;
            let mut transport = MmioTransport::new(vsock, device_mem)?;
            // Set up before the guest starts: the guest makes no set-up exits (layout.rs).
            let rings: Vec<_> = (0..VSOCK_QUEUE_COUNT as u64)
                .map(layout::virtqueue_rings)
                .collect();
            transport.settle(VSOCK_F_STREAM, VSOCK_QUEUE_SIZE, &rings)?;
            mmio.insert(
                layout::VIRTIO_VSOCK_MMIO,
                layout::VIRTIO_MMIO_SIZE,
                Box::new(transport),
            )?;
        }
        register_signal_handler(SIGRTMIN(), interrupt_vcpu)
            .map_err(|e| VmError::Thread(format!("cannot install the vCPU kick signal: {e}")))?;
        register_signal_handler(libc::SIGTERM, request_termination)
            .map_err(|e| VmError::Thread(format!("cannot install the SIGTERM handler: {e}")))?;
        Ok(Self {
            vcpu: Vcpu {
                fd: vcpu_fd,
                mem: mem.clone(),
                artifact,
                pio,
                mmio,
                stop: Arc::clone(&stop),
                timeout: config.timeout,
                stats,
                trap_entry: None,
                delivered: None,
                reuse,
            },
            vm_fd,
            mem,
            late,
            stop,
            timeout: config.timeout,
            cr4,
        })
    }

    /// With `--artifact-later`, the descriptors its confined main thread uses
    /// ([`crate::confine::confine_process`] allows them only).
    pub fn late_fds(&self) -> Option<LateFds> {
        self.late.as_ref().map(|l| l.fds(&self.vm_fd))
    }

    /// The CPU's own protections of the guest's CPL0 stubs, in words (SMEP, SMAP).
    pub fn cpu_protections(&self) -> String {
        let on = |bit| if self.cr4 & bit != 0 { "on" } else { "off" };
        format!(
            "smep {}; smap {}",
            on(cpu::regs::CR4_SMEP),
            on(cpu::regs::CR4_SMAP)
        )
    }

    /// Runs the guest on a vCPU thread until it stops or its timeout passes, with `confine`
    /// applied to each thread before the guest's first instruction.
    pub fn run(self, confine: Arc<dyn ThreadConfinement>) -> Result<RunReport, VmError> {
        let Self {
            mut vcpu,
            vm_fd,
            mem,
            mut late,
            stop,
            timeout,
            ..
        } = self;
        let handle = VcpuHandle {
            run: std::ptr::from_mut(vcpu.fd.get_kvm_run()),
            stop,
        };
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<bool>();
        let on_vcpu = Arc::clone(&confine);
        let thread = std::thread::Builder::new()
            .name("bulwark-vcpu0".into())
            .spawn(move || {
                let result = on_vcpu
                    .vcpu_thread()
                    .map_err(VmError::Confine)
                    .and_then(|()| {
                        // The guest starts only once the main thread is confined too.
                        match go_rx.recv() {
                            Ok(true) => vcpu.run().map_err(VmError::from),
                            _ => Err(VmError::Confine(
                                "the main thread could not be confined".into(),
                            )),
                        }
                    });
                let _ = done_tx.send(());
                (result, vcpu)
            })
            .map_err(|e| VmError::Thread(format!("cannot start the vCPU thread: {e}")))?;
        let confined = confine.main_thread();
        let _ = go_tx.send(confined.is_ok());
        // Wait for the guest to end, its timeout to pass, or a SIGTERM; meanwhile, with
        // `--artifact-later`, serve the artifact's socket (this thread, confined: see
        // crate::late) until its caller closes it.
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let stop = loop {
            let wait = deadline.map_or(TERMINATE_POLL, |d| {
                d.saturating_duration_since(std::time::Instant::now())
                    .min(TERMINATE_POLL)
            });
            let watched = late.as_mut().filter(|l| l.is_open() && confined.is_ok());
            let finished = match watched {
                Some(late) => {
                    // A few messages per round at most: a caller that sends without end
                    // cannot keep this thread from the timeout.
                    if late.readable(wait) {
                        for _ in 0..LATE_MESSAGES_PER_ROUND {
                            let kick = || {
                                let _ = thread.kill(SIGRTMIN());
                            };
                            if !matches!(
                                late.serve(&vm_fd, &mem, &kick),
                                Served::Answered(_) | Served::Commanded(_)
                            ) {
                                break;
                            }
                        }
                    }
                    !matches!(done_rx.try_recv(), Err(mpsc::TryRecvError::Empty))
                }
                None => !matches!(
                    done_rx.recv_timeout(wait),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ),
            };
            if finished {
                break false;
            }
            if terminate_requested() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                break true;
            }
        };
        if stop {
            handle.stop(&thread);
        }
        let joined = thread.join();
        // The vCPU and VM descriptors go before guest memory and the late artifact's mapping;
        // the console is flushed as the devices drop, before the caller reports.
        let joined = joined.map(|(result, vcpu)| {
            drop(vcpu);
            result
        });
        drop(vm_fd);
        drop(mem);
        drop(late);
        let result = joined.map_err(|_| VmError::Thread("the vCPU thread panicked".into()))?;
        confined.map_err(VmError::Confine)?;
        let (exit, times) = result?;
        Ok(RunReport { exit, times })
    }
}

/// The vCPU's side of VM reuse: a write tracker over guest RAM and RAM's memory slot.
fn reusable(
    end: crate::reset::session::LinkEnd,
    mem: &GuestMemory,
    vm_fd: &Arc<VmFd>,
    vsock: Option<Arc<Mutex<VsockDevice>>>,
    verify: bool,
) -> Result<crate::reset::session::Reuse, VmError> {
    let reuse = |e: String| VmError::Config(format!("--reusable: {e}"));
    let regions = memory::slots(mem, memory::Slots::PerRegion)?;
    let [ram] = regions.as_slice() else {
        return Err(reuse(format!(
            "guest RAM must be one region, not {}: give the VM less RAM",
            regions.len()
        )));
    };
    let tables = memory::slots(mem, memory::Slots::WindowTablesApart)?
        .into_iter()
        .find(|s| s.slot == memory::WINDOW_TABLES_SLOT)
        .ok_or_else(|| reuse("guest RAM does not hold the windows' page tables".into()))?;
    let len = usize::try_from(ram.memory_size).map_err(|e| reuse(e.to_string()))?;
    // SAFETY: the range is guest RAM's private anonymous mapping (memory::create), page
    // aligned; the `Reuse` holding the tracker moves into the `Vcpu`, whose clone of `mem`
    // keeps the mapping alive for as long as the tracker lives. Nothing else registers a
    // userfaultfd on it.
    let tracker =
        unsafe { crate::reset::tracker::WriteTracker::new(ram.userspace_addr as *mut u8, len) }
            .map_err(|e| reuse(e.to_string()))?;
    Ok(crate::reset::session::Reuse::new(
        end,
        tracker,
        Arc::clone(vm_fd),
        tables,
        vsock,
        verify,
    ))
}

/// Turns off KVM's `SLOT_ZAP_ALL` quirk where KVM offers that, so that removing a memory slot
/// drops only the mappings of that slot's memory (Linux 6.12+). Without it, a reset drops all
/// of them: slower, still correct.
fn disable_slot_zap_all(vm_fd: &VmFd) {
    let cap = libc::c_ulong::from(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2);
    let offered = u64::try_from(vm_fd.check_extension_raw(cap)).unwrap_or(0);
    let quirk = u64::from(kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL);
    if offered & quirk != 0 {
        let mut enable = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
            ..Default::default()
        };
        enable.args[0] = quirk;
        let _ = vm_fd.enable_cap(&enable);
    }
}

/// Builds the VM described by `config` and runs it to its end, unconfined (tests and tools
/// that embed the VMM; `bulwark-vmm` confines itself between the two phases).
pub fn run(config: &VmConfig) -> Result<RunReport, VmError> {
    Vm::build(config)?.run(Arc::new(Unconfined))
}
