//! Linear-memory windows: the page tables the VMM writes on the guest's map requests.
//!
//! A request ([`MapRequest`]) names a window, a range of it and the heap RAM to put behind it.
//! It is guest data, so it is checked in full before anything is written: the window exists,
//! the range is 4 KiB aligned, not empty, inside the window's mappable part, and not mapped
//! yet; the RAM is heap RAM (never the system page, stubs, image, stack, the window tables or
//! anything outside RAM) and no window maps any of it yet. A malformed request is a
//! [`MapError`], which ends the VM. When the pool of table pages is used up, nothing is written
//! and the guest is told so ([`MAP_NO_TABLE_SPACE`]).
//!
//! Entries only ever go from not present to present, while the vCPU is stopped in this exit:
//! no TLB or kvm_pvm shadow page table can hold a stale entry. Aligned 2 MiB blocks get one
//! page-directory entry; the rest (a memory's last, partly mapped 2 MiB) get a 4 KiB page table,
//! which later requests fill in.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_abi::layout;
use bulwark_abi::window::{MAP_NO_TABLE_SPACE, MAP_OK, MapRequest};
use vm_memory::{Bytes, GuestAddress};

use super::paging::{HUGE, PRESENT, USER, WRITABLE};
use crate::memory::GuestMemory;

/// 4 KiB.
const SMALL: u64 = 0x1000;
/// A zeroed 4 KiB page, to clear a table page before use.
const ZERO_PAGE: [u8; 0x1000] = [0; 0x1000];
/// 2 MiB.
const BLOCK: u64 = layout::PAGE_SIZE;
/// 1 GiB.
const GIB: u64 = 1 << 30;
/// Flags of an entry that points to a lower table.
const TABLE: u64 = PRESENT | WRITABLE | USER;
/// The address bits of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// A map request the VMM refuses: the VM ends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MapError {
    /// The request is not 8-byte aligned in RAM the guest may write (its own answer goes there).
    #[error(
        "the map request at {0:#x} is outside guest RAM the guest may write, or not 8-byte aligned"
    )]
    Unreadable(u64),
    /// No such window.
    #[error("window {0} does not exist (there are {max})", max = layout::WINDOW_COUNT)]
    NoWindow(u32),
    /// Offset, length or address not 4 KiB aligned, or an empty range.
    #[error(
        "window {window}: {len:#x} bytes at offset {offset:#x} from {phys:#x} is not a 4 KiB-aligned, non-empty range"
    )]
    Unaligned {
        /// The window.
        window: u32,
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The RAM address asked for.
        phys: u64,
    },
    /// The range runs past the window's mappable part.
    #[error("window {window}: {len:#x} bytes at offset {offset:#x} run past its {max:#x} mappable bytes", max = layout::WINDOW_MAX_SIZE)]
    PastWindow {
        /// The window.
        window: u32,
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
    },
    /// The RAM is not heap RAM.
    #[error("{len:#x} bytes at {phys:#x} are not heap RAM")]
    NotHeap {
        /// The RAM address asked for.
        phys: u64,
        /// The length asked for.
        len: u64,
    },
    /// Some of the RAM is behind a window already.
    #[error("RAM at {0:#x} is already behind a window")]
    RamInUse(u64),
    /// Some of the range is mapped already.
    #[error("window {window}: offset {offset:#x} is already mapped")]
    Mapped {
        /// The window.
        window: u32,
        /// The first offset found mapped.
        offset: u64,
    },
    /// Guest memory could not be read or written (a bug: the tables are in RAM).
    #[error("the window tables at {0:#x} are not in guest RAM")]
    Tables(u64),
}

/// The windows of one VM: where the next table page comes from, and which RAM they map.
pub struct Windows {
    mem: GuestMemory,
    /// Size of guest RAM in bytes.
    mem_size: u64,
    /// Heap RAM ranges `(start, end)`: low heap and high RAM.
    heap: [(u64, u64); 2],
    /// Next free page of the table pool.
    next_table: u64,
    /// RAM behind windows: start -> end, ranges that never overlap.
    mapped: BTreeMap<u64, u64>,
}

/// Where the windows stand, for a VM reset ([`crate::reset`]): the page tables themselves are
/// guest RAM and restored with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowsState {
    next_table: u64,
    mapped: BTreeMap<u64, u64>,
}

