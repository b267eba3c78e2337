//! Test-only CPU probes: deliberately weakened CPU state that shows whether the CPU enforces
//! SMEP (no CPL0 instruction fetch from user pages) and SMAP (no CPL0 data access to user
//! pages). Used with the guest's `ud2` test mode; the exception the VMM then reports tells.

use bulwark_abi::{layout, ports};
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::memory::GuestMemory;

/// What to probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuProbe {
    /// The #UD gate leads to code in a user page. With SMEP the fetch faults and the #PF stub
    /// reports vector 14; without it the code runs at CPL0 and reports [`SMEP_MISSING_VECTOR`].
    Smep,
    /// The exception stack (TSS.RSP0) is in a user page. With SMAP pushing the #UD frame
    /// faults, and the fault on the fault becomes a double fault (vector 8, on its own stack);
    /// without it the frame lands and the stub reports vector 6.
    Smap,
}

/// The vector the user-page code reports when it ran at CPL0 (SMEP not enforced).
pub const SMEP_MISSING_VECTOR: u32 = 0x77;

/// A user page the probes use: the last 4 KiB of low RAM (heap the guest has not reached when it
/// executes `ud2` at start-up).
fn user_page(mem_size: u64) -> u64 {
    let [(_, low), _] = layout::ram_ranges(mem_size);
    low - 0x1000
}

/// Weakens the CPU state in `mem` (already written by `gdt::write`) for `probe`.
pub fn apply(mem: &GuestMemory, mem_size: u64, probe: CpuProbe) -> Result<(), CpuError> {
    let page = user_page(mem_size);
    let write = |what, bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|source| CpuError::Write { what, source })
    };
    match probe {
        CpuProbe::Smep => {
            let port = ports::CONTROL_EXCEPTION.to_le_bytes();
            let v = SMEP_MISSING_VECTOR.to_le_bytes();
            // mov dx, port; mov eax, SMEP_MISSING_VECTOR; out dx, eax; 1: hlt; jmp 1b
            let code = [
                0x66, 0xba, port[0], port[1], 0xb8, v[0], v[1], v[2], v[3], 0xef, 0xf4, 0xeb, 0xfd,
            ];
            write("probe code", &code, page)?;
            let gate = super::gdt::idt_gate_to(6, page);
            write("IDT", &gate[0].to_le_bytes(), layout::IDT + 6 * 16)?;
            write("IDT", &gate[1].to_le_bytes(), layout::IDT + 6 * 16 + 8)
        }
        CpuProbe::Smap => write(
            "TSS",
            &(page + 0x1000).to_le_bytes(),
            layout::TSS + super::gdt::TSS_RSP0,
        ),
    }
}
