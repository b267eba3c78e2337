//! Guest RAM: anonymous mappings at the guest-physical ranges of [`layout::ram_ranges`] (low
//! RAM from 0 and, past 3 GiB, high RAM from 4 GiB), one KVM slot each.

use bulwark_abi::layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as the VMM sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Errors from creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is not a whole number of 2 MiB pages or is out of range.
    #[error(
        "guest RAM of {mib} MiB is out of range: it must be a multiple of 2 MiB and at most {max} MiB"
    )]
    BadSize {
        /// Requested size in MiB.
        mib: u64,
        /// Largest size in MiB.
        max: u64,
    },
    /// The host could not map the memory.
    #[error("cannot allocate {mib} MiB of guest RAM: {source}")]
    Allocate {
        /// Requested size in MiB.
        mib: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Register(kvm_ioctls::Error),
    /// The mapping has no host address (cannot happen with an mmap backend).
    #[error("guest RAM has no host mapping")]
    NoHostAddress,
}

/// Checks that `mib` MiB is a usable RAM size (a whole number of 2 MiB pages, more than 0, at
/// most [`layout::MAX_RAM_SIZE`]) and returns it in bytes.
pub fn check_size(mib: u64) -> Result<u64, MemoryError> {
    let max = layout::MAX_RAM_SIZE >> 20;
    mib.checked_mul(1 << 20)
        .filter(|&s| s > 0 && s <= layout::MAX_RAM_SIZE && s % layout::PAGE_SIZE == 0)
        .ok_or(MemoryError::BadSize { mib, max })
}

/// Allocates `mib` MiB of zeroed guest RAM at the ranges [`layout::ram_ranges`] gives. The host
/// commits a page only when the guest first touches it, in 4 KiB pages: see
/// [`prefer_huge_pages`] for the part where huge pages pay.
pub fn create(mib: u64) -> Result<GuestMemory, MemoryError> {
    let max = layout::MAX_RAM_SIZE >> 20;
    let size = check_size(mib)?;
    let mut ranges = Vec::with_capacity(2);
    for (start, len) in layout::ram_ranges(size) {
        if len > 0 {
            let len = usize::try_from(len).map_err(|_| MemoryError::BadSize { mib, max })?;
            ranges.push((GuestAddress(start), len));
        }
    }
    GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Allocate { mib, source })
}

/// Asks the host to back guest RAM from guest-physical `from` upwards (rounded up to a 2 MiB
/// page) with transparent huge pages; returns how many bytes it asked for.
///
/// Only the heap gains: a guest that touches a fresh 2 MiB heap page takes one fault for it
/// instead of 512 (a CPython call's instantiation went from 55 to 10 ms). The low regions the
/// VMM itself writes (system page, boot info, stubs, image, stack, payload) stay in 4 KiB pages:
/// there a huge page would make the VMM's first small write zero a whole 2 MiB. A kernel
/// without transparent huge pages refuses the advice and RAM stays in 4 KiB pages.
pub fn prefer_huge_pages(mem: &GuestMemory, from: u64) -> u64 {
    let Some(from) = layout::page_align_up(from) else {
        return 0;
    };
    let mut advised = 0;
    for region in mem.iter() {
        let start = region.start_addr().0.max(from);
        let Some(end) = region.start_addr().0.checked_add(region.len()) else {
            continue;
        };
        if start >= end {
            continue;
        }
        let Ok(host) = mem.get_host_address(GuestAddress(start)) else {
            continue;
        };
        let Ok(len) = usize::try_from(end - start) else {
            continue;
        };
        // SAFETY: [start, end) lies inside `region` (`end` is its end), so [host, host + len)
        // lies inside the region's anonymous mapping, alive while `mem` is; `host` is page
        // aligned, as madvise needs: the mapping starts on a page boundary and `start` is a
        // multiple of 2 MiB past the region's start (regions start at 0 and at 4 GiB).
        // MADV_HUGEPAGE only changes how the kernel backs that range, never its contents.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) } == 0 {
            advised += end - start;
        }
    }
    advised
}

