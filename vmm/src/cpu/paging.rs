//! Identity-mapped page tables with 2 MiB pages (1 GiB pages fault on kvm_pvm).
//!
//! One PML4 entry, one PDPT with [`layout::PD_COUNT`] entries, and up to that many page
//! directories (one per GiB that has RAM or the MMIO window in it) cover guest-physical 0 to the
//! end of the largest high RAM. Each 2 MiB page gets the attributes of the region it is in (see
//! [`bulwark_abi::layout`]).

use bulwark_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::memory::GuestMemory;

/// Page present.
pub const PRESENT: u64 = 1 << 0;
/// Writable.
pub const WRITABLE: u64 = 1 << 1;
/// Accessible from CPL3.
pub const USER: u64 = 1 << 2;
/// Write-through caching.
pub const WRITE_THROUGH: u64 = 1 << 3;
/// Caching disabled.
pub const CACHE_DISABLE: u64 = 1 << 4;
/// In a page-directory entry: the entry maps a 2 MiB page.
pub const HUGE: u64 = 1 << 7;

/// Entries per page table.
const ENTRIES: u64 = 512;

/// The page-directory entry that maps the 2 MiB page at guest-physical `addr`, for a guest with
/// `mem_size` bytes of RAM and an artifact of `artifact_size` bytes.
pub fn pd_entry(addr: u64, mem_size: u64, artifact_size: u64) -> u64 {
    let page = |flags| addr | flags | HUGE | PRESENT;
    if (layout::SYSTEM_START..layout::SYSTEM_START + layout::PAGE_SIZE).contains(&addr) {
        page(WRITABLE)
    } else if addr == layout::BOOT_INFO {
        page(USER)
    } else if addr == layout::EXCEPTION_STUBS {
        // Supervisor-only and read-only: CPL3 code can neither rewrite nor run the CPL0 stubs.
        page(0)
    } else if (layout::WINDOW_TABLES..layout::WINDOW_TABLES + layout::WINDOW_TABLES_SIZE)
        .contains(&addr)
    {
        // Supervisor-only: only the VMM writes the windows' page tables (cpu::windows).
        page(WRITABLE)
    } else if (layout::STACK_GUARD..layout::STACK_BOTTOM).contains(&addr) {
        0
    } else if layout::is_ram(addr, mem_size) {
        page(WRITABLE | USER)
    } else if (layout::MMIO_START..layout::MMIO_START + layout::MMIO_SIZE).contains(&addr) {
        page(WRITABLE | USER | WRITE_THROUGH | CACHE_DISABLE)
    } else if (layout::ARTIFACT_START..layout::ARTIFACT_START + artifact_size).contains(&addr) {
        // Read-only: the guest runs the module's code from here and never writes it.
        page(USER)
    } else {
        0
    }
}

