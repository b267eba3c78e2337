//! Linear memories for tools: each in a window of its own, with guard pages behind it.
//!
//! wasmtime runs with signal-based traps, a 4 GiB reservation and a guard after it
//! (`bulwark_engine::shared_config`), so compiled code does not bounds-check accesses to a
//! 32-bit memory: an access past the memory's size must fault. Each memory therefore gets a
//! window of guest-virtual space (`bulwark_abi::layout::window_start`) of which exactly its
//! size (to the 4 KiB page; Wasm pages are 64 KiB) is mapped onto heap RAM, by the VMM on a
//! [`MapRequest`] (the guest cannot write page tables). The rest of the window is never mapped.
//!
//! Growing maps more of the window: nothing moves and nothing is copied. A memory reserves its
//! RAM as one 2 MiB-aligned run of the heap when it is made: all it may reach, within what is
//! left of the call's budget (reserving touches no page). The window is mapped onto that run as
//! the memory grows, with 2 MiB pages where whole and 4 KiB pages for a partly used last 2 MiB;
//! a memory that outgrows its run takes another. Only the bytes a memory grows into are zeroed.
//!
//! A mapping is never removed while the VM lives, so a window and the RAM behind it are never
//! reused: a dropped memory's RAM stays with its window. A VM serves one call, so this costs
//! nothing in practice; it bounds a VM to `WINDOW_COUNT` memories over its life.

use alloc::alloc::{Layout, alloc, dealloc};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use bulwark_abi::layout::{self, PAGE_SIZE, WINDOW_COUNT, WINDOW_MAX_SIZE, WINDOW_STRIDE};
use bulwark_abi::ports;
use bulwark_abi::window::{MAP_NO_TABLE_SPACE, MAP_OK, MAP_PENDING, MapRequest};
use bulwark_engine::GrowLeftMapped;
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// 4 KiB: the granularity of a mapping.
const SMALL: u64 = 0x1000;

/// The next window to hand out; windows are never reused.
static NEXT_WINDOW: AtomicU64 = AtomicU64::new(0);

/// `bytes` as a `usize`: the guest is 64-bit, so every `u64` fits.
fn to_usize(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Why a map request did not map.
#[derive(Debug)]
pub enum MapError {
    /// The VMM's pool of window page tables is used up: nothing was mapped.
    NoTableSpace,
}

/// Asks the VMM to map `len` bytes of `window` from `offset` onto the RAM at `phys` (all 4 KiB
/// aligned, as `MapRequest` requires: the VMM ends the VM on anything malformed).
pub fn map(window: u32, offset: u64, len: u64, phys: u64) -> Result<(), MapError> {
    let mut request = MapRequest {
        window,
        status: MAP_PENDING,
        offset,
        len,
        phys,
    };
    // A mutable place: the VMM writes `status` into it.
    let at = core::ptr::addr_of_mut!(request);
    // The guest stack lies in low RAM, below 4 GiB: the address fits the 32-bit port write.
    let addr = u32::try_from(at as usize).unwrap_or(u32::MAX);
    // SAFETY: an `out` to the map register, granted by the TSS I/O bitmap. The VMM reads the
    // request and writes its `status` field while the guest is stopped in this instruction;
    // the asm is not `nomem`, so the compiler neither defers the request's stores past it nor
    // caches `status` across it.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_MAP_WINDOW, in("eax") addr, options(nostack));
    }
    // SAFETY: `at` points to `request`, alive and aligned; the read is volatile because the
    // VMM wrote the field behind the compiler's back.
    let status = unsafe { core::ptr::addr_of!((*at).status).read_volatile() };
    match status {
        MAP_OK => Ok(()),
        MAP_NO_TABLE_SPACE => Err(MapError::NoTableSpace),
        // The VMM answers nothing else; should it, treat it as no space (nothing used).
        _ => Err(MapError::NoTableSpace),
    }
}

/// Bytes of linear memory the running call may reserve, all its memories together.
static BUDGET: AtomicU64 = AtomicU64::new(0);
/// Bytes of RAM reserved by the call's memories so far.
static RESERVED: AtomicU64 = AtomicU64::new(0);

/// Sets the linear-memory budget of the call about to run (its `--max-memory`). The store's
/// limiter still decides every growth; this only sizes the RAM each memory reserves.
pub fn set_call_budget(bytes: u64) {
    BUDGET.store(bytes, Ordering::Relaxed);
}

/// Makes the guest's linear memories (see the module docs).
pub struct GuestMemoryCreator;

