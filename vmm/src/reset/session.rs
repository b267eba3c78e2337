//! Snapshot and reset commands, asked on the main thread and carried out on the vCPU thread.
//!
//! The main thread receives a command ([`crate::late`]), hands it over with
//! [`ResetControl::ask`] and kicks the vCPU thread until it answers. The vCPU thread serves it
//! between two guest instructions ([`Reuse::serve`]), where no exit is half done: after a
//! `KVM_RUN` that returned `EINTR`, or after completing a wait-register read by re-entering
//! `KVM_RUN` with `immediate_exit` set.
//!
//! - **Snapshot** is taken only where the guest rests: right after it read the wait register,
//!   with no vsock connection, no pending client and nothing queued for it. The agent is then
//!   listening and idle. Until the guest gets there, every wait returns at once (the
//!   `attention` flag), so it does not sleep through the request.
//! - **Reset** may happen at any such point: everything is replaced. It restores every page
//!   written since the snapshot ([`MemorySnapshot::restore`]), the devices (closing every vsock
//!   connection), the vCPU's registers, the trap entry, and drops what KVM built from the
//!   windows' page tables (they changed under it: linear-memory windows went from present to
//!   absent, and a Wasm access past its memory must fault again) by removing and re-adding
//!   their memory slot ([`crate::memory::Slots::WindowTablesApart`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{VcpuFd, VmFd};

use super::memory::{FullCopy, MemorySnapshot, RestoreStats};
use super::tracker::WriteTracker;
use super::vcpu::VcpuState;
use crate::devices::DeviceState;
use crate::devices::bus::Bus;
use crate::devices::virtio::mmio::lock;
use crate::devices::virtio::vsock::VsockDevice;
use crate::memory::GuestMemory;

/// What the host asks of a reusable VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Take the snapshot (once, when the guest next rests).
    Snapshot,
    /// Put the VM back to its snapshot.
    Reset,
}

impl Command {
    /// The command's 8-byte name on the late socket.
    pub fn wire_name(self) -> &'static [u8; 8] {
        match self {
            Command::Snapshot => b"SNAPSHOT",
            Command::Reset => b"RESET\0\0\0",
        }
    }

    /// The command named `name`, if any.
    pub fn from_wire(name: &[u8]) -> Option<Self> {
        [Command::Snapshot, Command::Reset]
            .into_iter()
            .find(|c| c.wire_name().as_slice() == name)
    }
}

/// An answer: the text after `OK ` or after `ERR `.
pub type Answer = Result<String, String>;

/// The main thread's end of the command link.
#[derive(Debug)]
pub struct ResetControl {
    attention: Arc<AtomicBool>,
    commands: Sender<Command>,
    answers: Receiver<Answer>,
    /// A command went unanswered: the vCPU may still answer it, so no later answer can be
    /// trusted to be its own.
    broken: bool,
}

/// The vCPU thread's end of the command link, with what serving needs.
pub struct Reuse {
    attention: Arc<AtomicBool>,
    commands: Receiver<Command>,
    answers: Sender<Answer>,
    /// A snapshot asked for and waiting for the guest to rest.
    pending: Option<Command>,
    tracker: WriteTracker,
    vm: Arc<VmFd>,
    /// The memory slot of the windows' page tables, as registered.
    tables_slot: kvm_userspace_memory_region,
    vsock: Option<Arc<std::sync::Mutex<VsockDevice>>>,
    verify: bool,
    snapshot: Option<Snapshot>,
}

/// The VM as it was at the snapshot.
struct Snapshot {
    memory: MemorySnapshot,
    vcpu: VcpuState,
    pio: Vec<DeviceState>,
    mmio: Vec<DeviceState>,
    trap_entry: Option<u64>,
    /// All of RAM, with `--verify-reset`.
    full: Option<FullCopy>,
}

/// The parts of the vCPU a command works on.
pub struct VcpuParts<'a> {
    /// The vCPU.
    pub fd: &'a mut VcpuFd,
    /// Guest RAM.
    pub mem: &'a GuestMemory,
    /// Port-I/O devices.
    pub pio: &'a mut Bus,
    /// MMIO devices.
    pub mmio: &'a mut Bus,
    /// The guest's trap entry.
    pub trap_entry: &'a mut Option<u64>,
    /// The exception delivered last (none after a reset).
    pub delivered: &'a mut Option<crate::outcome::VmExit>,
}

