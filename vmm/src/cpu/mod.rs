//! The CPU state the VMM builds before the guest's first instruction: page tables, descriptor
//! tables, control registers, CPUID. The guest starts in 64-bit mode at CPL3 and never changes
//! any of it (it has no privilege to).

pub mod cpuid;
pub mod gdt;
pub mod paging;
pub mod probe;
pub mod regs;
pub mod windows;

/// Errors from building CPU state.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// Writing a table into guest RAM failed.
    #[error("cannot write the {what} into guest RAM: {source}")]
    Write {
        /// Which table.
        what: &'static str,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// The filtered CPUID table does not fit KVM's array.
    #[error("cannot build the guest CPUID table: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

impl CpuError {
    /// Wraps a KVM error with the name of the ioctl that returned it.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { what, source }
    }
}
