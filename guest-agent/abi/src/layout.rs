//! Guest-physical memory layout, identical to the guest's virtual layout (identity-mapped).
//!
//! Every address the VMM and the guest agree on is a constant here. Guest RAM starts at 0 and is
//! mapped with 2 MiB pages only (1 GiB pages fault on kvm_pvm), so every region below is 2 MiB
//! aligned and has the page attributes of its 2 MiB pages:
//!
//! ```text
//! 0x0000_0000  SYSTEM       2 MiB  supervisor-only: page tables, GDT, TSS, IDT, exception stack
//! 0x0020_0000  BOOT_INFO    2 MiB  user read-only: the `BootInfo` block
//! 0x0040_0000  STUBS        2 MiB  supervisor-only, read-only: the CPL0 exception stubs
//! 0x0060_0000  IMAGE       26 MiB  the rest of the guest ELF (code, data, bss)
//! 0x0200_0000  STACK_GUARD  2 MiB  not mapped: a stack overflow faults instead of corrupting
//! 0x0220_0000  STACK        4 MiB  the guest stack, growing down from STACK_TOP
//! 0x0260_0000  VIRTQUEUES   2 MiB  the vsock device's rings, set up by the VMM before the guest
//! 0x0280_0000  WINDOW_TABLES 16 MiB supervisor-only: the page tables of the linear-memory
//!                                  windows, written by the VMM alone
//! 0x0380_0000  PAYLOAD      ...    an optional blob the VMM loads, then the heap up to the end of
//!                                  low RAM (at most LOW_RAM_END, 3 GiB)
//! 0xd000_0000  MMIO        256 MiB device registers; an access no device claims is fatal
//! 0x1_0000_0000 HIGH RAM    ...    RAM past the first 3 GiB, if any: the high heap
//! 0x4_4000_0000 ARTIFACT   1 GiB  user read-only: the precompiled module, mapped from its file
//! 0x80_0000_0000 WINDOWS   1 TiB  virtual only: WINDOW_COUNT linear-memory windows, 8 GiB each,
//!                                  mapped onto heap RAM by the VMM on the guest's request
//! ```
//!
//! RAM of `mem_size` bytes is `0..min(mem_size, LOW_RAM_END)` and, for the rest,
//! `HIGH_RAM_START..` ([`ram_ranges`]): the 32-bit hole with the MMIO window stays free, and a
//! VM can have more RAM than fits below it.

/// Size of one page in the guest's page tables (2 MiB).
pub const PAGE_SIZE: u64 = 2 << 20;

/// Start of the system region (supervisor-only): page tables, descriptor tables, exception stack.
pub const SYSTEM_START: u64 = 0;
/// Guest-physical address of the PML4 (loaded into CR3).
pub const PML4: u64 = 0x1000;
/// Guest-physical address of the single PDPT.
pub const PDPT: u64 = 0x2000;
/// Guest-physical address of the first of `PD_COUNT` page directories, one per GiB, back to back.
pub const PD_START: u64 = 0x10000;
/// Number of page directories: they map guest-physical 0 up to the end of the artifact window.
pub const PD_COUNT: u64 = (ARTIFACT_START + ARTIFACT_MAX_SIZE) >> 30;
/// Guest-physical address of the GDT.
pub const GDT: u64 = 0x8000;
/// Guest-physical address of the 64-bit TSS, followed by its I/O permission bitmap.
pub const TSS: u64 = 0x9000;
/// Bytes reserved for the TSS and its I/O permission bitmap (one bit per port, plus the
/// terminating byte).
pub const TSS_AREA_SIZE: u64 = 0x3000;
/// Guest-physical address of the IDT.
pub const IDT: u64 = 0xc000;
/// Top of the stack the CPU switches to (TSS.RSP0) when an exception enters the CPL0 stub.
pub const EXCEPTION_STACK_TOP: u64 = SYSTEM_START + PAGE_SIZE;
/// Top of the separate stack for double faults (TSS.IST1), so a #DF on a broken stack still
/// reaches the stub. It is the bottom of the RSP0 stack.
pub const DOUBLE_FAULT_STACK_TOP: u64 = 0x18_0000;
/// Lowest address of the exception stacks (they must stay above the tables).
pub const EXCEPTION_STACK_BOTTOM: u64 = 0x10_0000;