/// What one 2 MiB block of a request needs.
enum Plan {
    /// A 2 MiB page (the block is whole, aligned on both sides, and empty).
    Huge,
    /// 4 KiB entries in the block's page table, which exists.
    Small,
    /// 4 KiB entries in a new page table.
    NewTable,
}

impl Windows {
    /// Where the windows stand now.
    pub fn save(&self) -> WindowsState {
        WindowsState {
            next_table: self.next_table,
            mapped: self.mapped.clone(),
        }
    }

    /// Puts back what [`Windows::save`] found. The page tables must be restored with guest RAM
    /// at the same time, and KVM's own mappings of them dropped (entries go from present back
    /// to absent here): [`crate::reset`] does both.
    pub fn restore(&mut self, state: &WindowsState) {
        self.next_table = state.next_table;
        self.mapped.clone_from(&state.mapped);
    }

    /// The windows of a VM whose guest RAM is `mem`, of `mem_size` bytes, with its heap from
    /// `heap_start`; none is mapped (the PDPTs `cpu::paging::write` left empty).
    pub fn new(mem: GuestMemory, mem_size: u64, heap_start: u64) -> Self {
        let [(_, low), (high_start, high)] = layout::ram_ranges(mem_size);
        Self {
            mem,
            mem_size,
            heap: [(heap_start, low), (high_start, high_start + high)],
            next_table: layout::WINDOW_TABLES + layout::WINDOW_PDPTS * SMALL,
            mapped: BTreeMap::new(),
        }
    }

    /// Serves the request at guest-physical `addr`: checks it, writes the entries, and writes
    /// the status back into the request.
    pub fn serve(&mut self, addr: u64) -> Result<(), MapError> {
        // The status is written back: never into the tables, the stubs or boot info.
        if !addr.is_multiple_of(8)
            || !layout::is_guest_writable(addr, MapRequest::SIZE as u64, self.mem_size)
        {
            return Err(MapError::Unreadable(addr));
        }
        let mut raw = [0u8; MapRequest::SIZE];
        self.mem
            .read_slice(&mut raw, GuestAddress(addr))
            .map_err(|_| MapError::Unreadable(addr))?;
        let status = self.map(&MapRequest::from_bytes(&raw))?;
        self.mem
            .write_obj(status, GuestAddress(addr + MapRequest::STATUS_OFFSET))
            .map_err(|_| MapError::Unreadable(addr))
    }

    /// `at` if it is an entry of the window tables' region: the entries lead only there, and
    /// whatever an entry says, nothing outside that region is ever read or written as a table.
    fn table_entry(at: u64) -> Result<GuestAddress, MapError> {
        let tables = layout::WINDOW_TABLES..layout::WINDOW_TABLES + layout::WINDOW_TABLES_SIZE;
        if tables.contains(&at) && at.is_multiple_of(8) {
            Ok(GuestAddress(at))
        } else {
            Err(MapError::Tables(at))
        }
    }

    fn read(&self, at: u64) -> Result<u64, MapError> {
        self.mem
            .read_obj(Self::table_entry(at)?)
            .map_err(|_| MapError::Tables(at))
    }

    fn write(&self, at: u64, value: u64) -> Result<(), MapError> {
        self.mem
            .write_obj(value, Self::table_entry(at)?)
            .map_err(|_| MapError::Tables(at))
    }

    /// Address of the PDPT entry for virtual `v` (inside the windows).
    fn pdpt_entry(v: u64) -> u64 {
        let slot = (v >> 39) - layout::WINDOW_PML4_SLOT;
        layout::WINDOW_TABLES + slot * SMALL + ((v >> 30) & 511) * 8
    }

    /// Takes a zeroed page from the pool.
    fn take_table(&mut self) -> Result<u64, MapError> {
        let page = self.next_table;
        self.next_table += SMALL;
        self.mem
            .write_slice(&ZERO_PAGE, GuestAddress(page))
            .map_err(|_| MapError::Tables(page))?;
        Ok(page)
    }

