//! The VMM's confinement, between [`crate::Vm::build`] and [`crate::Vm::run`].
//!
//! Once the VM is built, every file, socket and KVM descriptor the VMM will use is open. The
//! process then gives up what it no longer needs, in this order:
//!
//! 1. a new user namespace (while it has one thread): no capability over the host's resources,
//!    even when started as root;
//! 2. no_new_privs, not dumpable, and rlimits: no core dumps, a cap on open files;
//! 3. Landlock: no file-system access, no TCP, abstract Unix sockets and signals scoped;
//! 4. per thread, a seccomp allow-list: the vCPU thread may run the guest and serve its devices
//!    (KVM_RUN, register reads, the register writes that deliver a trap to the guest, the vsock
//!    sockets, memory, futexes); the main thread may wait, kick the vCPU and exit. Anything else
//!    kills the process with SIGSYS. With `--artifact-later` the main thread also receives the
//!    artifact ([`crate::late`]): `recvmsg` and `sendto` on that socket only, `ppoll`, `fstat`,
//!    and `KVM_SET_USER_MEMORY_REGION` on the VM's descriptor only (`mmap` and `close` it has
//!    already).
//!
//! The main thread also caps processes at zero once the vCPU thread exists.

use std::sync::Arc;

use bulwark_confine::{
    self as confine, LayerState, Rlimits, SeccompCmpArgLen, SyscallRules, allow, allow_if,
};

use crate::late::LateFds;
use crate::vm::{ThreadConfinement, VmConfig, VmError};

/// Descriptors the VMM may hold beyond those open at confinement: the vsock device's
/// connections and pending clients, plus a few for the standard library.
const SPARE_DESCRIPTORS: u64 = (crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS
    + crate::devices::virtio::vsock::muxer::MAX_PENDING_CLIENTS)
    as u64
    + 32;

/// The only KVM ioctls the vCPU thread may issue once confined.
mod kvm_ioctl {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_REGS,
        kvm_bindings::KVMIO,
        0x81,
        kvm_bindings::kvm_regs
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_SREGS,
        kvm_bindings::KVMIO,
        0x83,
        kvm_bindings::kvm_sregs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_REGS,
        kvm_bindings::KVMIO,
        0x82,
        kvm_bindings::kvm_regs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_SREGS,
        kvm_bindings::KVMIO,
        0x84,
        kvm_bindings::kvm_sregs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        kvm_bindings::KVMIO,
        0x46,
        kvm_bindings::kvm_userspace_memory_region
    );
    // What a snapshot and a reset read and write (crate::reset).
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_VCPU_EVENTS,
        kvm_bindings::KVMIO,
        0x9f,
        kvm_bindings::kvm_vcpu_events
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_VCPU_EVENTS,
        kvm_bindings::KVMIO,
        0xa0,
        kvm_bindings::kvm_vcpu_events
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_DEBUGREGS,
        kvm_bindings::KVMIO,
        0xa1,
        kvm_bindings::kvm_debugregs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_DEBUGREGS,
        kvm_bindings::KVMIO,
        0xa2,
        kvm_bindings::kvm_debugregs
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_XSAVE,
        kvm_bindings::KVMIO,
        0xa4,
        kvm_bindings::kvm_xsave
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_XSAVE,
        kvm_bindings::KVMIO,
        0xa5,
        kvm_bindings::kvm_xsave
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_XCRS,
        kvm_bindings::KVMIO,
        0xa6,
        kvm_bindings::kvm_xcrs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_XCRS,
        kvm_bindings::KVMIO,
        0xa7,
        kvm_bindings::kvm_xcrs
    );
}

/// A test-only misbehaviour of the confined VMM, to prove the confinement holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The vCPU thread opens a file (`openat`), which its allow-list forbids.
    ForbiddenSyscall,
    /// The vCPU thread opens a file with seccomp off, which Landlock must refuse; the VMM
    /// reports the outcome on stderr and goes on.
    OpenFile,
}

/// Which layers are on, for `--report-confinement`, `bulwark doctor` and tests.
#[derive(Clone, Debug)]
pub struct Report {
    /// A new user namespace.
    pub user_namespace: LayerState,
    /// Landlock.
    pub landlock: LayerState,
    /// Seccomp allow-lists on both threads.
    pub seccomp: LayerState,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no_new_privs on; dumpable off; rlimits on; user namespace {}; landlock {}; seccomp {}",
            self.user_namespace, self.landlock, self.seccomp
        )
    }
}