/// Writes the PML4, the PDPT and the page directories for a guest with `mem_size` bytes of RAM
/// and an artifact of `artifact_size` bytes.
pub fn write(mem: &GuestMemory, mem_size: u64, artifact_size: u64) -> Result<(), CpuError> {
    let put = |at: u64, value: u64| {
        mem.write_obj(value, GuestAddress(at))
            .map_err(|source| CpuError::Write {
                what: "page tables",
                source,
            })
    };
    put(layout::PML4, layout::PDPT | PRESENT | WRITABLE | USER)?;
    // The windows' PDPTs, empty: cpu::windows fills them in on the guest's requests.
    for i in 0..layout::WINDOW_PDPTS {
        let pdpt = layout::WINDOW_TABLES + i * 0x1000;
        mem.write_slice(&[0u8; 0x1000], GuestAddress(pdpt))
            .map_err(|source| CpuError::Write {
                what: "page tables",
                source,
            })?;
        put(
            layout::PML4 + (layout::WINDOW_PML4_SLOT + i) * 8,
            pdpt | PRESENT | WRITABLE | USER,
        )?;
    }
    for pd in 0..layout::PD_COUNT {
        let pd_addr = layout::PD_START + pd * 0x1000;
        let mut entries = [0u64; 512];
        for (i, entry) in (0..ENTRIES).zip(entries.iter_mut()) {
            *entry = pd_entry(
                ((pd * ENTRIES) + i) * layout::PAGE_SIZE,
                mem_size,
                artifact_size,
            );
        }
        // A GiB with nothing mapped in it gets no page directory at all.
        let pdpt_entry = if entries.iter().any(|&e| e != 0) {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            mem.write_slice(&bytes, GuestAddress(pd_addr))
                .map_err(|source| CpuError::Write {
                    what: "page tables",
                    source,
                })?;
            pd_addr | PRESENT | WRITABLE | USER
        } else {
            0
        };
        put(layout::PDPT + pd * 8, pdpt_entry)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_artifact_window_is_user_read_only_and_as_long_as_the_artifact() {
        let mem = crate::memory::create(MEM >> 20).unwrap();
        // 3 MiB and a byte: two 2 MiB pages.
        write(&mem, MEM, (3 << 20) + 1).unwrap();
        for a in [layout::ARTIFACT_START, layout::ARTIFACT_START + (3 << 20)] {
            let e = walk(&mem, a).unwrap();
            assert_eq!(
                e & !0xfff,
                a & !(layout::PAGE_SIZE - 1),
                "identity at {a:#x}"
            );
            assert_eq!(e & 0xfff, PRESENT | USER | HUGE, "read-only at {a:#x}");
        }
        assert_eq!(walk(&mem, layout::ARTIFACT_START + (4 << 20)), None);
        let end = layout::ARTIFACT_START + layout::ARTIFACT_MAX_SIZE;
        write(&mem, MEM, layout::ARTIFACT_MAX_SIZE).unwrap();
        assert!(walk(&mem, end - layout::PAGE_SIZE).is_some());
        assert_eq!(walk(&mem, end), None, "nothing past the window");
    }

    const MEM: u64 = 256 << 20;

    /// Walks the tables in guest memory like the CPU does, for a 2 MiB-page mapping.
    fn walk(mem: &GuestMemory, vaddr: u64) -> Option<u64> {
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let pml4e = read(layout::PML4 + ((vaddr >> 39) & 511) * 8);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((vaddr >> 30) & 511) * 8);
        if pdpte & PRESENT == 0 {
            return None;
        }
        assert_eq!(pdpte & HUGE, 0, "1 GiB pages fault on kvm_pvm");
        let pde = read((pdpte & !0xfff) + ((vaddr >> 21) & 511) * 8);
        (pde & PRESENT != 0).then_some(pde)
    }

    #[test]
    fn tables_identity_map_ram_with_region_attributes() {
        let mem = crate::memory::create(MEM >> 20).unwrap();
        write(&mem, MEM, 0).unwrap();
        let flags = |a| walk(&mem, a).map(|e| e & 0xfff);
        assert_eq!(
            flags(0),
            Some(PRESENT | WRITABLE | HUGE),
            "system page is supervisor-only"
        );
        assert_eq!(
            flags(layout::BOOT_INFO),
            Some(PRESENT | USER | HUGE),
            "boot info is read-only"
        );
        assert_eq!(
            flags(layout::EXCEPTION_STUBS),
            Some(PRESENT | HUGE),
            "exception stubs are supervisor-only and read-only"
        );
        assert_eq!(flags(layout::STACK_GUARD), None, "stack guard is unmapped");
        for a in [
            layout::IMAGE_USER_START,
            layout::STACK_BOTTOM,
            layout::PAYLOAD_START,
            MEM - layout::PAGE_SIZE,
        ] {
            let e = walk(&mem, a).unwrap();
            assert_eq!(e & !0xfff, a, "identity map at {a:#x}");
            assert_eq!(e & 0xfff, PRESENT | WRITABLE | USER | HUGE);
        }
        assert_eq!(flags(MEM), None, "nothing past RAM");
        assert_eq!(flags(layout::MMIO_START - layout::PAGE_SIZE), None);
        let mmio = walk(&mem, layout::MMIO_UNCLAIMED).unwrap();
        assert_eq!(
            mmio & !0xfff,
            layout::MMIO_UNCLAIMED & !(layout::PAGE_SIZE - 1)
        );
        assert_ne!(mmio & CACHE_DISABLE, 0);
        assert_eq!(flags(layout::MMIO_START + layout::MMIO_SIZE), None);
        assert_eq!(
            walk(&mem, 1 << 39),
            None,
            "nothing is mapped in the windows at boot"
        );
    }

    #[test]
    fn ram_past_3_gib_is_mapped_above_4_gib_and_nothing_in_between() {
        let size = 5u64 << 30;
        let mem = crate::memory::create(size >> 20).unwrap();
        write(&mem, size, 0).unwrap();
        let user_ram = Some(PRESENT | WRITABLE | USER | HUGE);
        let flags = |a| walk(&mem, a).map(|e| e & 0xfff);
        assert_eq!(flags(layout::LOW_RAM_END - layout::PAGE_SIZE), user_ram);
        assert_eq!(
            flags(layout::LOW_RAM_END),
            None,
            "the hole below the MMIO window"
        );
        for a in [layout::HIGH_RAM_START, (6 << 30) - layout::PAGE_SIZE] {
            assert_eq!(
                walk(&mem, a).map(|e| e & !0xfff),
                Some(a),
                "identity at {a:#x}"
            );
            assert_eq!(flags(a), user_ram);
        }
        assert_eq!(flags(6 << 30), None, "nothing past high RAM");
        assert_eq!(
            flags(layout::ARTIFACT_START),
            None,
            "no artifact, no window"
        );
        // A GiB with nothing in it has no page directory.
        let pdpte = mem
            .read_obj::<u64>(GuestAddress(layout::PDPT + 7 * 8))
            .unwrap();
        assert_eq!(pdpte, 0);
    }
}