/// Guest-physical address of the boot-info block (`crate::boot::BootInfo`).
pub const BOOT_INFO: u64 = 0x20_0000;

/// Start of the region the guest ELF's loadable segments must lie in. Its first 2 MiB page
/// ([`EXCEPTION_STUBS`]) holds only the CPL0 exception stubs and is mapped supervisor-only and
/// read-only, so code running at CPL3 can neither rewrite nor run them.
pub const IMAGE_START: u64 = 0x40_0000;
/// Where the guest image's CPL3 code and data start: the page after the stubs' page.
pub const IMAGE_USER_START: u64 = IMAGE_START + PAGE_SIZE;
/// End (exclusive) of the guest image region.
pub const IMAGE_END: u64 = 0x200_0000;
/// Address of the CPL0 exception stubs: the guest's linker script puts them alone in the first
/// page of the image region.
/// The stub for vector `v` starts at `EXCEPTION_STUBS + v * EXCEPTION_STUB_STRIDE`.
pub const EXCEPTION_STUBS: u64 = IMAGE_START;
/// Distance between two consecutive exception stubs, in bytes.
pub const EXCEPTION_STUB_STRIDE: u64 = 16;
/// Number of exception vectors with a stub (the architectural exceptions 0..=31).
pub const EXCEPTION_VECTORS: u64 = 32;

/// Start of the unmapped page below the stack.
pub const STACK_GUARD: u64 = IMAGE_END;
/// Lowest address of the guest stack.
pub const STACK_BOTTOM: u64 = STACK_GUARD + PAGE_SIZE;
/// Initial RSP: the top of the guest stack.
pub const STACK_TOP: u64 = STACK_BOTTOM + (4 << 20);

/// Where the vsock device's virtqueues live. The VMM sets the device up before the guest starts
/// (features VERSION_1 and F_STREAM, [`QUEUE_SIZE`](crate::virtio::vsock::QUEUE_SIZE) entries
/// per queue, rings at [`virtqueue_rings`], DRIVER_OK), as a driver would: each register write
/// is an exit the guest saves (49 of them, ~1 ms on kvm_pvm). The guest finds the rings zeroed.
pub const VIRTQUEUES: u64 = STACK_TOP;
/// Bytes between the rings of one queue and the next.
pub const VIRTQUEUE_STRIDE: u64 = 0x3000;

/// The guest-physical addresses (descriptor table, available ring, used ring) of virtqueue
/// `index`: one 4 KiB page each, which holds a ring of up to 256 entries.
pub const fn virtqueue_rings(index: u64) -> (u64, u64, u64) {
    let base = VIRTQUEUES + index * VIRTQUEUE_STRIDE;
    (base, base + 0x1000, base + 0x2000)
}

/// Start of the supervisor-only region that holds the page tables of the linear-memory windows
/// ([`WINDOWS_START`]). Only the VMM writes it (on a [`CONTROL_MAP_WINDOW`] request): code at
/// CPL3 can neither read nor write it, so a Wasm escape cannot map anything itself.
///
/// [`CONTROL_MAP_WINDOW`]: crate::ports::CONTROL_MAP_WINDOW
pub const WINDOW_TABLES: u64 = VIRTQUEUES + PAGE_SIZE;
/// Size of the window-table region: the [`WINDOW_PDPTS`] page-directory-pointer tables, then a
/// pool of 4 KiB pages for page directories and page tables, taken in order.
pub const WINDOW_TABLES_SIZE: u64 = 16 << 20;
/// Number of PML4 slots (512 GiB each) the windows span; their PDPTs are the first pages of
/// [`WINDOW_TABLES`], written before the guest starts.
pub const WINDOW_PDPTS: u64 = WINDOW_COUNT * WINDOW_STRIDE / (1 << 39);
/// First PML4 slot of the windows.
pub const WINDOW_PML4_SLOT: u64 = WINDOWS_START >> 39;

