//! Special and general registers at entry: long mode with paging, SSE usable, CPL3.

use bulwark_proto::layout;
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use super::{CpuError, gdt};

/// CR0: protection, monitor coprocessor, extension type, native FPU errors, write protect
/// (supervisor writes honour read-only pages), paging.
pub const CR0: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE, OSFXSR and OSXMMEXCPT (SSE at CPL3). No OSXSAVE: AVX state is never enabled.
pub const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// EFER: long mode enabled and active. No SCE (`syscall` raises #UD) and no NXE.
pub const EFER: u64 = (1 << 8) | (1 << 10);
/// RFLAGS at entry: interrupts off, IOPL 0 (port access comes from the TSS I/O bitmap), and
/// the reserved bit 1.
pub const RFLAGS: u64 = 1 << 1;

/// Sets CR0/CR3/CR4/EFER, the descriptor-table registers and CPL3 segments.
pub fn set_special(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::kvm("KVM_GET_SREGS"))?;
    sregs.cr0 = CR0;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = gdt::GDT_LIMIT;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = gdt::IDT_LIMIT;
    sregs.cs = gdt::user_code_segment();
    let data = gdt::user_data_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::task_segment();
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    vcpu.set_sregs(&sregs)
        .map_err(CpuError::kvm("KVM_SET_SREGS"))
}

/// Sets RIP to `entry`, RSP to the top of the guest stack and RDI to the boot-info address.
pub fn set_general(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: layout::STACK_TOP,
        rdi: layout::BOOT_INFO,
        rflags: RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuError::kvm("KVM_SET_REGS"))
}