    /// Checks `req` and maps it; returns the status for the guest.
    pub fn map(&mut self, req: &MapRequest) -> Result<u32, MapError> {
        let MapRequest {
            window,
            offset,
            len,
            phys,
            ..
        } = *req;
        if u64::from(window) >= layout::WINDOW_COUNT {
            return Err(MapError::NoWindow(window));
        }
        if len == 0 || !(offset | len | phys).is_multiple_of(SMALL) {
            return Err(MapError::Unaligned {
                window,
                offset,
                len,
                phys,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > layout::WINDOW_MAX_SIZE)
        {
            return Err(MapError::PastWindow {
                window,
                offset,
                len,
            });
        }
        let phys_end = phys.checked_add(len);
        if !self
            .heap
            .iter()
            .any(|&(s, e)| phys >= s && phys_end.is_some_and(|pe| pe <= e))
        {
            return Err(MapError::NotHeap { phys, len });
        }
        let phys_end = phys + len;
        // The mapped range that starts last at or before phys_end - 1 is the only one that can
        // overlap [phys, phys_end).
        if let Some((&s, &e)) = self.mapped.range(..phys_end).next_back()
            && e > phys
        {
            return Err(MapError::RamInUse(s.max(phys)));
        }

        // Plan block by block, reading the tables; nothing is written until all is checked.
        let start = layout::window_start(u64::from(window)) + offset;
        let end = start + len;
        let mut plans = Vec::new();
        let mut new_dirs = BTreeSet::new();
        let mut v = start;
        while v < end {
            let block = v & !(BLOCK - 1);
            let upto = (block + BLOCK).min(end);
            let p = phys + (v - start);
            let pdpte = self.read(Self::pdpt_entry(v))?;
            let pde = if pdpte & PRESENT == 0 {
                new_dirs.insert(v & !(GIB - 1));
                0
            } else {
                self.read((pdpte & ADDR) + ((v >> 21) & 511) * 8)?
            };
            let mapped_at = |o: u64| MapError::Mapped {
                window,
                offset: o - layout::window_start(u64::from(window)),
            };
            let plan = if pde & PRESENT == 0 {
                if v == block && upto == block + BLOCK && p.is_multiple_of(BLOCK) {
                    Plan::Huge
                } else {
                    Plan::NewTable
                }
            } else if pde & HUGE != 0 {
                return Err(mapped_at(v));
            } else {
                let mut at = v;
                while at < upto {
                    if self.read((pde & ADDR) + ((at >> 12) & 511) * 8)? & PRESENT != 0 {
                        return Err(mapped_at(at));
                    }
                    at += SMALL;
                }
                Plan::Small
            };
            plans.push((v, upto, p, plan));
            v = upto;
        }
        let tables = new_dirs.len() as u64
            + plans
                .iter()
                .filter(|(.., plan)| matches!(plan, Plan::NewTable))
                .count() as u64;
        if tables * SMALL > layout::WINDOW_TABLES + layout::WINDOW_TABLES_SIZE - self.next_table {
            return Ok(MAP_NO_TABLE_SPACE);
        }

        // Write: each page table before the entry that points to it.
        for (v, upto, p, plan) in plans {
            let pdpte_at = Self::pdpt_entry(v);
            let mut pdpte = self.read(pdpte_at)?;
            if pdpte & PRESENT == 0 {
                pdpte = self.take_table()? | TABLE;
                self.write(pdpte_at, pdpte)?;
            }
            let pde_at = (pdpte & ADDR) + ((v >> 21) & 511) * 8;
            match plan {
                Plan::Huge => self.write(pde_at, p | TABLE | HUGE)?,
                Plan::Small | Plan::NewTable => {
                    let table = match plan {
                        Plan::NewTable => self.take_table()?,
                        _ => self.read(pde_at)? & ADDR,
                    };
                    let mut at = v;
                    while at < upto {
                        self.write(table + ((at >> 12) & 511) * 8, (p + at - v) | TABLE)?;
                        at += SMALL;
                    }
                    if matches!(plan, Plan::NewTable) {
                        self.write(pde_at, table | TABLE)?;
                    }
                }
            }
        }
        self.mapped.insert(phys, phys_end);
        Ok(MAP_OK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 256 << 20;
    /// A 2 MiB-aligned heap address.
    const HEAP: u64 = 64 << 20;

    fn windows() -> Windows {
        let mem = crate::memory::create(MEM >> 20).unwrap();
        super::super::paging::write(&mem, MEM, 0).unwrap();
        Windows::new(mem, MEM, layout::heap_start(0).unwrap())
    }

    fn req(window: u32, offset: u64, len: u64, phys: u64) -> MapRequest {
        MapRequest {
            window,
            status: bulwark_abi::window::MAP_PENDING,
            offset,
            len,
            phys,
        }
    }

    /// Walks the tables like the CPU: the guest-physical address behind `v`, if mapped.
    fn translate(w: &Windows, v: u64) -> Option<u64> {
        let read = |a: u64| w.mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let pml4e = read(layout::PML4 + ((v >> 39) & 511) * 8);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & ADDR) + ((v >> 30) & 511) * 8);
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & ADDR) + ((v >> 21) & 511) * 8);
        if pde & PRESENT == 0 {
            return None;
        }
        assert_eq!(pde & USER, USER);
        if pde & HUGE != 0 {
            return Some((pde & ADDR & !(BLOCK - 1)) + (v & (BLOCK - 1)));
        }
        let pte = read((pde & ADDR) + ((v >> 12) & 511) * 8);
        (pte & PRESENT != 0).then(|| (pte & ADDR) + (v & (SMALL - 1)))
    }