/// The part of guest RAM `mem` (of `mem_size` bytes) the guest may have a device write or the
/// VMM answer into ([`layout::guest_writable_ranges`]), as guest memory of its own over the same
/// host pages. A device given this view cannot reach the page tables, descriptor tables, boot
/// info, CPL0 stubs or window tables, whatever addresses the guest puts in its rings.
///
/// # Safety
///
/// The view does not own its pages: the caller must keep `mem` (some clone of it) alive for as
/// long as the view or any clone of it is used.
pub unsafe fn guest_writable_view(
    mem: &GuestMemory,
    mem_size: u64,
) -> Result<GuestMemory, MemoryError> {
    let mib = mem_size >> 20;
    let max = layout::MAX_RAM_SIZE >> 20;
    let mut regions = Vec::new();
    for (start, end) in layout::guest_writable_ranges(mem_size) {
        if end <= start {
            continue;
        }
        let len = usize::try_from(end - start).map_err(|_| MemoryError::BadSize { mib, max })?;
        // The whole range must lie in one region of `mem`.
        mem.get_slice(GuestAddress(start), len)
            .map_err(|_| MemoryError::NoHostAddress)?;
        let host = mem
            .get_host_address(GuestAddress(start))
            .map_err(|_| MemoryError::NoHostAddress)?;
        // SAFETY: [host, host + len) lies inside one region of `mem` (checked just above), a
        // private read-write mapping; the new region only borrows it (a raw region is never
        // unmapped on drop), and the caller keeps `mem` alive while the view is used (this
        // function's contract).
        let raw = unsafe {
            vm_memory::MmapRegion::build_raw(
                host,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|_| MemoryError::NoHostAddress)?;
        regions.push(
            vm_memory::GuestRegionMmap::new(raw, GuestAddress(start))
                .ok_or(MemoryError::NoHostAddress)?,
        );
    }
    GuestMemory::from_regions(regions).map_err(|_| MemoryError::NoHostAddress)
}

/// How guest RAM is cut into KVM memory slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slots {
    /// One slot per region (slots 0 and 1).
    PerRegion,
    /// As `PerRegion`, but the windows' page tables ([`layout::WINDOW_TABLES`]) in a slot of
    /// their own, [`WINDOW_TABLES_SLOT`], cut out of the first region (whose rest is slots 0
    /// and [`ABOVE_WINDOW_TABLES_SLOT`]). A reusable VM's reset removes and re-adds that slot
    /// alone, which makes KVM drop what it built from those tables and nothing else
    /// ([`crate::reset::session`]).
    WindowTablesApart,
}

/// The slot of the windows' page tables with [`Slots::WindowTablesApart`] (RAM's regions take
/// 0 and 1, the artifact 2).
pub const WINDOW_TABLES_SLOT: u32 = 3;
/// The slot of the first region's RAM past the windows' page tables, with
/// [`Slots::WindowTablesApart`].
pub const ABOVE_WINDOW_TABLES_SLOT: u32 = 4;
const _: () = assert!(
    WINDOW_TABLES_SLOT > 1
        && ABOVE_WINDOW_TABLES_SLOT > 1
        && WINDOW_TABLES_SLOT != crate::artifact::ARTIFACT_SLOT
        && ABOVE_WINDOW_TABLES_SLOT != crate::artifact::ARTIFACT_SLOT
);

