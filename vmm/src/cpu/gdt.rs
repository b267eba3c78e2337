//! GDT, TSS and IDT.
//!
//! The GDT holds a 64-bit code and a data segment for CPL0 (the exception stub), the same pair
//! at DPL3 for the guest, and the TSS. The TSS gives the stack the CPU switches to when an
//! exception arrives from CPL3 (RSP0) and a separate one for double faults (IST1). Every IDT
//! vector 0..=31 is a DPL0 interrupt gate to the guest's stub for that vector; an `int n` from
//! CPL3 therefore raises #GP, which is reported like any other exception.

use bulwark_abi::{layout, ports};
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::memory::GuestMemory;

/// Selector of the CPL0 64-bit code segment (the exception stubs run here).
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the CPL0 data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the DPL3 data segment, with RPL 3.
pub const USER_DS: u16 = 0x20 | 3;
/// Selector of the DPL3 64-bit code segment, with RPL 3.
pub const USER_CS: u16 = 0x28 | 3;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x30;

/// Descriptors in order: null, kernel code, kernel data, unused, user data, user code, then the
/// TSS's two slots.
const GDT_ENTRIES: usize = 8;
/// Size of the 64-bit TSS proper; the I/O permission bitmap follows it.
const TSS_SIZE: u16 = 0x68;
/// Bytes in the I/O permission bitmap: one bit per port, then a terminating all-ones byte.
const IO_BITMAP_SIZE: u16 = (1 << 13) + 1; // 65,536 ports / 8 bits, plus the 0xff byte
/// Limit of the TSS segment: the TSS and its I/O permission bitmap.
pub const TSS_LIMIT: u32 = TSS_SIZE as u32 + IO_BITMAP_SIZE as u32 - 1;
/// Offset of RSP0 in the TSS.
/// Offset of RSP0 (the stack for exceptions from CPL3) in the TSS.
pub const TSS_RSP0: u64 = 4;
/// Offset of IST1 in the TSS.
const TSS_IST1: u64 = 0x24;
/// Offset of the I/O map base field in the TSS.
const TSS_IOMAP_BASE: u64 = 0x66;
/// IST index used for the double-fault gate.
const DOUBLE_FAULT_IST: u64 = 1;