    #[test]
    fn a_memory_maps_exactly_to_its_size_and_grows_in_place() {
        let mut w = windows();
        let base = layout::window_start(2);
        // 64 KiB, then to 2 MiB + 64 KiB, then to 10 MiB: the first two blocks stay on 4 KiB
        // pages, the aligned blocks after it are whole.
        assert_eq!(w.map(&req(2, 0, 0x1_0000, HEAP)), Ok(MAP_OK));
        assert_eq!(translate(&w, base), Some(HEAP));
        assert_eq!(translate(&w, base + 0xffff), Some(HEAP + 0xffff));
        assert_eq!(translate(&w, base + 0x1_0000), None, "exact to 64 KiB");
        assert_eq!(w.map(&req(2, 0x1_0000, BLOCK, HEAP + 0x1_0000)), Ok(MAP_OK));
        assert_eq!(
            translate(&w, base + BLOCK + 0xffff),
            Some(HEAP + BLOCK + 0xffff)
        );
        assert_eq!(translate(&w, base + BLOCK + 0x1_0000), None);
        assert_eq!(
            w.map(&req(
                2,
                BLOCK + 0x1_0000,
                4 * BLOCK - 0x1_0000,
                HEAP + BLOCK + 0x1_0000
            )),
            Ok(MAP_OK)
        );
        assert_eq!(
            translate(&w, base + 5 * BLOCK - 1),
            Some(HEAP + 5 * BLOCK - 1)
        );
        assert_eq!(translate(&w, base + 5 * BLOCK), None);
        // Blocks 2..=4 were whole and aligned: 2 MiB pages.
        let pdpte: u64 = w
            .mem
            .read_obj(GuestAddress(Windows::pdpt_entry(base)))
            .unwrap();
        let pde: u64 = w
            .mem
            .read_obj(GuestAddress((pdpte & ADDR) + 3 * 8))
            .unwrap();
        assert_eq!(pde & HUGE, HUGE);
        // Other windows are untouched.
        assert_eq!(translate(&w, layout::window_start(1)), None);
        assert_eq!(translate(&w, layout::window_start(3)), None);
    }

    #[test]
    fn malformed_requests_are_refused_before_anything_is_written() {
        let mut w = windows();
        let n = u32::try_from(layout::WINDOW_COUNT).unwrap();
        assert_eq!(w.map(&req(n, 0, SMALL, HEAP)), Err(MapError::NoWindow(n)));
        assert!(matches!(
            w.map(&req(0, 1, SMALL, HEAP)),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(&req(0, 0, 0, HEAP)),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(&req(0, 0, SMALL, HEAP + 8)),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(&req(0, layout::WINDOW_MAX_SIZE - SMALL, 2 * SMALL, HEAP)),
            Err(MapError::PastWindow { .. })
        ));
        assert!(matches!(
            w.map(&req(0, !(SMALL - 1), SMALL, HEAP)),
            Err(MapError::PastWindow { .. })
        ));
        // Not heap: the system page, the stubs, the image, the window tables, past RAM, and a
        // range that wraps.
        for phys in [
            0,
            layout::EXCEPTION_STUBS,
            layout::IMAGE_USER_START,
            layout::WINDOW_TABLES,
            layout::PAYLOAD_START - SMALL,
            MEM,
            layout::ARTIFACT_START,
        ] {
            assert!(
                matches!(
                    w.map(&req(0, 0, SMALL, phys)),
                    Err(MapError::NotHeap { .. })
                ),
                "{phys:#x}"
            );
        }
        assert!(matches!(
            w.map(&req(0, 0, 2 * SMALL, MEM - SMALL)),
            Err(MapError::NotHeap { .. })
        ));
        assert!(matches!(
            w.map(&req(0, 0, SMALL, !(SMALL - 1))),
            Err(MapError::NotHeap { .. })
        ));
        // Nothing was mapped by any of these.
        assert_eq!(translate(&w, layout::window_start(0)), None);
        assert_eq!(
            w.next_table,
            layout::WINDOW_TABLES + layout::WINDOW_PDPTS * SMALL
        );
    }