/// Guest-virtual start of the linear-memory windows: past everything identity-mapped, in the
/// second 512 GiB of the address space. Nothing is behind a window until the VMM maps it.
pub const WINDOWS_START: u64 = 1 << 39;
/// Distance between two windows: [`WINDOW_MAX_SIZE`] that can be mapped, then a guard of the
/// same size that never is.
pub const WINDOW_STRIDE: u64 = 8 << 30;
/// Largest mapped part of a window: the 4 GiB a 32-bit linear memory can reach.
pub const WINDOW_MAX_SIZE: u64 = 4 << 30;
/// Bytes past a window's mapped part that are never mapped (the guard compiled code relies on).
pub const WINDOW_GUARD_SIZE: u64 = WINDOW_STRIDE - WINDOW_MAX_SIZE;
/// Number of windows a VM has over its life (one per linear memory ever created; a window is
/// never unmapped or reused).
pub const WINDOW_COUNT: u64 = 128;

/// Guest-virtual address of window `index` (no check that `index < WINDOW_COUNT`).
pub const fn window_start(index: u64) -> u64 {
    WINDOWS_START + index * WINDOW_STRIDE
}

/// Where the VMM loads the optional payload blob; the heap starts at the next 2 MiB boundary after it.
pub const PAYLOAD_START: u64 = WINDOW_TABLES + WINDOW_TABLES_SIZE;

/// Smallest heap the guest is given; a smaller RAM size is refused by the VMM.
pub const MIN_HEAP_SIZE: u64 = 16 << 20;

/// End of low RAM: RAM below 4 GiB must end below the MMIO window and leave the 32-bit hole
/// free; the rest of a larger RAM starts at [`HIGH_RAM_START`].
pub const LOW_RAM_END: u64 = 3 << 30;
/// Where RAM past [`LOW_RAM_END`] bytes goes: just above 4 GiB.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Largest guest RAM, low and high together (a 4 GiB linear memory, and then some, fits).
pub const MAX_RAM_SIZE: u64 = 16 << 30;

/// Start of the artifact window, just past the largest high RAM: the VMM maps the call's
/// precompiled module here, read-only, straight from its file (a memory slot of its own), and
/// the guest loads it in place. Nothing of it is copied, and none of it crosses vsock.
pub const ARTIFACT_START: u64 = HIGH_RAM_START + MAX_RAM_SIZE - LOW_RAM_END;
/// Largest artifact the window holds.
pub const ARTIFACT_MAX_SIZE: u64 = 1 << 30;

/// Start of the MMIO window (mapped uncached, user-accessible, with no RAM behind it).
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 256 << 20;

/// Base of the virtio-mmio transport of the vsock device.
pub const VIRTIO_VSOCK_MMIO: u64 = MMIO_START;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// An address in the MMIO window that no device will ever claim; the guest's fault test touches it.
pub const MMIO_UNCLAIMED: u64 = MMIO_START + MMIO_SIZE - 0x1000;

/// Rounds `addr` up to the next multiple of [`PAGE_SIZE`], or `None` on overflow.
pub const fn page_align_up(addr: u64) -> Option<u64> {
    match addr.checked_add(PAGE_SIZE - 1) {
        Some(a) => Some(a & !(PAGE_SIZE - 1)),
        None => None,
    }
}

/// The guest-physical ranges `(start, length)` of a RAM of `mem_size` bytes: low RAM from 0, and
/// high RAM from [`HIGH_RAM_START`] (0 bytes long unless `mem_size` is over [`LOW_RAM_END`]).
pub const fn ram_ranges(mem_size: u64) -> [(u64, u64); 2] {
    let low = if mem_size < LOW_RAM_END {
        mem_size
    } else {
        LOW_RAM_END
    };
    [(0, low), (HIGH_RAM_START, mem_size - low)]
}