/// The confinement of one VMM process: what was applied to the process, and the filters each
/// thread installs when [`crate::Vm::run`] starts it.
pub struct Confinement {
    /// What is on.
    pub report: Report,
    /// The limits set on the process; the main thread adds the process cap.
    rlimits: Rlimits,
    vcpu_filter: Option<confine::Filter>,
    main_filter: Option<confine::Filter>,
    probe: Option<Probe>,
}

/// Confines this process for the VM `config` describes, after [`crate::Vm::build`] and while
/// the process still has a single thread. `seccomp` off is for the Landlock probe only. `late`
/// ([`crate::Vm::late_fds`]) names the descriptors the main thread receives a late artifact
/// with, if the VM takes one.
pub fn confine_process(
    config: &VmConfig,
    seccomp: bool,
    probe: Option<Probe>,
    late: Option<LateFds>,
) -> Result<Arc<Confinement>, VmError> {
    let err = |e: confine::ConfineError| VmError::Confine(e.to_string());
    let user_namespace = confine::enter_user_namespace();
    confine::no_new_privs().map_err(err)?;
    confine::not_dumpable().map_err(err)?;
    let rlimits = Rlimits {
        core: 0,
        file_size: None,
        open_files: highest_open_descriptor() + 1 + SPARE_DESCRIPTORS,
        processes: None,
        address_space: None,
    };
    confine::set_rlimits(&rlimits).map_err(err)?;
    // Only a VMM that serves guest-initiated connections connects to Unix sockets by path.
    let unix_dir = config
        .vsock_uds
        .as_deref()
        .filter(|_| config.vsock_guest_connections)
        .and_then(std::path::Path::parent)
        .filter(|d| !d.as_os_str().is_empty());
    let landlock = confine::deny_filesystem(unix_dir);
    let (vcpu_filter, main_filter, seccomp_state) = if seccomp {
        (
            Some(
                confine::compile(
                    vcpu_allow_list(config.vsock_guest_connections, config.reusable)
                        .map_err(err)?,
                )
                .map_err(err)?,
            ),
            Some(confine::compile(main_allow_list(late).map_err(err)?).map_err(err)?),
            LayerState::Active("kill on any other call".into()),
        )
    } else {
        (None, None, LayerState::Off)
    };
    Ok(Arc::new(Confinement {
        rlimits,
        report: Report {
            user_namespace,
            landlock,
            seccomp: seccomp_state,
        },
        vcpu_filter,
        main_filter,
        probe,
    }))
}

/// The highest descriptor number open now (read before Landlock closes `/proc` to us).
fn highest_open_descriptor() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or(1024)
}

