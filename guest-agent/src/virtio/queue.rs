//! A split virtqueue in guest memory (virtio 1.2, 2.7), driver side.
//!
//! The device is the VMM; it reads and writes these rings while the guest is stopped in a VM
//! exit, but the ring memory is still shared with it, so every access to device-visible fields
//! is volatile and ordered with fences.

use bulwark_abi::layout;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A used-ring element: which chain the device finished and how many bytes it wrote.
#[derive(Clone, Copy, Debug)]
pub struct Used {
    /// Head descriptor index of the chain.
    pub id: u16,
    /// Bytes written by the device.
    pub len: u32,
}

/// One split virtqueue of `size` entries.
pub struct Queue {
    size: u16,
    desc: NonNull<Descriptor>,
    avail: NonNull<u16>,
    used: NonNull<u16>,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    /// The queue of `size` entries (a power of two, at most 256) whose rings the VMM set up at
    /// the fixed addresses of virtqueue `index` ([`layout::virtqueue_rings`]): zeroed RAM the
    /// guest uses for nothing else.
    pub fn settled(index: u64, size: u16) -> Self {
        let (desc, avail, used) = layout::virtqueue_rings(index);
        let ptr = |addr: u64| {
            // SAFETY: the addresses lie in the VIRTQUEUES region of guest RAM, which is never
            // zero; its pages are mapped user-writable by the VMM.
            unsafe { NonNull::new_unchecked(addr as *mut u8) }
        };
        Self {
            size,
            desc: ptr(desc).cast(),
            avail: ptr(avail).cast(),
            used: ptr(used).cast(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Sets descriptor `index` to a single buffer `[addr, addr + len)`.
    pub fn set_descriptor(&mut self, index: u16, addr: u64, len: u32, flags: u16) {
        let d = Descriptor {
            addr,
            len,
            flags,
            next: 0,
        };
        let i = usize::from(index % self.size);
        // SAFETY: `i` is below the queue size, so the pointer stays inside the table this queue
        // allocated; the write is volatile because the device reads the table.
        unsafe { self.desc.as_ptr().add(i).write_volatile(d) };
    }

    /// Offers the chain starting at descriptor `head` to the device (not yet published).
    pub fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: the ring entries start at offset 4 bytes (two u16) and `slot` is below the
        // queue size, inside the ring this queue allocated.
        unsafe { self.avail.as_ptr().add(2 + slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed chain visible to the device.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the ring this queue allocated.
        unsafe { self.avail.as_ptr().add(1).write_volatile(self.avail_idx) };
        fence(Ordering::SeqCst);
    }

    /// The next chain the device finished, if any. The device's values are checked: an id
    /// outside the table means the device is broken.
    pub fn pop_used(&mut self) -> Option<Used> {
        // SAFETY: used.idx is the second u16 of the ring this queue allocated.
        let idx = unsafe { self.used.as_ptr().add(1).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used elements (u32 id, u32 len) start 4 bytes in; `slot` is below the queue
        // size, inside the ring this queue allocated.
        let (id, len) = unsafe {
            let elem = self.used.as_ptr().cast::<u32>().add(1 + 2 * slot);
            (elem.read_volatile(), elem.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        let id = u16::try_from(id).ok().filter(|&i| i < self.size)?;
        Some(Used { id, len })
    }
}
