//! The vCPU thread: runs the guest and serves its exits until it stops.
//!
//! Every exit is served on this thread: port I/O and MMIO go to the buses, everything else ends
//! the VM with a [`VmExit`] naming the cause. The VMM's main thread stops a guest that overruns
//! its time by setting the stop flag and signalling this thread out of `KVM_RUN`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulwark_abi::exception::ExceptionFrame;
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
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(source) => {
                    return Err(VcpuError::Kvm {
                        what: "KVM_RUN",
                        source,
                    });
                }
            };
            match step {
                Step::Continue | Step::Request(DeviceRequest::None) => {}
                Step::Request(DeviceRequest::Exit(status)) => break VmExit::Exited { status },
                Step::Request(DeviceRequest::ExceptionReported(vector)) => {
                    break self.exception(vector)?;
                }
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

    /// Builds the report for an exception the stub announced: the frame is at the stub's RSP.
    /// The frame is guest data: it is only read if it lies in RAM, and only trusted for the
    /// report if its vector matches the one the stub wrote.
    fn exception(&self, vector: u32) -> Result<VmExit, VcpuError> {
        let kvm = |what| move |source| VcpuError::Kvm { what, source };
        let rsp = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?.rsp;
        let cr2 = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?.cr2;
        let mut raw = [0u8; ExceptionFrame::SIZE];
        let frame = self
            .mem
            .read_slice(&mut raw, GuestAddress(rsp))
            .ok()
            .map(|()| ExceptionFrame::from_bytes(&raw))
            .filter(|f| f.vector == u64::from(vector));
        Ok(VmExit::Exception {
            vector: u64::from(vector),
            error_code: frame.map_or(0, |f| f.error_code),
            rip: frame.map(|f| f.rip),
            cr2: (vector == 14).then_some(cr2),
        })
    }
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