// SAFETY: a memory made here is a window whose first `byte_size()` bytes (rounded up to 4 KiB)
// are mapped, zero-filled RAM owned by it alone, and after which nothing is mapped up to the
// window's end: at least `reserved_size_in_bytes + guard_size_in_bytes` bytes from its base
// (checked below against WINDOW_STRIDE). Its base never moves, and it never grows past
// `reserved_size_in_bytes`, which is its capacity.
unsafe impl MemoryCreator for GuestMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let reserved = reserved_size_in_bytes.map_or(WINDOW_MAX_SIZE, |r| r as u64);
        let guard = guard_size_in_bytes as u64;
        if reserved > WINDOW_MAX_SIZE || reserved.saturating_add(guard) > WINDOW_STRIDE {
            return Err(format!(
                "a linear memory with a {reserved}-byte reservation and a {guard}-byte guard \
                 does not fit a {WINDOW_STRIDE}-byte window"
            ));
        }
        let window = NEXT_WINDOW.fetch_add(1, Ordering::Relaxed);
        let index = u32::try_from(window).ok().filter(|_| window < WINDOW_COUNT);
        let Some(index) = index else {
            return Err(format!(
                "out of linear-memory windows: a VM has {WINDOW_COUNT} over its life"
            ));
        };
        // The RAM to reserve at once: all the memory may reach, within what is left of the
        // call's budget. One run of heap RAM keeps the window on 2 MiB pages and wastes no
        // allocator padding; more runs are taken if the memory outgrows it.
        let left = BUDGET
            .load(Ordering::Relaxed)
            .saturating_sub(RESERVED.load(Ordering::Relaxed));
        let allowance = maximum
            .map_or(reserved, |m| m as u64)
            .min(reserved)
            .min(left)
            .max(minimum as u64);
        let mut memory = WindowMemory {
            window: index,
            base: layout::window_start(window),
            size: 0,
            mapped: 0,
            run: (0, 0, 0),
            reserved: 0,
            allowance,
            capacity: reserved,
        };
        memory
            .grow_to(minimum)
            .map_err(|e| format!("cannot make a {minimum}-byte linear memory: {e}"))?;
        Ok(Box::new(memory))
    }
}

/// One linear memory in its window.
struct WindowMemory {
    /// Index of the window.
    window: u32,
    /// Guest-virtual address of the window (and of the memory's first byte).
    base: u64,
    /// Bytes in use.
    size: u64,
    /// Bytes of the window mapped (a multiple of 4 KiB, at least `size`).
    mapped: u64,
    /// The run of heap RAM the window is mapped onto from here on: its guest-physical start,
    /// and the window offsets where it starts and ends (2 MiB aligned).
    run: (u64, u64, u64),
    /// Bytes of RAM taken for all runs so far.
    reserved: u64,
    /// Bytes of RAM the first run should hold.
    allowance: u64,
    /// Largest size: the reservation wasmtime asked for.
    capacity: u64,
}

impl WindowMemory {
    /// Takes a run of heap RAM, 2 MiB aligned: `want` 2 MiB blocks if the heap has them, else
    /// as many as it has in one piece, down to `need`. Returns the address and the blocks.
    fn take_run(want: u64, need: u64) -> Option<(u64, u64)> {
        let mut n = want.max(need);
        loop {
            let bytes = usize::try_from(n * PAGE_SIZE).ok()?;
            let layout = Layout::from_size_align(bytes, to_usize(PAGE_SIZE)).ok()?;
            // SAFETY: the layout has a non-zero size (n >= 1). The run is never freed: it
            // stays behind its window for the VM's life (module docs).
            let run = unsafe { alloc(layout) };
            if !run.is_null() {
                RESERVED.fetch_add(n * PAGE_SIZE, Ordering::Relaxed);
                return Some((run as u64, n));
            }
            if n <= need {
                return None;
            }
            n = (n / 2).max(need);
        }
    }

    /// Maps the window up to `end` (4 KiB aligned, above `mapped`) and zeroes what it maps.
    /// On an error, what was mapped stays mapped (and zeroed): `mapped` says how far. If that
    /// is past where it started, the error is [`GrowLeftMapped`], which ends the call.
    fn map_to(&mut self, end: u64) -> wasmtime::Result<()> {
        let started = self.mapped;
        self.map_more(end).map_err(|e| {
            if self.mapped > started {
                wasmtime::Error::new(GrowLeftMapped)
            } else {
                e
            }
        })
    }

