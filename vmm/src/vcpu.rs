//! The vCPU thread: runs the guest and serves its exits until it stops.
//!
//! Every exit is served on this thread: port I/O and MMIO go to the buses, everything else ends
//! the VM with a [`VmExit`] naming the cause. The VMM's main thread stops a guest that overruns
//! its time by setting the stop flag and signalling this thread out of `KVM_RUN`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulwark_abi::exception::ExceptionFrame;
use bulwark_abi::{layout, ports, window};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::bus::Bus;
use crate::devices::{BadAccess, DeviceRequest};
use crate::memory::GuestMemory;
use crate::outcome::VmExit;
use crate::stats::{VcpuStats, VcpuStatsReader};

/// Errors that end the vCPU without a guest-caused reason.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM call failed while the guest ran.
    #[error("{what} failed while the guest ran: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// Timestamps of a vCPU's life, for `--timings` and benchmarks.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTimes {
    /// When the first `KVM_RUN` was issued.
    pub entered: Instant,
    /// When the guest stopped.
    pub stopped: Instant,
    /// VM exits served (each costs tens of microseconds on kvm_pvm).
    pub exits: u64,
    /// KVM's own counters when the guest stopped: all exits, page faults.
    pub kvm: VcpuStats,
}

/// One vCPU with the devices it serves.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Guest RAM (for reading the exception frame).
    pub mem: GuestMemory,
    /// The artifact window's mapping, kept alive while the vCPU can run.
    pub artifact: Option<crate::artifact::ArtifactMapping>,
    /// Port-I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Set by the main thread when the guest's time is up.
    pub stop: Arc<AtomicBool>,
    /// The timeout the main thread enforces, for the report.
    pub timeout: Option<Duration>,
    /// KVM's statistics for this vCPU, read once when the guest stops (`None`: not available).
    pub stats: Option<VcpuStatsReader>,
    /// Where the guest asked for [`ports::TRAP_VECTORS`] to be delivered (none yet: fatal).
    pub trap_entry: Option<u64>,
    /// The exception delivered last, reported if the guest says it was not a Wasm trap.
    pub delivered: Option<VmExit>,
    /// Snapshot and reset, for a reusable VM ([`crate::reset`]).
    pub reuse: Option<crate::reset::session::Reuse>,
}

/// What serving one exit decided.
enum Step {
    Continue,
    Request(DeviceRequest),
    Stop(fn(u64) -> VmExit),
    InternalError,
    Unexpected(String),
    BadPort(u16, String),
    BadMmio(u64, String),
}

fn access_detail(e: Option<BadAccess>, write: bool, len: usize) -> String {
    match e {
        Some(e) => e.to_string(),
        None => format!(
            "no device here ({} of {len} bytes)",
            if write { "write" } else { "read" }
        ),
    }
}

impl Vcpu {
    /// Runs the guest until it stops; returns why, with the times it entered and stopped.
    pub fn run(&mut self) -> Result<(VmExit, VcpuTimes), VcpuError> {
        let entered = Instant::now();
        let mut exits = 0u64;
        let exit = loop {
            if self.stop.load(Ordering::Acquire) {
                let rip = self.rip()?;
                if crate::vm::terminate_requested() {
                    break VmExit::Terminated { rip };
                }
                break VmExit::Timeout {
                    after: self.timeout.unwrap_or_default(),
                    rip,
                };
            }
            let step = match self.fd.run() {
                Ok(exit) => {
                    exits += 1;
                    serve(exit, &mut self.pio, &mut self.mmio)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Err(detail) = self.serve_reuse(false) {
                        break VmExit::DeviceBroken {
                            detail,
                            rip: self.rip()?,
                        };
                    }
                    Step::Continue
                }
                Err(source) => {
                    return Err(VcpuError::Kvm {
                        what: "KVM_RUN",
                        source,
                    });
                }
            };
            match step {
                Step::Continue | Step::Request(DeviceRequest::None) => {}
                Step::Request(DeviceRequest::Waited) => {
                    if let Err(detail) = self.serve_reuse(true) {
                        break VmExit::DeviceBroken {
                            detail,
                            rip: self.rip()?,
                        };
                    }
                }
                Step::Request(DeviceRequest::Exit(status)) => break VmExit::Exited { status },
                Step::Request(DeviceRequest::ExceptionReported(vector)) => {
                    if let Some(exit) = self.exception(vector)? {
                        break exit;
                    }
                }
                Step::Request(DeviceRequest::TrapEntry(addr)) => {
                    if !(layout::IMAGE_USER_START..layout::IMAGE_END).contains(&addr) {
                        break VmExit::DeviceBroken {
                            detail: format!(
                                "trap entry {addr:#x} is outside the guest image's CPL3 code"
                            ),
                            rip: self.rip()?,
                        };
                    }
                    self.trap_entry = Some(addr);
                }
                Step::Request(DeviceRequest::TrapUnhandled) => match self.delivered.take() {
                    Some(exit) => break exit,
                    None => {
                        break VmExit::DeviceBroken {
                            detail: "an unhandled trap was reported but none was delivered".into(),
                            rip: self.rip()?,
                        };
                    }
                },
                Step::Request(DeviceRequest::DeviceBroken(detail)) => {
                    break VmExit::DeviceBroken {
                        detail,
                        rip: self.rip()?,
                    };
                }
                Step::Stop(make) => break make(self.rip()?),
                Step::InternalError => {
                    break VmExit::InternalError {
                        suberror: self.internal_suberror(),
                        rip: self.rip()?,
                    };
                }
                Step::Unexpected(exit) => {
                    break VmExit::Unexpected {
                        exit,
                        rip: self.rip()?,
                    };
                }
                Step::BadPort(port, detail) => {
                    break VmExit::BadPort {
                        port,
                        detail,
                        rip: self.rip()?,
                    };
                }
                Step::BadMmio(addr, detail) => {
                    break VmExit::BadMmio {
                        addr,
                        detail,
                        rip: self.rip()?,
                    };
                }
            }
        };
        let stopped = Instant::now();
        let kvm = self
            .stats
            .take()
            .and_then(|stats| stats.read().ok())
            .unwrap_or_default();
        Ok((
            exit,
            VcpuTimes {
                entered,
                stopped,
                exits,
                kvm,
            },
        ))
    }