/// A new command link: the main thread's end and the parts of the vCPU's end it makes.
/// `attention` is the flag the control device's wait watches.
pub fn link(attention: Arc<AtomicBool>) -> (ResetControl, LinkEnd) {
    let (commands_tx, commands) = mpsc::channel();
    let (answers, answers_rx) = mpsc::channel();
    (
        ResetControl {
            attention: Arc::clone(&attention),
            commands: commands_tx,
            answers: answers_rx,
            broken: false,
        },
        LinkEnd {
            attention,
            commands,
            answers,
        },
    )
}

/// The vCPU's end of a link before it is given what serving needs ([`Reuse::new`]).
pub struct LinkEnd {
    attention: Arc<AtomicBool>,
    commands: Receiver<Command>,
    answers: Sender<Answer>,
}

/// How often the main thread kicks a vCPU that has not taken a command yet.
const KICK_EVERY: Duration = Duration::from_millis(1);

impl ResetControl {
    /// Asks for `command` and waits up to `timeout` for the answer, calling `kick` (which
    /// interrupts the vCPU thread's `KVM_RUN` or wait) until the vCPU has taken it.
    pub fn ask(&mut self, command: Command, timeout: Duration, kick: &dyn Fn()) -> Answer {
        if self.broken {
            return Err("an earlier command was not answered: this VM cannot be reused".into());
        }
        if self.commands.send(command).is_err() {
            return Err("the guest has stopped".into());
        }
        self.attention.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            // Kicked only while the command waits to be taken: a signal would otherwise land
            // in the middle of a reset for nothing.
            if self.attention.load(Ordering::Acquire) {
                kick();
            }
            match self.answers.recv_timeout(KICK_EVERY) {
                Ok(answer) => return answer,
                Err(RecvTimeoutError::Disconnected) => return Err("the guest has stopped".into()),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    self.broken = true;
                    return Err(format!(
                        "no answer within {} ms: the guest did not come to rest (it must be \
                         idle, with no vsock connection, for a snapshot)",
                        timeout.as_millis()
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

impl Reuse {
    /// The vCPU's end of `link`, tracking writes to guest RAM with `tracker`; `tables_slot` is
    /// the slot of the windows' page tables in `vm`; `vsock` is looked at to tell whether the guest rests; `verify` keeps a copy
    /// of all of RAM to check each reset against.
    pub fn new(
        link: LinkEnd,
        tracker: WriteTracker,
        vm: Arc<VmFd>,
        tables_slot: kvm_userspace_memory_region,
        vsock: Option<Arc<std::sync::Mutex<VsockDevice>>>,
        verify: bool,
    ) -> Self {
        Self {
            attention: link.attention,
            commands: link.commands,
            answers: link.answers,
            pending: None,
            tracker,
            vm,
            tables_slot,
            vsock,
            verify,
            snapshot: None,
        }
    }

    /// Whether the main thread wants the vCPU (a cheap load, made at every wait and `EINTR`).
    pub fn wanted(&self) -> bool {
        self.attention.load(Ordering::Acquire)
    }

    /// Serves what the main thread asked for. `after_wait`: the vCPU has just exited on a
    /// wait-register read, which is completed here before anything is read or replaced; else
    /// `KVM_RUN` just returned `EINTR`, with nothing pending. An `Err` is a KVM failure that
    /// leaves the vCPU unusable: the VM must end.
    pub fn serve(&mut self, mut vcpu: VcpuParts<'_>, after_wait: bool) -> Result<(), String> {
        // Taken: the main thread stops kicking (it sets the flag again with its next command).
        self.attention.store(false, Ordering::Release);
        if after_wait {
            complete_pending_exit(vcpu.fd)?;
        }
        while let Some(command) = self
            .pending
            .take()
            .or_else(|| self.commands.try_recv().ok())
        {
            let answer = match command {
                Command::Snapshot if self.snapshot.is_some() => {
                    Err("this VM has its snapshot already: a VM snapshots once".into())
                }
                Command::Snapshot if !(after_wait && self.guest_rests()) => {
                    // Taken at the guest's next rest; its waits return at once until then.
                    self.pending = Some(command);
                    self.attention.store(true, Ordering::Release);
                    return Ok(());
                }
                Command::Snapshot => self.snapshot(&vcpu),
                Command::Reset => self.reset(&mut vcpu),
            };
            let failed_kvm = matches!(&answer, Err(e) if e.starts_with(KVM_FAILURE));
            let _ = self.answers.send(answer.clone());
            if failed_kvm {
                return answer.map(drop);
            }
        }
        Ok(())
    }

    /// Whether the vsock side is empty: no connection, no client, nothing queued.
    fn guest_rests(&self) -> bool {
        self.vsock
            .as_ref()
            .is_none_or(|v| lock(v).muxer().is_idle())
    }

    fn snapshot(&mut self, vcpu: &VcpuParts<'_>) -> Answer {
        let cpu = VcpuState::take(vcpu.fd).map_err(|e| format!("{KVM_FAILURE}{e}"))?;
        let pio = vcpu.pio.save();
        let mmio = vcpu.mmio.save();
        let full = if self.verify {
            Some(FullCopy::take(vcpu.mem).map_err(|e| e.to_string())?)
        } else {
            None
        };
        // Last: from here on every write to RAM is recorded.
        let memory = MemorySnapshot::take(vcpu.mem, &self.tracker).map_err(|e| e.to_string())?;
        let pages = memory.pages();
        self.snapshot = Some(Snapshot {
            memory,
            vcpu: cpu,
            pio,
            mmio,
            trap_entry: *vcpu.trap_entry,
            full,
        });
        Ok(format!("snapshot {pages}"))
    }

    fn reset(&mut self, vcpu: &mut VcpuParts<'_>) -> Answer {
        let Some(snap) = &self.snapshot else {
            return Err("this VM has no snapshot to reset to: send SNAPSHOT first".into());
        };
        let started = Instant::now();
        let stats: RestoreStats = snap
            .memory
            .restore(vcpu.mem, &self.tracker)
            .map_err(|e| e.to_string())?;
        vcpu.pio.restore(&snap.pio).map_err(|e| e.to_string())?;
        vcpu.mmio.restore(&snap.mmio).map_err(|e| e.to_string())?;
        snap.vcpu
            .restore(vcpu.fd)
            .map_err(|e| format!("{KVM_FAILURE}{e}"))?;
        *vcpu.trap_entry = snap.trap_entry;
        *vcpu.delivered = None;
        self.forget_guest_mappings()
            .map_err(|e| format!("{KVM_FAILURE}{e}"))?;
        if let Some(addr) = snap
            .full
            .as_ref()
            .and_then(|f| f.first_difference(vcpu.mem))
        {
            return Err(format!(
                "verification: after the reset, guest RAM differs from the snapshot at {addr:#x}"
            ));
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(format!(
            "reset {} {} {} {micros}",
            stats.pages_written, stats.pages_copied, stats.pages_zeroed
        ))
    }

    /// Drops what KVM built from the windows' page tables (its shadow page tables, on kvm_pvm,
    /// which may still hold window entries the reset just removed) by deleting their memory
    /// slot and adding it back unchanged. Where KVM zaps all slots on a deletion (its
    /// `SLOT_ZAP_ALL` quirk on), this drops everything: slower, as correct.
    fn forget_guest_mappings(&self) -> Result<(), String> {
        let mut gone = self.tables_slot;
        gone.memory_size = 0;
        // SAFETY: deleting the slot (size 0 deletes) of the windows' page tables while the only
        // vCPU is out of KVM_RUN, on this thread; re-adding the same part of guest RAM's host
        // mapping, which the `Vcpu`'s clone of guest memory keeps mapped as long as the vCPU
        // can run (the contract of `memory::register`, which registered it so).
        unsafe { self.vm.set_user_memory_region(gone) }
            .map_err(|e| format!("removing the window tables' memory slot: {e}"))?;
        // SAFETY: as above: the same slot, range and host mapping as registered at build.
        unsafe { self.vm.set_user_memory_region(self.tables_slot) }
            .map_err(|e| format!("adding the window tables' memory slot back: {e}"))
    }
}

/// The start of an answer that says the vCPU itself is broken.
const KVM_FAILURE: &str = "KVM: ";

/// Finishes the wait-register read the vCPU exited on: KVM completes an exit's instruction on
/// the next `KVM_RUN`, which with `immediate_exit` set returns `EINTR` before any guest code.
fn complete_pending_exit(fd: &mut VcpuFd) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ()).map_err(|e| e.errno());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(libc::EINTR | libc::EAGAIN) => Ok(()),
        Err(errno) => Err(format!(
            "{KVM_FAILURE}completing the wait before a snapshot or reset: KVM_RUN failed with errno {errno}"
        )),
        Ok(()) => Err(format!(
            "{KVM_FAILURE}completing the wait before a snapshot or reset: the guest ran on"
        )),
    }
}
