//! The control port: how the guest ends itself.

use bulwark_proto::ports;

/// Writes `status` to the exit port. The VMM stops the VM there and never resumes it.
pub fn exit(status: u32) -> ! {
    loop {
        // SAFETY: `out` to the control port, which the TSS I/O bitmap grants; it touches no
        // memory and the VMM ends the VM on it.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_EXIT, in("eax") status, options(nomem, nostack));
        }
    }
}
