//! The CPL0 exception stubs the VMM's IDT points to.
//!
//! Guest code at CPL0 is emulated instruction by instruction on kvm_pvm and fails on SSE and
//! several other instructions, so each stub is a few plain integer instructions: push a zero
//! error code where the CPU pushed none, push the vector, report it on the control port (the
//! VMM reads the frame at RSP, laid out as `bulwark_abi::exception::ExceptionFrame`) and halt.
//! Stub `v` is at `EXCEPTION_STUBS + v * 16` (`layout::EXCEPTION_STUB_STRIDE`).

// Vectors 8, 10-14, 17, 21, 29 and 30 come with an error code from the CPU
// (`bulwark_abi::exception::has_error_code`).
core::arch::global_asm!(
    ".section .text.exceptions, \"ax\"",
    ".global bulwark_exception_stubs",
    ".balign 16",
    "bulwark_exception_stubs:",
    ".irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".balign 16",
    ".if (\\vector == 8) || ((\\vector >= 10) && (\\vector <= 14)) || (\\vector == 17) || (\\vector == 21) || (\\vector == 29) || (\\vector == 30)",
    "push \\vector",
    ".else",
    "push 0",
    "push \\vector",
    ".endif",
    "jmp bulwark_exception_report",
    ".endr",
    "bulwark_exception_report:",
    "mov dx, {port}",
    "mov eax, dword ptr [rsp]",
    "out dx, eax",
    "2:",
    "hlt",
    "jmp 2b",
    port = const bulwark_abi::ports::CONTROL_EXCEPTION,
);

unsafe extern "C" {
    static bulwark_exception_stubs: u8;
}

/// Where the stubs were linked.
pub fn stubs_address() -> u64 {
    (&raw const bulwark_exception_stubs) as u64
}

/// Executes `ud2` (test mode: the VMM must report vector 6).
pub fn invalid_opcode() -> ! {
    // SAFETY: ud2 raises #UD, which the stub reports; control never comes back.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
