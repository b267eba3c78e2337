//! CPU exceptions as the guest reports them to the VMM: the frame the guest's CPL0 stub leaves
//! on its stack before it writes the vector to
//! [`CONTROL_EXCEPTION`](crate::ports::CONTROL_EXCEPTION), and what the VMM needs to describe it.
//!
//! A CPU exception is fatal for the VM, unless it is a Wasm trap the VMM delivers back to the
//! guest (vectors [`TRAP_VECTORS`](crate::ports::TRAP_VECTORS) at CPL3, once the guest has
//! registered a trap entry; see [`crate::window`]) and the guest's wasmtime handles it.

/// What the exception stub leaves on its stack when it reports to
/// [`CONTROL_EXCEPTION`](crate::ports::CONTROL_EXCEPTION): the vector, the error code (0 for
/// vectors without one), then the frame the CPU pushed. Each field is 8 bytes, from the stack
/// pointer up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Exception vector (0..=31).
    pub vector: u64,
    /// Error code pushed by the CPU, or 0 if the vector has none.
    pub error_code: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CS at the fault (its low two bits are the CPL).
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// RSP at the fault.
    pub rsp: u64,
    /// SS at the fault.
    pub ss: u64,
}

impl ExceptionFrame {
    /// Size of the frame on the stack.
    pub const SIZE: usize = 7 * 8;

    /// Decodes the frame from the bytes at the stub's stack pointer.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            vector: word(0),
            error_code: word(1),
            rip: word(2),
            cs: word(3),
            rflags: word(4),
            rsp: word(5),
            ss: word(6),
        }
    }
}

/// Whether the CPU pushes an error code for exception `vector`.
pub const fn has_error_code(vector: u64) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Short mnemonic of an architectural exception vector, for reports.
pub const fn name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD exception",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "reserved vector",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_frame_decodes_words_in_order() {
        let mut b = [0u8; ExceptionFrame::SIZE];
        for i in 0..7u8 {
            b[usize::from(i) * 8] = i + 1;
        }
        let f = ExceptionFrame::from_bytes(&b);
        assert_eq!((f.vector, f.error_code, f.rip, f.ss), (1, 2, 3, 7));
        assert!(has_error_code(14) && !has_error_code(6));
        assert_eq!(name(14), "#PF page fault");
        assert_eq!(name(31), "reserved vector");
    }
}