    /// [`Self::map_to`]'s work.
    fn map_more(&mut self, end: u64) -> wasmtime::Result<()> {
        while self.mapped < end {
            let (phys, run_start, run_end) = self.run;
            if self.mapped >= run_end {
                // A new run, from the 2 MiB-aligned offset where the last one ended.
                let need = (end - self.mapped).div_ceil(PAGE_SIZE);
                let want = if self.mapped == 0 {
                    self.allowance.div_ceil(PAGE_SIZE)
                } else {
                    need
                };
                let (start, blocks) = Self::take_run(want, need).ok_or_else(|| {
                    wasmtime::format_err!("out of VM memory growing a linear memory")
                })?;
                self.run = (start, self.mapped, self.mapped + blocks * PAGE_SIZE);
                self.reserved += blocks * PAGE_SIZE;
                continue;
            }
            let upto = end.min(run_end);
            let from = phys + (self.mapped - run_start);
            map(self.window, self.mapped, upto - self.mapped, from).map_err(|_| {
                wasmtime::format_err!("out of window page tables growing a linear memory")
            })?;
            // SAFETY: `[mapped, upto)` was just mapped onto this memory's RAM; nothing else
            // refers to those bytes.
            unsafe {
                ((self.base + self.mapped) as *mut u8).write_bytes(0, to_usize(upto - self.mapped))
            };
            self.mapped = upto;
        }
        Ok(())
    }
}

// SAFETY: `base` is the window's address; its first `mapped` bytes are RAM owned by this memory
// alone, of which `size` are in use and were zeroed when they came into use; the base never
// moves.
unsafe impl LinearMemory for WindowMemory {
    fn byte_size(&self) -> usize {
        to_usize(self.size)
    }

    fn byte_capacity(&self) -> usize {
        to_usize(self.capacity)
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        let new_size = new_size as u64;
        if new_size > self.capacity {
            return Err(wasmtime::format_err!(
                "a linear memory cannot grow past its {}-byte reservation",
                self.capacity
            ));
        }
        if new_size <= self.size {
            return Ok(());
        }
        let end = new_size.next_multiple_of(SMALL);
        // Bytes past the size that were mapped already (a grow that failed half-way, or a
        // size that is not a multiple of 4 KiB) may have been written: zero them.
        let stale_end = self.mapped.min(end);
        if stale_end > self.size {
            // SAFETY: `[size, stale_end)` lies in the mapped part of the window, this memory's
            // RAM; nothing else refers to the bytes past `size`.
            unsafe {
                ((self.base + self.size) as *mut u8).write_bytes(0, to_usize(stale_end - self.size))
            };
        }
        if end > self.mapped {
            self.map_to(end)?;
        }
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }
}

impl Drop for WindowMemory {
    /// Gives back the part of the last run that is not behind the window. What is behind it
    /// stays there: the window is never unmapped (module docs).
    fn drop(&mut self) {
        RESERVED.fetch_sub(self.reserved, Ordering::Relaxed);
        let (phys, start, end) = self.run;
        let Ok(layout) = Layout::from_size_align(to_usize(end - start), to_usize(PAGE_SIZE)) else {
            return;
        };
        // Runs before the last are wholly mapped; of the last, `[start, mapped)` is.
        let used = self.mapped.saturating_sub(start);
        if end == start {
            // No run was ever taken.
        } else if used == 0 {
            // SAFETY: the run was allocated with this layout by take_run, and no byte of it is
            // behind the window.
            unsafe { dealloc(phys as *mut u8, layout) };
        } else if used < end - start {
            // SAFETY: as above; the first `used` bytes, behind the window, stay allocated (in
            // place: the window keeps mapping them) and are never freed.
            unsafe { crate::heap::shrink_in_place(phys as *mut u8, layout, to_usize(used)) };
        }
    }
}

// SAFETY: the memory's RAM is owned by this value alone; wasmtime serialises all access to a
// memory through its store, and the guest has one thread.
unsafe impl Send for WindowMemory {}
// SAFETY: as for Send: shared references never write through `base`.
unsafe impl Sync for WindowMemory {}

// The engine's reservation is exactly a window's mappable part, and its guard fits in the part
// of the window that is never mapped.
const _: () = assert!(bulwark_engine::MEMORY_RESERVATION == WINDOW_MAX_SIZE);
const _: () = assert!(bulwark_engine::MEMORY_GUARD_SIZE <= layout::WINDOW_GUARD_SIZE);