impl ThreadConfinement for Confinement {
    fn vcpu_thread(&self) -> Result<(), String> {
        if let Some(filter) = &self.vcpu_filter {
            confine::install(filter).map_err(|e| e.to_string())?;
        }
        match self.probe {
            Some(Probe::ForbiddenSyscall) => {
                // Must not return: the filter kills the process on `openat`.
                let _ = std::fs::File::open("/etc/hostname");
                Err("probe: openat was allowed on the vCPU thread".into())
            }
            Some(Probe::OpenFile) => {
                match std::fs::File::open("/etc/hostname") {
                    Ok(_) => eprintln!("bulwark-vmm: probe: opened /etc/hostname"),
                    Err(e) => eprintln!("bulwark-vmm: probe: open refused: {e}"),
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn main_thread(&self) -> Result<(), String> {
        if let Some(filter) = &self.main_filter {
            // Every thread exists now: no more processes or threads.
            confine::set_rlimits(&Rlimits {
                processes: Some(0),
                ..self.rlimits
            })
            .map_err(|e| e.to_string())?;
            confine::install(filter).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// System calls both threads make: the runtime's essentials (memory, futexes, time, signal
/// return, writing the console and reports, exit), sleeping, and their own ids.
fn common() -> Vec<SyscallRules> {
    let mut list = confine::runtime_essentials();
    list.extend(
        [
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettid,
            libc::SYS_getpid,
        ]
        .into_iter()
        .map(allow),
    );
    list
}

/// The vCPU thread: run the guest, read registers for reports, and serve the vsock device
/// (accept and read/write its Unix sockets, epoll; with `guest_connections`, create Unix
/// sockets and connect them to host ports). With `reusable`, also snapshot and reset the VM:
/// the vCPU's other state, RAM's memory slot, write-protecting RAM and finding its written
/// pages ([`crate::reset`]).
fn vcpu_allow_list(
    guest_connections: bool,
    reusable: bool,
) -> Result<Vec<SyscallRules>, confine::ConfineError> {
    let mut list = common();
    let mut ioctls = vec![
        kvm_ioctl::KVM_RUN(),
        kvm_ioctl::KVM_GET_REGS(),
        kvm_ioctl::KVM_GET_SREGS(),
        kvm_ioctl::KVM_SET_REGS(),
        kvm_ioctl::KVM_SET_SREGS(),
        libc::FIONBIO,
    ];
    if reusable {
        ioctls.extend([
            kvm_ioctl::KVM_GET_VCPU_EVENTS(),
            kvm_ioctl::KVM_SET_VCPU_EVENTS(),
            kvm_ioctl::KVM_GET_DEBUGREGS(),
            kvm_ioctl::KVM_SET_DEBUGREGS(),
            kvm_ioctl::KVM_GET_XSAVE(),
            kvm_ioctl::KVM_SET_XSAVE(),
            kvm_ioctl::KVM_GET_XCRS(),
            kvm_ioctl::KVM_SET_XCRS(),
            kvm_ioctl::KVM_SET_USER_MEMORY_REGION(),
            crate::reset::tracker::abi::UFFDIO_WRITEPROTECT(),
            crate::reset::tracker::abi::PAGEMAP_SCAN(),
        ]);
    }
    list.push(allow_if(
        libc::SYS_ioctl,
        1,
        SeccompCmpArgLen::Dword,
        &ioctls,
    )?);
    if guest_connections {
        list.push(allow_if(
            libc::SYS_socket,
            0,
            SeccompCmpArgLen::Dword,
            &[libc::AF_UNIX as u64],
        )?);
        list.push(allow(libc::SYS_connect));
    }
    list.push(allow_if(
        libc::SYS_fcntl,
        1,
        SeccompCmpArgLen::Dword,
        &[
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
        ],
    )?);
    list.extend(
        [
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_accept4,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
        ]
        .into_iter()
        .map(allow),
    );
    Ok(list)
}

/// The main thread once the vCPU runs: wait for it or its timeout, kick it, reap it, report,
/// exit; with `late`, receive the artifact on `late.socket` and give it to the VM `late.vm`.
fn main_allow_list(late: Option<LateFds>) -> Result<Vec<SyscallRules>, confine::ConfineError> {
    let mut list = common();
    list.extend(
        [
            libc::SYS_tgkill,
            libc::SYS_getrusage,
            libc::SYS_sched_getaffinity,
        ]
        .into_iter()
        .map(allow),
    );
    if let Some(late) = late {
        let fd = |fd: std::os::fd::RawFd| u64::try_from(fd).unwrap_or(u64::MAX);
        let on_socket = |nr| allow_if(nr, 0, SeccompCmpArgLen::Dword, &[fd(late.socket)]);
        // ppoll's descriptors are behind a pointer, out of seccomp's sight; waiting is harmless.
        list.push(allow(libc::SYS_ppoll));
        list.push(on_socket(libc::SYS_recvmsg)?);
        list.push(on_socket(libc::SYS_sendto)?);
        list.push(allow(libc::SYS_fstat));
        let eq = |arg, value| {
            confine::SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                confine::SeccompCmpOp::Eq,
                value,
            )
            .map_err(|e| confine::ConfineError::Filter(e.to_string()))
        };
        let set_region = confine::SeccompRule::new(vec![
            eq(0, fd(late.vm))?,
            eq(1, kvm_ioctl::KVM_SET_USER_MEMORY_REGION())?,
        ])
        .map_err(|e| confine::ConfineError::Filter(e.to_string()))?;
        list.push((libc::SYS_ioctl, vec![set_region]));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_lists_compile_with_and_without_a_late_artifact() {
        assert!(confine::compile(main_allow_list(None).unwrap()).is_ok());
        let late = LateFds { socket: 0, vm: 7 };
        let list = main_allow_list(Some(late)).unwrap();
        let ioctl = list.iter().find(|(nr, _)| *nr == libc::SYS_ioctl).unwrap();
        assert_eq!(ioctl.1.len(), 1, "one rule: that ioctl on that descriptor");
        assert!(confine::compile(list).is_ok());
        assert!(confine::compile(vcpu_allow_list(true, false).unwrap()).is_ok());
        assert!(confine::compile(vcpu_allow_list(false, true).unwrap()).is_ok());
    }
}
