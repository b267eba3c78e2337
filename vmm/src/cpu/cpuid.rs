//! CPUID for the guest: what KVM supports, minus what the guest may not use.
//!
//! The guest has no kernel, so it cannot use features that need OS support it will never get:
//! XSAVE-managed state (AVX, AVX-512, AMX: CR4.OSXSAVE stays clear), MONITOR/MWAIT, the x2APIC and
//! TSC deadline timer (no interrupts), or KVM's paravirtual leaves. Those are hidden so that a
//! feature probe in the guest (wasmtime's `detect_host_feature`) only reports what really works.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

use super::CpuError;

/// Leaf 1 ECX bits hidden from the guest: MONITOR, VMX, SMX, FMA, x2APIC, TSC deadline, XSAVE,
/// OSXSAVE, AVX, F16C.
const LEAF1_ECX_HIDDEN: u32 = (1 << 3)
    | (1 << 5)
    | (1 << 6)
    | (1 << 12)
    | (1 << 21)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29);
/// Leaf 7.0 EBX bits hidden: AVX2 and the AVX-512 family.
const LEAF7_EBX_HIDDEN: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7.0 ECX bits hidden: AVX-512 extensions, PKU/OSPKE, WAITPKG, VAES, VPCLMULQDQ.
const LEAF7_ECX_HIDDEN: u32 = (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14);
/// Leaf 7.0 EDX bits hidden: AVX-512 4VNNIW/4FMAPS/VP2INTERSECT/FP16 and AMX.
const LEAF7_EDX_HIDDEN: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Leaf 7.1 EAX bits hidden: AVX-VNNI and AVX-512 BF16.
const LEAF7_1_EAX_HIDDEN: u32 = (1 << 4) | (1 << 5);

/// Whether a leaf is dropped entirely: XSAVE enumeration (0xd), power management (6),
/// performance monitoring (0xa), and the hypervisor range (0x4000_0000..).
fn dropped(function: u32) -> bool {
    matches!(function, 0x6 | 0xa | 0xd) || (0x4000_0000..0x5000_0000).contains(&function)
}

/// Adjusts one entry in place.
fn filter_entry(e: &mut kvm_cpuid_entry2) {
    match (e.function, e.index) {
        (1, _) => {
            e.ecx &= !LEAF1_ECX_HIDDEN;
            // EBX: initial APIC ID 0, one logical processor.
            e.ebx = (e.ebx & 0x0000_ffff) | (1 << 16);
        }
        (7, 0) => {
            e.ebx &= !LEAF7_EBX_HIDDEN;
            e.ecx &= !LEAF7_ECX_HIDDEN;
            e.edx &= !LEAF7_EDX_HIDDEN;
        }
        (7, 1) => e.eax &= !LEAF7_1_EAX_HIDDEN,
        _ => {}
    }
}

/// Returns the guest's CPUID: `supported` with hidden leaves dropped and hidden bits cleared.
pub fn filter(supported: &CpuId) -> Result<CpuId, CpuError> {
    let entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !dropped(e.function))
        .map(|e| {
            let mut e = *e;
            filter_entry(&mut e);
            e
        })
        .collect();
    CpuId::from_entries(&entries).map_err(CpuError::Cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn hides_xsave_state_features_and_pv_leaves() {
        let all = u32::MAX;
        let supported = CpuId::from_entries(&[
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0x906ea, 0x0a08_0800, all, all]),
            entry(6, 0, [all; 4]),
            entry(7, 0, [0, all, all, all]),
            entry(7, 1, [all, 0, 0, 0]),
            entry(0xd, 0, [all; 4]),
            entry(0x4000_0001, 0, [all; 4]),
            entry(0x8000_0001, 0, [0, 0, all, all]),
        ])
        .unwrap();
        let out = filter(&supported).unwrap();
        let funcs: Vec<u32> = out.as_slice().iter().map(|e| e.function).collect();
        assert_eq!(funcs, [0, 1, 7, 7, 0x8000_0001]);
        let l1 = out.as_slice()[1];
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX hidden");
        assert_eq!(l1.ecx & (1 << 27), 0, "OSXSAVE hidden");
        assert_ne!(l1.ecx & (1 << 20), 0, "SSE4.2 kept");
        assert_ne!(l1.ecx & (1 << 23), 0, "POPCNT kept");
        assert_eq!(l1.edx, all, "EDX (SSE, SSE2, FXSR...) kept");
        assert_eq!(l1.ebx >> 16, 1, "APIC ID 0, one logical CPU");
        let l7 = out.as_slice()[2];
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2 hidden");
        assert_ne!(l7.ebx & (1 << 3), 0, "BMI1 kept");
        assert_eq!(out.as_slice()[3].eax & (1 << 4), 0, "AVX-VNNI hidden");
        assert_eq!(out.as_slice()[4].ecx, all, "extended leaf untouched");
    }
}
