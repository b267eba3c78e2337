//! The virtio-mmio transport (version 2), driver side: queue notification. The VMM sets the
//! device up before the guest starts (`bulwark_abi::layout::VIRTQUEUES`), so the driver never
//! negotiates: each register access would be a VM exit. The register map is the guest ABI's
//! ([`bulwark_abi::virtio::mmio`]), shared with the VMM's transport.

use bulwark_abi::virtio::mmio::reg;

/// Why the driver could not start.
#[derive(Debug)]
pub enum SetupError {
    /// The driver was already set up once (its buffer areas are taken).
    AlreadySetUp,
}

/// A virtio-mmio register window.
pub struct Transport {
    base: u64,
}

impl Transport {
    /// The device at `base` (an address in the MMIO window the VMM placed a device at).
    pub fn new(base: u64) -> Self {
        Self { base }
    }

    /// The address of the register at `offset` (one of `reg`, all within the window).
    fn register(&self, offset: u64) -> *mut u32 {
        (self.base + offset) as *mut u32
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: `base` is the device's register window (from the guest ABI), mapped uncached;
        // a 32-bit write of a register is what the transport defines.
        unsafe { self.register(offset).write_volatile(value) }
    }

    /// Notifies the device that queue `index` has new buffers (one VM exit).
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }
}
