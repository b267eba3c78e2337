//! The control port: how the guest ends itself, and how it sleeps for a time.

use bulwark_abi::ports;

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

/// Sleeps until something arrives for the guest or `limit_us` microseconds pass, whichever is
/// first (the VMM's bounded wait); returns the [`ports::wait_result`] bits. Whatever the vsock
/// device delivered meanwhile stays on its used rings for the driver's next poll.
pub fn wait_at_most(limit_us: u32) -> u32 {
    let bits: u32;
    // SAFETY: an `out` to the wait-limit register, granted by the TSS I/O bitmap; it touches
    // no memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_WAIT_LIMIT, in("eax") limit_us, options(nomem, nostack));
    }
    // SAFETY: an `in` from the wait register, granted by the TSS I/O bitmap. The VMM may write
    // the vsock used rings during the wait; the driver reads them with volatile accesses.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") ports::CONTROL_WAIT, out("eax") bits, options(nostack));
    }
    bits
}