    /// Serves the snapshot or reset the main thread asked for, if it asked (see
    /// [`crate::reset::session`]); `after_wait`: the vCPU exited on a wait-register read.
    fn serve_reuse(&mut self, after_wait: bool) -> Result<(), String> {
        let Some(reuse) = self.reuse.as_mut().filter(|r| r.wanted()) else {
            return Ok(());
        };
        reuse
            .serve(
                crate::reset::session::VcpuParts {
                    fd: &mut self.fd,
                    mem: &self.mem,
                    pio: &mut self.pio,
                    mmio: &mut self.mmio,
                    trap_entry: &mut self.trap_entry,
                    delivered: &mut self.delivered,
                },
                after_wait,
            )
            .map_err(|e| format!("VM reuse: {e}"))
    }

    fn rip(&self) -> Result<u64, VcpuError> {
        self.fd
            .get_regs()
            .map(|r| r.rip)
            .map_err(|source| VcpuError::Kvm {
                what: "KVM_GET_REGS",
                source,
            })
    }

    /// KVM's suberror for the last KVM_EXIT_INTERNAL_ERROR.
    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in; reading a u32 from it is reading plain data.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// Serves an exception the stub announced: the frame is at the stub's RSP. Returns the
    /// report that ends the VM, or `None` when the exception was delivered to the guest's trap
    /// entry (see [`bulwark_abi::window`]). The frame is guest data: it is only read if it lies
    /// in RAM, and only trusted if its vector matches the one the stub wrote.
    fn exception(&mut self, vector: u32) -> Result<Option<VmExit>, VcpuError> {
        let kvm = |what| move |source| VcpuError::Kvm { what, source };
        let mut regs = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let mut sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mut raw = [0u8; ExceptionFrame::SIZE];
        let frame = self
            .mem
            .read_slice(&mut raw, GuestAddress(regs.rsp))
            .ok()
            .map(|()| ExceptionFrame::from_bytes(&raw))
            .filter(|f| f.vector == u64::from(vector));
        let report = VmExit::Exception {
            vector: u64::from(vector),
            error_code: frame.map_or(0, |f| f.error_code),
            rip: frame.map(|f| f.rip),
            cr2: (vector == 14).then_some(sregs.cr2),
        };
        let (Some(entry), Some(frame)) = (self.trap_entry, frame) else {
            return Ok(Some(report));
        };
        let Some(rsp) = deliverable(vector, &frame) else {
            return Ok(Some(report));
        };
        // Resume at CPL3 at the entry, as an `iretq` would (the stub's CPL0 stack is simply
        // left; the next exception starts at its top again).
        let page_fault = vector == 14;
        regs.rdi = frame.rip;
        regs.rsi = regs.rbp;
        regs.rdx = u64::from(page_fault);
        regs.rcx = if page_fault { sregs.cr2 } else { 0 };
        regs.r8 = u64::from(vector);
        regs.rsp = rsp;
        regs.rip = entry;
        regs.rflags = crate::cpu::regs::RFLAGS;
        sregs.cs = crate::cpu::gdt::user_code_segment();
        sregs.ss = crate::cpu::gdt::user_data_segment();
        self.fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        self.delivered = Some(report);
        Ok(None)
    }
}

