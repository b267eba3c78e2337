//! The global allocator: Talc over the heap region boot info describes.

use talc::TalcLock;
use talc::source::Manual;

#[global_allocator]
static ALLOCATOR: TalcLock<spinning_top::RawSpinlock, Manual> = TalcLock::new(Manual);

/// Hands the heap to the allocator.
///
/// # Safety
/// `[start, start + size)` must be mapped, writable guest RAM that nothing else uses, and this
/// must be called once, before the first allocation (then [`add`] for more regions).
pub unsafe fn init(start: u64, size: u64) {
    let Ok(size) = usize::try_from(size) else {
        crate::console::print("bulwark-guest: the heap size does not fit the address space\n");
        crate::control::exit(bulwark_abi::ports::exit_status::BAD_BOOT_INFO);
    };
    // SAFETY: the caller guarantees the region is ours alone and valid for writes.
    let claimed = unsafe { ALLOCATOR.lock().claim(start as *mut u8, size) };
    if claimed.is_none() {
        crate::console::print("bulwark-guest: the heap is too small to use\n");
        crate::control::exit(bulwark_abi::ports::exit_status::OUT_OF_MEMORY);
    }
}

/// Hands a second region of RAM to the allocator (high RAM, above 4 GiB).
///
/// # Safety
/// As for [`init`], which must have been called first; the region must not overlap the heap.
pub unsafe fn add(start: u64, size: u64) {
    // SAFETY: the caller's guarantees are those of `init`.
    unsafe { init(start, size) }
}

/// Shrinks the allocation at `ptr` to `new_size` bytes in place (it never moves) and returns
/// the rest to the heap.
///
/// # Safety
/// `ptr` must have been allocated from the global allocator with `layout`, and `new_size` must
/// be non-zero and at most `layout.size()`.
pub unsafe fn shrink_in_place(ptr: *mut u8, layout: core::alloc::Layout, new_size: usize) {
    // SAFETY: the caller's guarantees are talc's for `shrink`, which keeps the pointer.
    unsafe { ALLOCATOR.lock().shrink(ptr, layout, new_size) }
}
