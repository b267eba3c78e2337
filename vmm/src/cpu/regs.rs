//! Special and general registers at entry: long mode with paging, SSE usable, CPL3.

use bulwark_abi::layout;
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use super::{CpuError, gdt};

/// CR0: protection, monitor coprocessor, extension type, native FPU errors, write protect
/// (supervisor writes honour read-only pages), paging.
pub const CR0: u64 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
/// CR4: PAE, OSFXSR and OSXMMEXCPT (SSE at CPL3). No OSXSAVE: AVX state is never enabled.
/// SMEP and SMAP are added when the guest's CPUID has them ([`with_smep_smap`]).
pub const CR4: u64 = (1 << 5) | (1 << 9) | (1 << 10);
/// CR4.SMEP: CPL0 never executes code from user pages.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP: CPL0 never reads or writes user pages (the exception stubs need neither).
pub const CR4_SMAP: u64 = 1 << 21;

/// EFER: long mode enabled and active. No SCE (`syscall` raises #UD) and no NXE.
pub const EFER: u64 = (1 << 8) | (1 << 10);
/// RFLAGS at entry: interrupts off, IOPL 0 (port access comes from the TSS I/O bitmap), and
/// the reserved bit 1.
pub const RFLAGS: u64 = 1 << 1;

/// CPUID leaf 7.0 EBX bit of SMEP.
const LEAF7_EBX_SMEP: u32 = 1 << 7;
/// CPUID leaf 7.0 EBX bit of SMAP.
const LEAF7_EBX_SMAP: u32 = 1 << 20;

/// Which of SMEP and SMAP the host CPU has (the `cpuid` instruction, leaf 7.0 EBX).
fn host_smep_smap() -> u32 {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    if leaf0.eax < 7 {
        return 0;
    }
    let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
    leaf7.ebx & (LEAF7_EBX_SMEP | LEAF7_EBX_SMAP)
}

/// Adds SMEP and SMAP to the guest's CPUID when the host CPU has them, and returns the CR4 to
/// use: [`CR4`] plus those bits. KVM refuses a CR4 bit whose feature the guest's CPUID lacks,
/// and kvm_pvm's KVM_GET_SUPPORTED_CPUID omits both although it enforces them (measured with
/// `--cpu-probe`), so the host CPU decides.
pub fn with_smep_smap(cpuid: &mut kvm_bindings::CpuId) -> u64 {
    let host = host_smep_smap();
    let mut cr4 = CR4;
    if host == 0 {
        return cr4;
    }
    for e in cpuid.as_mut_slice() {
        if e.function == 7 && e.index == 0 {
            e.ebx |= host;
            if host & LEAF7_EBX_SMEP != 0 {
                cr4 |= CR4_SMEP;
            }
            if host & LEAF7_EBX_SMAP != 0 {
                cr4 |= CR4_SMAP;
            }
        }
    }
    cr4
}

/// Sets CR0/CR3/CR4/EFER, the descriptor-table registers and CPL3 segments; `cr4` from
/// [`with_smep_smap`].
pub fn set_special(vcpu: &VcpuFd, cr4: u64) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::kvm("KVM_GET_SREGS"))?;
    sregs.cr0 = CR0;
    sregs.cr3 = layout::PML4;
    sregs.cr4 = cr4;
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