/// Registers guest RAM `mem` with the VM, in the slots `how` says ([`slots`]).
///
/// # Safety
///
/// From here on the guest reads and writes the host memory behind `mem` whenever a vCPU of
/// `vm` runs. The caller must keep that mapping alive (some clone of `mem` holds it: vm-memory
/// unmaps a region when its last clone drops) for as long as any vCPU of `vm` can run, and must
/// not call this twice for the same VM (the slot numbers would be reused).
pub unsafe fn register(vm: &VmFd, mem: &GuestMemory, how: Slots) -> Result<(), MemoryError> {
    for region_desc in slots(mem, how)? {
        // SAFETY: [host, host + len) is part of the mapping of a region of `mem`, which the
        // caller keeps alive while a vCPU of `vm` can run (this function's contract). The
        // regions of one `GuestMemoryMmap` overlap neither in guest-physical nor in host
        // addresses, the parts of a cut region do not overlap either, and each slot has its
        // own number, so no slot replaces or overlaps another.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// The KVM memory slots [`register`] gives `mem`, cut as `how` says.
pub fn slots(
    mem: &GuestMemory,
    how: Slots,
) -> Result<Vec<kvm_userspace_memory_region>, MemoryError> {
    let mut out = Vec::new();
    for (index, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::NoHostAddress)? as u64;
        let start = region.start_addr().0;
        let end = start + region.len();
        let slot = |slot, from: u64, to: u64| kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: from,
            memory_size: to - from,
            userspace_addr: host + (from - start),
        };
        let index = u32::try_from(index).map_err(|_| MemoryError::NoHostAddress)?;
        let tables = layout::WINDOW_TABLES..layout::WINDOW_TABLES + layout::WINDOW_TABLES_SIZE;
        if how == Slots::WindowTablesApart && start <= tables.start && tables.end < end {
            out.push(slot(index, start, tables.start));
            out.push(slot(WINDOW_TABLES_SLOT, tables.start, tables.end));
            out.push(slot(ABOVE_WINDOW_TABLES_SLOT, tables.end, end));
        } else {
            out.push(slot(index, start, end));
        }
    }
    Ok(out)
}

/// Size of guest RAM in bytes.
pub fn size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writable_view_shares_pages_and_leaves_out_the_supervisor_regions() {
        use vm_memory::Bytes;
        let mem = create(256).unwrap();
        // SAFETY: `mem` outlives `view` in this test.
        let view = unsafe { guest_writable_view(&mem, 256 << 20) }.unwrap();
        for protected in [layout::PML4, layout::BOOT_INFO, layout::WINDOW_TABLES] {
            assert!(view.write_obj(1u64, GuestAddress(protected)).is_err());
        }
        view.write_obj(0xabu8, GuestAddress(layout::PAYLOAD_START))
            .unwrap();
        let seen: u8 = mem.read_obj(GuestAddress(layout::PAYLOAD_START)).unwrap();
        assert_eq!(seen, 0xab, "the same pages");
        assert!(
            view.write_obj(1u8, GuestAddress(layout::VIRTQUEUES))
                .is_ok()
        );
    }

    #[test]
    fn create_checks_the_size() {
        assert_eq!(size(&create(64).unwrap()), 64 << 20);
        assert!(matches!(create(0), Err(MemoryError::BadSize { .. })));
        assert!(matches!(create(3), Err(MemoryError::BadSize { .. })));
        assert!(matches!(
            create(16 * 1024 + 2),
            Err(MemoryError::BadSize { .. })
        ));
        // Past 3 GiB, RAM goes on above 4 GiB, in a second region.
        let big = create(4096).unwrap();
        assert_eq!(size(&big), 4 << 30);
        let regions: Vec<_> = big.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            regions,
            [(0, layout::LOW_RAM_END), (layout::HIGH_RAM_START, 1 << 30)]
        );
        assert!(matches!(create(u64::MAX), Err(MemoryError::BadSize { .. })));
    }

    /// The `VmFlags` line of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.to_owned();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn huge_pages_only_from_the_heap_up() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // No transparent huge pages on this kernel: nothing to advise.
        }
        let mem = create(4096).unwrap();
        let heap = layout::heap_start(0).unwrap();
        let host = |gpa| mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        // Nothing is advised before the call.
        assert!(!vm_flags(host(heap)).contains(" hg"));
        // An unaligned start is rounded up to the next 2 MiB page.
        let advised = prefer_huge_pages(&mem, heap - 1);
        assert_eq!(advised, (layout::LOW_RAM_END - heap) + (1 << 30));
        for low in [0, layout::BOOT_INFO, layout::IMAGE_START, heap - 4096] {
            assert!(!vm_flags(host(low)).contains(" hg"), "{low:#x}");
        }
        for huge in [heap, layout::LOW_RAM_END - 4096, layout::HIGH_RAM_START] {
            assert!(vm_flags(host(huge)).contains(" hg"), "{huge:#x}");
        }
        // Past the end of RAM there is nothing to advise.
        assert_eq!(prefer_huge_pages(&mem, 8 << 30), 0);
        assert_eq!(prefer_huge_pages(&mem, u64::MAX), 0);
    }
}
