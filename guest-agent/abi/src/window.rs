//! Linear-memory windows and trap delivery: what lets compiled Wasm run without bounds checks.
//!
//! Each linear memory lives in a window of guest-virtual space
//! ([`window_start`](crate::layout::window_start)): its first bytes are mapped onto heap RAM, the
//! rest of the window is not mapped, so an access past the memory's size faults. The guest cannot
//! write page tables; it asks the VMM with a [`MapRequest`] on
//! [`CONTROL_MAP_WINDOW`](crate::ports::CONTROL_MAP_WINDOW), and the VMM checks it (a window that
//! exists, a range of it that is not mapped yet and lies below
//! [`WINDOW_MAX_SIZE`](crate::layout::WINDOW_MAX_SIZE), heap RAM that no window maps yet) before
//! it writes the entries. A mapping is never changed or removed while the VM lives, so no TLB
//! (or kvm_pvm shadow page table) ever holds a stale entry.
//!
//! A fault then has to reach wasmtime: the CPL0 stub reports the exception as always, and if the
//! guest registered an entry on [`CONTROL_TRAP_ENTRY`](crate::ports::CONTROL_TRAP_ENTRY) and the
//! exception is one of [`TRAP_VECTORS`](crate::ports::TRAP_VECTORS) raised at CPL3 on the guest
//! stack, the VMM resumes the guest at CPL3 at that entry instead of ending the VM, with:
//!
//! | register | value |
//! |---|---|
//! | RDI | RIP of the faulting instruction |
//! | RSI | RBP at the fault (the frame pointer wasmtime walks) |
//! | RDX | 1 for a page fault (RCX holds the address), else 0 |
//! | RCX | the faulting address (CR2) of a page fault, else 0 |
//! | R8  | the vector |
//! | RSP | [`TRAP_STACK_GAP`] bytes below the RSP at the fault, 16-byte aligned |
//!
//! Other registers hold what the stub left. The entry never returns to the faulting code.

/// Bytes the VMM leaves between the stack pointer at a fault and the stack the trap entry
/// starts on (more than the 128-byte red zone of the System V ABI).
pub const TRAP_STACK_GAP: u64 = 256;

/// Least guest stack that must be left below a fault's RSP for the VMM to deliver it: a fault
/// with less (a runaway recursion, or a fault inside the entry itself) ends the VM instead.
pub const TRAP_STACK_MIN: u64 = 256 << 10;

/// [`MapRequest::status`] before the VMM has answered.
pub const MAP_PENDING: u32 = u32::MAX;
/// [`MapRequest::status`]: the range is mapped.
pub const MAP_OK: u32 = 0;
/// [`MapRequest::status`]: the VMM's pool of window page tables is used up; nothing was mapped.
/// Any other problem with a request ends the VM.
pub const MAP_NO_TABLE_SPACE: u32 = 1;

/// A request to map `len` bytes of window `window`, from byte `offset` of the window, onto the
/// guest-physical range at `phys`. All three are multiples of 4 KiB and `len` is not 0. The
/// VMM writes the answer into `status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapRequest {
    /// Index of the window, below [`WINDOW_COUNT`](crate::layout::WINDOW_COUNT).
    pub window: u32,
    /// [`MAP_PENDING`] from the guest; [`MAP_OK`] or [`MAP_NO_TABLE_SPACE`] from the VMM.
    pub status: u32,
    /// First byte of the window to map.
    pub offset: u64,
    /// Bytes to map.
    pub len: u64,
    /// Guest-physical address of the RAM behind the first byte.
    pub phys: u64,
}

impl MapRequest {
    /// Size of the request in guest memory.
    pub const SIZE: usize = core::mem::size_of::<Self>();
    /// Offset of [`MapRequest::status`], where the VMM writes its answer.
    pub const STATUS_OFFSET: u64 = 4;

    /// Decodes a request from the bytes in guest memory.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            window: u32_at(0),
            status: u32_at(4),
            offset: u64_at(8),
            len: u64_at(16),
            phys: u64_at(24),
        }
    }

    /// Encodes the request as it lies in guest memory.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.window.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.phys.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_in_repr_c_order() {
        let r = MapRequest {
            window: 3,
            status: MAP_PENDING,
            offset: 0x1_0000,
            len: 0x20_0000,
            phys: 0x4000_0000,
        };
        let b = r.to_bytes();
        assert_eq!(MapRequest::from_bytes(&b), r);
        // SAFETY: MapRequest is repr(C), plain integers, and `b` is exactly its size.
        let back: MapRequest = unsafe { core::ptr::read_unaligned(b.as_ptr().cast()) };
        assert_eq!(back, r);
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
            MAP_PENDING,
            "status at STATUS_OFFSET"
        );
        assert_eq!(MapRequest::STATUS_OFFSET, 4);
    }
}