/// The stack pointer to deliver exception `vector` with, if it can be delivered: one of
/// [`ports::TRAP_VECTORS`], raised at CPL3, on the guest stack with at least
/// [`window::TRAP_STACK_MIN`] bytes left below it.
fn deliverable(vector: u32, frame: &ExceptionFrame) -> Option<u64> {
    let stack = layout::STACK_BOTTOM + window::TRAP_STACK_MIN..=layout::STACK_TOP;
    (ports::TRAP_VECTORS.contains(&vector) && frame.cs & 3 == 3 && stack.contains(&frame.rsp))
        .then(|| (frame.rsp - window::TRAP_STACK_GAP) & !15)
}

/// Serves one exit against the buses.
fn serve(exit: VcpuExit<'_>, pio: &mut Bus, mmio: &mut Bus) -> Step {
    match exit {
        VcpuExit::IoOut(port, data) => match pio.get(u64::from(port), 1) {
            Some((offset, dev)) => match dev.write(offset, data) {
                Ok(req) => Step::Request(req),
                Err(e) => Step::BadPort(port, access_detail(Some(e), true, data.len())),
            },
            None => Step::BadPort(port, access_detail(None, true, data.len())),
        },
        VcpuExit::IoIn(port, data) => match pio.get(u64::from(port), 1) {
            Some((offset, dev)) => match dev.read(offset, data) {
                Ok(req) => Step::Request(req),
                Err(e) => Step::BadPort(port, access_detail(Some(e), false, data.len())),
            },
            None => Step::BadPort(port, access_detail(None, false, data.len())),
        },
        VcpuExit::MmioWrite(addr, data) => match mmio.get(addr, data.len()) {
            Some((offset, dev)) => match dev.write(offset, data) {
                Ok(req) => Step::Request(req),
                Err(e) => Step::BadMmio(addr, access_detail(Some(e), true, data.len())),
            },
            None => Step::BadMmio(addr, access_detail(None, true, data.len())),
        },
        VcpuExit::MmioRead(addr, data) => match mmio.get(addr, data.len()) {
            Some((offset, dev)) => match dev.read(offset, data) {
                Ok(req) => Step::Request(req),
                Err(e) => Step::BadMmio(addr, access_detail(Some(e), false, data.len())),
            },
            None => Step::BadMmio(addr, access_detail(None, false, data.len())),
        },
        VcpuExit::Hlt => Step::Stop(|rip| VmExit::Halted { rip }),
        VcpuExit::Shutdown => Step::Stop(|rip| VmExit::TripleFault { rip }),
        // The suberror is read from kvm_run once the exit's borrow has ended.
        VcpuExit::InternalError => Step::InternalError,
        VcpuExit::FailEntry(reason, _) => {
            Step::Unexpected(format!("FAIL_ENTRY (hardware reason {reason:#x})"))
        }
        VcpuExit::Intr => Step::Continue,
        other => Step::Unexpected(format!("{other:?}").chars().take(120).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(cs: u64, rsp: u64) -> ExceptionFrame {
        ExceptionFrame {
            vector: 14,
            cs,
            rsp,
            ..Default::default()
        }
    }

    #[test]
    fn only_cpl3_traps_on_the_guest_stack_are_delivered() {
        let top = layout::STACK_TOP;
        let user = u64::from(crate::cpu::gdt::USER_CS);
        let kernel = u64::from(crate::cpu::gdt::KERNEL_CS);
        assert_eq!(
            deliverable(14, &frame(user, top - 8)),
            Some((top - 8 - window::TRAP_STACK_GAP) & !15)
        );
        assert_eq!(deliverable(0, &frame(user, top)).map(|s| s % 16), Some(0));
        assert!(deliverable(6, &frame(user, top - 0x1234)).is_some());
        // Other vectors, CPL0, a stack that is nearly used up, or not the guest stack at all.
        assert_eq!(deliverable(13, &frame(user, top)), None);
        assert_eq!(deliverable(8, &frame(user, top)), None);
        assert_eq!(deliverable(14, &frame(kernel, top)), None);
        let low = layout::STACK_BOTTOM + window::TRAP_STACK_MIN;
        assert!(deliverable(14, &frame(user, low)).is_some());
        assert_eq!(deliverable(14, &frame(user, low - 8)), None);
        assert_eq!(deliverable(14, &frame(user, top + 8)), None);
        assert_eq!(deliverable(14, &frame(user, layout::window_start(0))), None);
    }
}