    #[test]
    fn a_range_or_ram_is_never_mapped_twice() {
        let mut w = windows();
        assert_eq!(w.map(&req(0, 0, 0x1_0000, HEAP)), Ok(MAP_OK));
        assert_eq!(w.map(&req(1, 0, BLOCK, HEAP + BLOCK)), Ok(MAP_OK));
        // The same window range again, with other RAM: 4 KiB table and 2 MiB page.
        assert_eq!(
            w.map(&req(0, 0xf000, SMALL, HEAP + 8 * BLOCK)),
            Err(MapError::Mapped {
                window: 0,
                offset: 0xf000
            })
        );
        assert_eq!(
            w.map(&req(1, 0x1000, SMALL, HEAP + 8 * BLOCK)),
            Err(MapError::Mapped {
                window: 1,
                offset: 0x1000
            })
        );
        // The same RAM behind another window, also partly.
        assert_eq!(
            w.map(&req(2, 0, SMALL, HEAP + 0xf000)),
            Err(MapError::RamInUse(HEAP + 0xf000))
        );
        assert_eq!(
            w.map(&req(2, 0, BLOCK, HEAP + BLOCK - 0x1000 - BLOCK + 0x1000)),
            Err(MapError::RamInUse(HEAP))
        );
        assert_eq!(
            w.map(&req(2, 0, 2 * BLOCK, HEAP + BLOCK / 2 * 3 - BLOCK / 2)),
            Err(MapError::RamInUse(HEAP + BLOCK))
        );
        // Right next to both is fine.
        assert_eq!(w.map(&req(2, 0, SMALL, HEAP + 0x1_0000)), Ok(MAP_OK));
    }

    #[test]
    fn a_full_pool_refuses_without_writing() {
        let mut w = windows();
        let pool_end = layout::WINDOW_TABLES + layout::WINDOW_TABLES_SIZE;
        // Leave room for one table: a first map of a 4 KiB range needs two (directory and
        // page table).
        w.next_table = pool_end - SMALL;
        assert_eq!(w.map(&req(0, 0, SMALL, HEAP)), Ok(MAP_NO_TABLE_SPACE));
        assert_eq!(translate(&w, layout::window_start(0)), None);
        assert_eq!(w.next_table, pool_end - SMALL);
        // The RAM was not taken either.
        w.next_table = pool_end - 2 * SMALL;
        assert_eq!(w.map(&req(0, 0, SMALL, HEAP)), Ok(MAP_OK));
        assert_eq!(w.next_table, pool_end);
    }

    #[test]
    fn requests_are_read_from_guest_memory_and_answered_there() {
        let mut w = windows();
        let at = HEAP + 32 * BLOCK;
        let mut r = req(5, 0, SMALL, HEAP);
        w.mem.write_slice(&r.to_bytes(), GuestAddress(at)).unwrap();
        w.serve(at).unwrap();
        let status: u32 = w.mem.read_obj(GuestAddress(at + 4)).unwrap();
        assert_eq!(status, MAP_OK);
        assert_eq!(translate(&w, layout::window_start(5)), Some(HEAP));
        r.window = 1000;
        w.mem.write_slice(&r.to_bytes(), GuestAddress(at)).unwrap();
        assert_eq!(w.serve(at), Err(MapError::NoWindow(1000)));
        assert_eq!(w.serve(MEM - 8), Err(MapError::Unreadable(MEM - 8)));
        assert_eq!(
            w.serve(at + 1),
            Err(MapError::Unreadable(at + 1)),
            "unaligned"
        );
        for protected in [layout::BOOT_INFO + 8, layout::WINDOW_TABLES, layout::PML4] {
            assert_eq!(w.serve(protected), Err(MapError::Unreadable(protected)));
        }
    }
}