/// A flat 64-bit code or data descriptor. `code` selects the type; `dpl` the privilege.
const fn flat_descriptor(code: bool, dpl: u64) -> u64 {
    // Present, S=1, accessed already set so the CPU never writes the GDT.
    let access = if code { 0x9b } else { 0x93 } | (dpl << 5);
    // Limit 0xfffff with G=1; code: L=1 (64-bit), D=0; data: D/B=1.
    let flags = if code { 0xa } else { 0xc };
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The two 8-byte halves of the 64-bit available-TSS descriptor for a TSS at `base`.
pub fn tss_descriptor(base: u64) -> [u64; 2] {
    let low = u64::from(TSS_LIMIT & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (u64::from((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The GDT as descriptors.
pub fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let [tss_low, tss_high] = tss_descriptor(layout::TSS);
    [
        0,
        flat_descriptor(true, 0),
        flat_descriptor(false, 0),
        0,
        flat_descriptor(false, 3),
        flat_descriptor(true, 3),
        tss_low,
        tss_high,
    ]
}

/// The I/O permission bitmap: a set bit denies its port. Only [`ports::GUEST_PORTS`] are
/// clear. kvm_pvm ignores RFLAGS.IOPL for CPL3 code and always consults this bitmap, so it is
/// what grants port access here; on hardware VMX/SVM it does the same because IOPL is 0.
pub fn io_bitmap() -> Vec<u8> {
    let mut bitmap = vec![0xff; usize::from(IO_BITMAP_SIZE)];
    for (first, count) in ports::GUEST_PORTS {
        for port in first..first + count {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    bitmap
}

/// The 16-byte IDT gate for exception `vector`: a DPL0 64-bit interrupt gate to its stub.
pub fn idt_gate(vector: u64) -> [u64; 2] {
    idt_gate_to(
        vector,
        layout::EXCEPTION_STUBS + vector * layout::EXCEPTION_STUB_STRIDE,
    )
}

/// A DPL0 64-bit interrupt gate for `vector` to `handler`.
pub fn idt_gate_to(vector: u64, handler: u64) -> [u64; 2] {
    let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (ist << 32)
        | (0x8e << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Writes the GDT, TSS and IDT into guest RAM.
pub fn write(mem: &GuestMemory) -> Result<(), CpuError> {
    let put = |what, at: u64, value: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|source| CpuError::Write { what, source })
    };
    for (i, d) in gdt_entries().into_iter().enumerate() {
        put("GDT", layout::GDT + i as u64 * 8, d)?;
    }
    put("TSS", layout::TSS + TSS_RSP0, layout::EXCEPTION_STACK_TOP)?;
    put(
        "TSS",
        layout::TSS + TSS_IST1,
        layout::DOUBLE_FAULT_STACK_TOP,
    )?;
    mem.write_obj(TSS_SIZE, GuestAddress(layout::TSS + TSS_IOMAP_BASE))
        .map_err(|source| CpuError::Write {
            what: "TSS",
            source,
        })?;
    mem.write_slice(
        &io_bitmap(),
        GuestAddress(layout::TSS + u64::from(TSS_SIZE)),
    )
    .map_err(|source| CpuError::Write {
        what: "TSS",
        source,
    })?;
    for vector in 0..layout::EXCEPTION_VECTORS {
        let [low, high] = idt_gate(vector);
        put("IDT", layout::IDT + vector * 16, low)?;
        put("IDT", layout::IDT + vector * 16 + 8, high)?;
    }
    Ok(())
}

/// The limit (size in bytes minus one) of a descriptor table of `bytes` bytes, as GDTR and
/// IDTR hold it; a table outside 1 byte to 64 KiB does not compile.
const fn table_limit(bytes: u64) -> u16 {
    assert!(
        bytes >= 1 && bytes <= 0x1_0000,
        "a descriptor table is 1 byte to 64 KiB"
    );
    #[allow(
        clippy::cast_possible_truncation,
        reason = "bytes - 1 is at most 0xffff, asserted above"
    )]
    let limit = (bytes - 1) as u16;
    limit
}

/// GDTR limit.
pub const GDT_LIMIT: u16 = table_limit(GDT_ENTRIES as u64 * 8);
/// IDTR limit: exactly the 32 exception gates.
pub const IDT_LIMIT: u16 = table_limit(layout::EXCEPTION_VECTORS * 16);

/// The guest's code segment register: 64-bit, DPL3.
pub fn user_code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CS,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

/// The guest's data and stack segment registers: flat, DPL3.
pub fn user_data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_DS,
        type_: 0x3,
        present: 1,
        dpl: 3,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    }
}

/// The task register: the busy 64-bit TSS.
pub fn task_segment() -> kvm_segment {
    kvm_segment {
        base: layout::TSS,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        s: 0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_expected_bits() {
        let g = gdt_entries();
        assert_eq!(g[0], 0);
        assert_eq!(g[1], 0x00af_9b00_0000_ffff, "kernel code64");
        assert_eq!(g[2], 0x00cf_9300_0000_ffff, "kernel data");
        assert_eq!(g[4], 0x00cf_f300_0000_ffff, "user data, DPL3");
        assert_eq!(g[5], 0x00af_fb00_0000_ffff, "user code64, DPL3");
        assert_eq!(usize::from(USER_CS & !3) / 8, 5);
        assert_eq!(usize::from(USER_DS & !3) / 8, 4);
        assert_eq!(usize::from(TSS_SELECTOR) / 8, 6);
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc);
        assert_eq!(lo & 0xffff, u64::from(TSS_LIMIT & 0xffff));
        assert_eq!((lo >> 16) & 0xff_ffff, 0x78_9abc);
        assert_eq!((lo >> 40) & 0xff, 0x89);
        assert_eq!(lo >> 56, 0x56);
        assert_eq!(hi, 0x1234);
    }

    #[test]
    fn io_bitmap_grants_only_the_guest_ports() {
        let bitmap = io_bitmap();
        let allowed = |port: u16| bitmap[usize::from(port / 8)] & (1 << (port % 8)) == 0;
        for port in 0x3f8..=0x3ff {
            assert!(allowed(port), "{port:#x}");
        }
        for port in 0x600..0x600 + ports::CONTROL_PORT_COUNT {
            assert!(allowed(port), "{port:#x}");
        }
        for port in [
            0u16,
            0x80,
            0x3f7,
            0x400,
            0x5ff,
            ports::CONTROL_BASE + ports::CONTROL_PORT_COUNT,
            0xcf8,
            0xffff,
        ] {
            assert!(!allowed(port), "{port:#x}");
        }
        assert_eq!(bitmap.last(), Some(&0xff), "terminating byte");
        assert_eq!(bitmap.len(), 8193);
    }

    #[test]
    fn idt_gates_point_to_the_stubs_at_cpl0() {
        for v in 0..layout::EXCEPTION_VECTORS {
            let [lo, hi] = idt_gate(v);
            let target = (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32);
            assert_eq!(
                target,
                layout::EXCEPTION_STUBS + v * layout::EXCEPTION_STUB_STRIDE
            );
            assert_eq!((lo >> 16) & 0xffff, u64::from(KERNEL_CS));
            assert_eq!((lo >> 40) & 0xff, 0x8e, "present, DPL0, interrupt gate");
            assert_eq!(
                (lo >> 32) & 7,
                if v == 8 { 1 } else { 0 },
                "IST only for #DF"
            );
        }
    }

    #[test]
    fn tables_are_written_where_the_layout_says() {
        let mem = crate::memory::create(64).unwrap();
        write(&mem).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(layout::GDT + 5 * 8), gdt_entries()[5]);
        assert_eq!(read(layout::TSS + 4), layout::EXCEPTION_STACK_TOP);
        assert_eq!(read(layout::TSS + 0x24), layout::DOUBLE_FAULT_STACK_TOP);
        assert_eq!(read(layout::IDT + 6 * 16), idt_gate(6)[0]);
        assert_eq!(read(layout::IDT + 31 * 16 + 8), idt_gate(31)[1]);
        assert!(layout::IDT + u64::from(IDT_LIMIT) < layout::IDT + 0x1000);
        assert!(layout::GDT + u64::from(GDT_LIMIT) < layout::TSS);
        assert!(u64::from(TSS_LIMIT) < layout::TSS_AREA_SIZE);
        let iomap: u16 = mem.read_obj(GuestAddress(layout::TSS + 0x66)).unwrap();
        assert_eq!(u64::from(iomap), 0x68);
    }
}
