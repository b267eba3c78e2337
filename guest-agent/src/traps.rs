//! Wasm traps as CPU exceptions: wasmtime's `custom-native-signals` platform hooks.
//!
//! With signal-based traps, compiled Wasm traps by faulting: a page fault past a linear memory
//! (its window's unmapped part, see `linear_memory`), `ud2` for `unreachable` and the other trap
//! codes, a divide error for a division by zero. The CPL0 stub reports the exception to the VMM,
//! which resumes the guest at CPL3 at [`bulwark_trap_entry`] with the fault's registers (the
//! convention is in `bulwark_abi::window`). The entry calls the handler wasmtime registered
//! through [`wasmtime_init_traps`]; for a fault in Wasm code that handler unwinds to the Wasm
//! entry and never returns. If it returns, the fault was not Wasm's: the guest tells the VMM,
//! which ends the VM with the original exception, exactly as without delivery.

use core::sync::atomic::{AtomicUsize, Ordering};

use bulwark_abi::ports;

/// wasmtime's trap handler: `(pc, fp, has_faulting_addr, faulting_addr)`.
type Handler = extern "C" fn(usize, usize, bool, usize);

/// What a delivered exception is handed to: wasmtime's handler, or a test hook.
static HANDLER: AtomicUsize = AtomicUsize::new(0);

core::arch::global_asm!(
    ".section .text.bulwark_trap_entry, \"ax\"",
    ".global bulwark_trap_entry",
    "bulwark_trap_entry:",
    // The VMM set RDI, RSI, RDX, RCX and R8 and a 16-byte aligned RSP below the fault's stack:
    // a call from here is a call with the System V alignment.
    "call {on_trap}",
    "ud2",
    on_trap = sym on_trap,
);

unsafe extern "C" {
    /// The CPL3 address the VMM resumes the guest at after an exception.
    fn bulwark_trap_entry() -> !;
}

/// Tells the VMM to deliver exceptions to [`bulwark_trap_entry`] from now on.
fn register_entry() {
    let entry = bulwark_trap_entry as *const () as u64;
    // The guest image lies below 4 GiB (layout::IMAGE_END); the VMM checks the address.
    let entry = u32::try_from(entry).unwrap_or(u32::MAX);
    // SAFETY: an `out` to the trap-entry register, granted by the TSS I/O bitmap; it touches
    // no memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_TRAP_ENTRY, in("eax") entry, options(nomem, nostack));
    }
}

/// wasmtime's hook (feature `custom-native-signals`): remember `handler` and have exceptions
/// delivered. Returns 0 (success).
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_init_traps(handler: Handler) -> i32 {
    HANDLER.store(handler as usize, Ordering::Release);
    register_entry();
    0
}

/// Hands delivered exceptions to `hook` instead of wasmtime (test modes only).
pub fn set_test_hook(hook: Handler) {
    HANDLER.store(hook as usize, Ordering::Release);
    register_entry();
}

/// Called from [`bulwark_trap_entry`] with the fault's registers; never returns.
extern "C" fn on_trap(pc: usize, fp: usize, page_fault: u64, addr: usize, _vector: u64) -> ! {
    let raw = HANDLER.load(Ordering::Acquire);
    if raw != 0 {
        // SAFETY: HANDLER only ever holds 0 or a `Handler` stored by wasmtime_init_traps or
        // set_test_hook, and fn pointers round-trip through usize on x86_64.
        let handler: Handler = unsafe { core::mem::transmute::<usize, Handler>(raw) };
        // For a Wasm trap this unwinds to the Wasm entry and does not return.
        handler(pc, fp, page_fault != 0, addr);
    }
    loop {
        // SAFETY: an `out` to the unhandled-trap register, granted by the TSS I/O bitmap; it
        // touches no memory and the VMM ends the VM on it.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_TRAP_UNHANDLED, in("eax") 0u32, options(nomem, nostack));
        }
    }
}
