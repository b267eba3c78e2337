//! How a VM ends, in one line, and the VMM's exit codes.

use std::fmt;
use std::time::Duration;

use bulwark_abi::exception;
use bulwark_abi::ports::exit_status;

/// Exit codes of `bulwark-vmm` (also listed in `--help`).
pub mod code {
    /// The command line could not be parsed (clap's convention).
    pub const USAGE: u8 = 2;
    /// An option's value is unusable: RAM size, payload, console file.
    pub const CONFIG: u8 = 64;
    /// The guest image is missing or cannot be run.
    pub const IMAGE: u8 = 65;
    /// `/dev/kvm` is missing, not accessible, or KVM refused to set up the VM.
    pub const KVM: u8 = 66;
    /// The guest crashed: CPU exception, triple fault, KVM internal error, or an access to a
    /// port or MMIO address no device serves.
    pub const GUEST_CRASH: u8 = 70;
    /// A KVM call failed while the guest ran.
    pub const VMM_FAILURE: u8 = 71;
    /// The `--timeout` ran out.
    pub const TIMEOUT: u8 = 124;
    /// SIGTERM stopped the guest (128 + the signal's number, the shell's convention).
    pub const TERMINATED: u8 = 143;
}

/// Why the guest stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote its exit status to the control port.
    Exited {
        /// The status it wrote.
        status: u32,
    },
    /// The exception stub reported a CPU exception.
    Exception {
        /// Exception vector.
        vector: u64,
        /// Error code (0 for vectors without one).
        error_code: u64,
        /// RIP of the faulting instruction, if the stub's frame could be read.
        rip: Option<u64>,
        /// CR2 (faulting address) for page faults.
        cr2: Option<u64>,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault (an exception while delivering an exception).
    TripleFault {
        /// RIP when it happened.
        rip: u64,
    },
    /// KVM_EXIT_INTERNAL_ERROR: KVM could not emulate or deliver something.
    InternalError {
        /// KVM's suberror code (1: emulation failure, 2: simultaneous exceptions, 3: delivery
        /// event failure).
        suberror: u32,
        /// RIP when it happened.
        rip: u64,
    },
    /// An `in`/`out` to a port no device serves, or of a size it refuses.
    BadPort {
        /// The port.
        port: u16,
        /// What was wrong.
        detail: String,
        /// RIP of the instruction.
        rip: u64,
    },
    /// A load or store to a guest-physical address no device serves.
    BadMmio {
        /// The address.
        addr: u64,
        /// What was wrong.
        detail: String,
        /// RIP of the instruction.
        rip: u64,
    },
    /// The guest broke a device's protocol (malformed virtqueue, bad register sequence).
    DeviceBroken {
        /// What the device found.
        detail: String,
        /// RIP of the access that found it.
        rip: u64,
    },
    /// KVM_EXIT_HLT: the guest halted (only the exception stub ever halts).
    Halted {
        /// RIP after the `hlt`.
        rip: u64,
    },
    /// Any other KVM exit the VMM does not serve.
    Unexpected {
        /// The exit, as KVM reported it.
        exit: String,
        /// RIP when it happened.
        rip: u64,
    },
    /// SIGTERM asked the VMM to stop, and the vCPU was stopped.
    Terminated {
        /// RIP where the vCPU was stopped.
        rip: u64,
    },
    /// The wall-clock `--timeout` ran out and the vCPU was stopped.
    Timeout {
        /// The timeout.
        after: Duration,
        /// RIP where the vCPU was stopped.
        rip: u64,
    },
}

impl VmExit {
    /// The VMM's process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Exited { status } => (*status).min(exit_status::MAX) as u8,
            Self::Timeout { .. } => code::TIMEOUT,
            Self::Terminated { .. } => code::TERMINATED,
            _ => code::GUEST_CRASH,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited { status } => write!(f, "guest exited with status {status}"),
            Self::Exception {
                vector,
                error_code,
                rip,
                cr2,
            } => {
                write!(
                    f,
                    "guest crashed: CPU exception {vector} ({})",
                    exception::name(*vector)
                )?;
                match rip {
                    Some(rip) => write!(f, " at RIP {rip:#x}")?,
                    None => write!(f, " (the stub's stack frame was unreadable)")?,
                }
                if exception::has_error_code(*vector) {
                    write!(f, ", error code {error_code:#x}")?;
                }
                if let Some(cr2) = cr2 {
                    write!(f, ", faulting address {cr2:#x}")?;
                }
                Ok(())
            }
            Self::TripleFault { rip } => write!(
                f,
                "guest crashed: triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"
            ),
            Self::InternalError { suberror, rip } => write!(
                f,
                "guest crashed: KVM internal error, suberror {suberror} at RIP {rip:#x}"
            ),
            Self::BadPort { port, detail, rip } => {
                write!(
                    f,
                    "guest crashed: I/O port {port:#x}: {detail} at RIP {rip:#x}"
                )
            }
            Self::BadMmio { addr, detail, rip } => write!(
                f,
                "guest crashed: MMIO address {addr:#x}: {detail} at RIP {rip:#x}"
            ),
            Self::Halted { rip } => write!(f, "guest crashed: it halted at RIP {rip:#x}"),
            Self::DeviceBroken { detail, rip } => {
                write!(f, "guest broke a device: {detail} (at RIP {rip:#x})")
            }
            Self::Unexpected { exit, rip } => {
                write!(
                    f,
                    "guest crashed: unexpected KVM exit {exit} at RIP {rip:#x}"
                )
            }
            Self::Terminated { rip } => {
                write!(f, "stopped by SIGTERM, the vCPU at RIP {rip:#x}")
            }
            Self::Timeout { after, rip } => write!(
                f,
                "guest timed out: still running after {:.3} s (--timeout), stopped at RIP {rip:#x}",
                after.as_secs_f64()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_has_a_one_line_report_and_its_code() {
        let cases = [
            (VmExit::Exited { status: 0 }, 0, "status 0"),
            (VmExit::Exited { status: 1000 }, 63, "status 1000"),
            (
                VmExit::Exception {
                    vector: 6,
                    error_code: 0,
                    rip: Some(0x401234),
                    cr2: None,
                },
                70,
                "CPU exception 6 (#UD invalid opcode) at RIP 0x401234",
            ),
            (
                VmExit::Exception {
                    vector: 14,
                    error_code: 4,
                    rip: Some(0x1),
                    cr2: Some(0x10),
                },
                70,
                "error code 0x4, faulting address 0x10",
            ),
            (VmExit::TripleFault { rip: 5 }, 70, "triple fault"),
            (
                VmExit::BadMmio {
                    addr: 0xdfff_f000,
                    detail: "no device here (read of 4 bytes)".into(),
                    rip: 9,
                },
                70,
                "MMIO address 0xdffff000",
            ),
            (
                VmExit::Timeout {
                    after: Duration::from_millis(500),
                    rip: 3,
                },
                124,
                "after 0.500 s",
            ),
            (
                VmExit::Terminated { rip: 4 },
                143,
                "stopped by SIGTERM, the vCPU at RIP 0x4",
            ),
        ];
        for (exit, code, text) in cases {
            let line = exit.to_string();
            assert_eq!(exit.exit_code(), code, "{line}");
            assert!(line.contains(text), "{line}");
            assert!(!line.contains('\n'));
        }
    }
}
