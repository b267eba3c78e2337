//! Linear memories for tools, allocated so that growing one never copies it.
//!
//! Without virtual memory, wasmtime's own linear memory is a `Vec` that grows by doubling its
//! capacity: growing a 200 MiB memory by one page asks the heap for 400 MiB more while the old
//! 200 MiB is still live, so a tool ran out of VM RAM at about a third of its `--max-memory`.
//! Here each memory reserves its whole allowance up front (its type's maximum, at most what is
//! left of the call's memory budget) and grows inside that block: nothing moves, nothing is
//! copied, and a tool gets every byte of `--max-memory` the VM's RAM holds, as under
//! `--isolation wasm`. Reserving touches no page: only the bytes a memory grows into are
//! zeroed (guest RAM is committed by the host on first touch).
//!
//! When the heap cannot give the whole allowance at once, the memory falls back to exact-size
//! blocks that are reallocated on growth (the old contents are copied).

use alloc::alloc::{Layout, alloc, dealloc, realloc};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// Alignment of a linear memory's block: a 4 KiB page, as wasmtime asks of host memories.
const ALIGN: usize = 4096;

/// Bytes of linear memory the running call may reserve, all its memories together.
static BUDGET: AtomicUsize = AtomicUsize::new(0);
/// Bytes reserved by the memories that are alive.
static RESERVED: AtomicUsize = AtomicUsize::new(0);

/// Sets the linear-memory budget of the call about to run (its `--max-memory`). The store's
/// limiter still decides every growth; this only sizes the reservations.
pub fn set_call_budget(bytes: u64) {
    BUDGET.store(
        usize::try_from(bytes).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
}

/// Makes the guest's linear memories (see the module docs).
pub struct GuestMemoryCreator;

// SAFETY: every memory made here is a block of the global allocator that only its
// `GuestMemory` owns, aligned to a page, zero-filled up to its size (new_memory and grow_to
// zero what they add), and no guard is needed because the engine has no guard pages and no
// reservation (bulwark_engine::shared_config), so compiled code checks every access against
// the memory's current size.
unsafe impl MemoryCreator for GuestMemoryCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        maximum: Option<usize>,
        _reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        if guard_size_in_bytes != 0 {
            return Err(format!(
                "a linear memory with a {guard_size_in_bytes}-byte guard cannot be made here"
            ));
        }
        let left = BUDGET
            .load(Ordering::Relaxed)
            .saturating_sub(RESERVED.load(Ordering::Relaxed));
        let wanted = maximum.unwrap_or(usize::MAX).min(left).max(minimum);
        // The whole allowance if the heap has it, else exactly the minimum.
        let memory = GuestMemory::with_capacity(minimum, wanted)
            .or_else(|| GuestMemory::with_capacity(minimum, minimum))
            .ok_or_else(|| format!("out of VM memory for a {minimum}-byte linear memory"))?;
        Ok(Box::new(memory))
    }
}

/// One linear memory: `size` bytes in use at `base`, inside a block of `capacity` bytes.
struct GuestMemory {
    base: *mut u8,
    size: usize,
    capacity: usize,
}

// SAFETY: the block is owned by this value alone; wasmtime serialises all access to a memory
// through its store, and the guest has one thread.
unsafe impl Send for GuestMemory {}
// SAFETY: as for Send: shared references never write through `base`.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// A memory of `size` zeroed bytes in a block of `capacity` bytes, or `None` when the heap
    /// cannot give the block.
    fn with_capacity(size: usize, capacity: usize) -> Option<Self> {
        // A zero-size block cannot be allocated: keep one page.
        let capacity = capacity.max(size).max(ALIGN);
        let layout = Layout::from_size_align(capacity, ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc(layout) };
        if base.is_null() {
            return None;
        }
        // SAFETY: `size <= capacity`, so the range is inside the block just allocated.
        unsafe { base.write_bytes(0, size) };
        RESERVED.fetch_add(capacity, Ordering::Relaxed);
        Some(Self {
            base,
            size,
            capacity,
        })
    }

    fn layout(&self) -> Layout {
        // The same size and alignment `with_capacity` or `grow_to` allocated with.
        Layout::from_size_align(self.capacity, ALIGN).unwrap_or(Layout::new::<u8>())
    }
}

// SAFETY: `base` points to `capacity` bytes owned by this memory, of which the first `size`
// are initialised (zeroed, then written only by the tool); growth within the capacity keeps
// `base`, and growth past it moves the contents to a new block before `base` is updated.
unsafe impl LinearMemory for GuestMemory {
    fn byte_size(&self) -> usize {
        self.size
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.capacity {
            Layout::from_size_align(new_size, ALIGN)
                .map_err(|_| wasmtime::format_err!("a {new_size}-byte memory is too large"))?;
            // SAFETY: `base` was allocated with `self.layout()`, and the new size is non-zero
            // and forms a valid layout with the same alignment (checked above).
            let moved = unsafe { realloc(self.base, self.layout(), new_size) };
            if moved.is_null() {
                return Err(wasmtime::format_err!(
                    "out of VM memory growing a linear memory to {new_size} bytes"
                ));
            }
            RESERVED.fetch_add(new_size - self.capacity, Ordering::Relaxed);
            self.base = moved;
            self.capacity = new_size;
        }
        if new_size > self.size {
            // SAFETY: `size < new_size <= capacity`: the range is inside the block.
            unsafe {
                self.base
                    .add(self.size)
                    .write_bytes(0, new_size - self.size)
            };
        }
        self.size = new_size;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        RESERVED.fetch_sub(self.capacity, Ordering::Relaxed);
        // SAFETY: `base` was allocated with this layout and is not used after this.
        unsafe { dealloc(self.base, self.layout()) };
    }
}