/// The guest-physical ranges `(start, end)` of a RAM of `mem_size` bytes that the guest may have
/// a device write (its rings and buffers) or the VMM answer into: all RAM but the supervisor
/// regions below [`IMAGE_USER_START`] (page tables, descriptor tables, boot info, the CPL0
/// stubs) and [`WINDOW_TABLES`]. A device that could write there would let a guest rewrite its
/// own page tables and reach CPL0. A range may be empty.
pub const fn guest_writable_ranges(mem_size: u64) -> [(u64, u64); 3] {
    let [(_, low), (high_start, high)] = ram_ranges(mem_size);
    let tables_end = WINDOW_TABLES + WINDOW_TABLES_SIZE;
    [
        (min(IMAGE_USER_START, low), min(WINDOW_TABLES, low)),
        (min(tables_end, low), low),
        (high_start, high_start + high),
    ]
}

const fn min(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}

/// Whether `[addr, addr + len)` lies inside one of [`guest_writable_ranges`].
pub const fn is_guest_writable(addr: u64, len: u64, mem_size: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let ranges = guest_writable_ranges(mem_size);
    let mut i = 0;
    while i < ranges.len() {
        if addr >= ranges[i].0 && end <= ranges[i].1 {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether guest-physical `addr` is RAM in a guest with `mem_size` bytes of it.
pub const fn is_ram(addr: u64, mem_size: u64) -> bool {
    let [(_, low), (high_start, high)] = ram_ranges(mem_size);
    addr < low || (addr >= high_start && addr - high_start < high)
}

/// Start of the heap for a payload of `payload_size` bytes, or `None` if that overflows.
pub const fn heap_start(payload_size: u64) -> Option<u64> {
    match PAYLOAD_START.checked_add(payload_size) {
        Some(end) => page_align_up(end),
        None => None,
    }
}

// Compile-time checks of the layout: the MMIO window sits inside one GiB that the page
// directories cover, and the exception stubs fit in the image region.
const _: () = assert!(MMIO_START % (1 << 30) + MMIO_SIZE <= 1 << 30);
const _: () = assert!(MMIO_START + MMIO_SIZE <= PD_COUNT << 30);
const _: () = assert!(LOW_RAM_END <= MMIO_START);
const _: () = assert!(MMIO_START + MMIO_SIZE <= HIGH_RAM_START);
const _: () = assert!(ARTIFACT_START.is_multiple_of(1 << 30));
const _: () =
    assert!(HIGH_RAM_START.is_multiple_of(1 << 30) && MAX_RAM_SIZE.is_multiple_of(1 << 30));
const _: () =
    assert!(EXCEPTION_STUBS + EXCEPTION_VECTORS * EXCEPTION_STUB_STRIDE <= IMAGE_USER_START);
// The rings fit their pages, and all queues fit the virtqueue region.
const _: () = assert!(16 * crate::virtio::vsock::QUEUE_SIZE as u64 <= 0x1000);
const _: () = assert!(6 + 8 * crate::virtio::vsock::QUEUE_SIZE as u64 <= 0x1000);
const _: () = assert!(VIRTQUEUE_STRIDE * crate::virtio::vsock::QUEUE_COUNT as u64 <= PAGE_SIZE);
// The windows lie past the identity-mapped first 512 GiB, within whole PML4 slots, and their
// PDPTs leave most of the table region to the pool.
const _: () = assert!(WINDOWS_START.is_multiple_of(1 << 39) && WINDOW_PML4_SLOT >= 1);
const _: () = assert!((WINDOW_COUNT * WINDOW_STRIDE).is_multiple_of(1 << 39));
const _: () = assert!(WINDOW_PML4_SLOT + WINDOW_PDPTS <= 256);
const _: () = assert!(WINDOW_STRIDE.is_multiple_of(1 << 30) && WINDOW_MAX_SIZE < WINDOW_STRIDE);
const _: () = assert!(WINDOW_PDPTS * 0x1000 < WINDOW_TABLES_SIZE / 2);
const _: () = assert!(WINDOW_TABLES_SIZE.is_multiple_of(PAGE_SIZE));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_ordered_and_page_aligned() {
        let starts = [
            SYSTEM_START,
            BOOT_INFO,
            IMAGE_START,
            IMAGE_USER_START,
            IMAGE_END,
            STACK_GUARD,
            STACK_BOTTOM,
            STACK_TOP,
            VIRTQUEUES,
            WINDOW_TABLES,
            PAYLOAD_START,
            LOW_RAM_END,
            MMIO_START,
            HIGH_RAM_START,
            ARTIFACT_START,
        ];
        for w in starts.windows(2) {
            assert!(w[0] <= w[1], "{:#x} > {:#x}", w[0], w[1]);
        }
        for a in starts {
            assert_eq!(a % PAGE_SIZE, 0, "{a:#x} is not 2 MiB aligned");
        }
    }

    #[test]
    fn system_tables_fit_in_the_system_page_without_overlap() {
        let tables = [
            (PML4, 0x1000),
            (PDPT, 0x1000),
            (PD_START, PD_COUNT * 0x1000),
            (GDT, 0x1000),
            (TSS, TSS_AREA_SIZE),
            (IDT, 0x1000),
            (
                EXCEPTION_STACK_BOTTOM,
                EXCEPTION_STACK_TOP - EXCEPTION_STACK_BOTTOM,
            ),
        ];
        for (i, &(a, len)) in tables.iter().enumerate() {
            assert!(a + len <= SYSTEM_START + PAGE_SIZE);
            for &(b, blen) in &tables[i + 1..] {
                assert!(a + len <= b || b + blen <= a, "{a:#x} overlaps {b:#x}");
            }
        }
    }

    #[test]
    fn devices_may_write_neither_the_supervisor_regions_nor_the_window_tables() {
        let mem = 256 << 20;
        assert!(!is_guest_writable(PML4, 8, mem));
        assert!(!is_guest_writable(BOOT_INFO, 8, mem));
        assert!(!is_guest_writable(EXCEPTION_STUBS, 8, mem));
        assert!(!is_guest_writable(WINDOW_TABLES + 4096, 8, mem));
        assert!(
            !is_guest_writable(IMAGE_USER_START - 4, 8, mem),
            "straddles the stubs"
        );
        assert!(is_guest_writable(IMAGE_USER_START, 8, mem));
        assert!(is_guest_writable(VIRTQUEUES, 0x3000, mem));
        assert!(is_guest_writable(PAYLOAD_START, 4096, mem));
        assert!(!is_guest_writable(mem - 4, 8, mem), "past RAM");
        assert!(!is_guest_writable(u64::MAX - 2, 8, mem));
        let big = 5 << 30;
        assert!(is_guest_writable(HIGH_RAM_START, 4096, big));
        assert!(!is_guest_writable(LOW_RAM_END, 4096, big));
    }

    #[test]
    fn heap_start_is_aligned_and_overflow_checked() {
        assert_eq!(heap_start(0), Some(PAYLOAD_START));
        assert_eq!(heap_start(1), Some(PAYLOAD_START + PAGE_SIZE));
        assert_eq!(heap_start(u64::MAX), None);
        assert_eq!(page_align_up(u64::MAX - 1), None);
    }

    #[test]
    fn ram_past_low_ram_goes_above_4_gib() {
        assert_eq!(ram_ranges(512 << 20), [(0, 512 << 20), (HIGH_RAM_START, 0)]);
        assert_eq!(
            ram_ranges(LOW_RAM_END),
            [(0, LOW_RAM_END), (HIGH_RAM_START, 0)]
        );
        assert_eq!(
            ram_ranges(5 << 30),
            [(0, LOW_RAM_END), (HIGH_RAM_START, 2 << 30)]
        );
        assert!(is_ram(0, 5 << 30) && is_ram(LOW_RAM_END - 1, 5 << 30));
        assert!(!is_ram(LOW_RAM_END, 5 << 30) && !is_ram(MMIO_START, 5 << 30));
        assert!(is_ram(HIGH_RAM_START, 5 << 30) && is_ram((6 << 30) - 1, 5 << 30));
        assert!(!is_ram(6 << 30, 5 << 30) && !is_ram(HIGH_RAM_START, 512 << 20));
        // The page directories reach the end of the largest RAM.
        let [_, (start, len)] = ram_ranges(MAX_RAM_SIZE);
        assert_eq!(start + len, ARTIFACT_START);
        assert_eq!(ARTIFACT_START + ARTIFACT_MAX_SIZE, PD_COUNT << 30);
    }
}
