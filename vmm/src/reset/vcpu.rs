//! The vCPU's architectural state at the snapshot, put back at each reset: general registers,
//! segment and control registers, the whole XSAVE area (x87, SSE, AVX: every XMM and YMM
//! register), XCR0, debug registers and pending events.
//!
//! A CPL3 guest can change the general, segment-selector, flag and vector registers and, by
//! faulting, CR2 and the pending-event state; the rest it cannot reach, but everything is put
//! back all the same, so a reset never depends on what the guest could not do.

use kvm_bindings::{kvm_debugregs, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave};
use kvm_ioctls::VcpuFd;

/// A KVM call on the vCPU failed while saving or restoring its state.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed on the vCPU: {source}")]
pub struct VcpuStateError {
    /// Which ioctl.
    pub what: &'static str,
    /// The KVM error.
    pub source: kvm_ioctls::Error,
}

/// Everything of one vCPU a reset restores.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    events: kvm_vcpu_events,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError { what, source }
}

impl VcpuState {
    /// Reads the state of `fd`, which must not be in `KVM_RUN` and must have no I/O exit
    /// pending (re-entered with `immediate_exit` first: KVM finishes an exit's instruction
    /// only on the next `KVM_RUN`).
    pub fn take(fd: &VcpuFd) -> Result<Self, VcpuStateError> {
        Ok(Self {
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts the state back into `fd` (the same vCPU it was taken from). Setting the special
    /// registers reloads CR3; XCR0 goes before the XSAVE area, whose valid parts it decides.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        // SAFETY: the area is the one KVM_GET_XSAVE returned for this same vCPU, with the CPUID
        // it has had since it was built (no dynamically enabled state such as AMX): it holds no
        // feature whose state does not fit `kvm_xsave`, so KVM reads only inside it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The instruction pointer saved (for reports and tests).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}
