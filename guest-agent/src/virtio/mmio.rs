//! The virtio-mmio transport (version 2), driver side: register access and device setup. The
//! register map is the guest ABI's ([`bulwark_abi::virtio::mmio`]), shared with the VMM's
//! transport.

use bulwark_abi::virtio::mmio::{MAGIC_VALUE, VERSION, reg};
use bulwark_abi::virtio::{VIRTIO_F_VERSION_1, status};

use super::queue::Queue;

/// Why a device could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// No virtio-mmio device of the expected type at that address.
    NotFound,
    /// The device refused the features.
    FeaturesRefused,
    /// A queue is smaller than the driver needs (its maximum size is given).
    QueueTooSmall(#[allow(dead_code, reason = "shown by Debug in the console")] u32),
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

    fn read(&self, offset: u64) -> u32 {
        // SAFETY: `base` is the device's register window (from the guest ABI), mapped uncached;
        // a 32-bit read of a register is what the transport defines.
        unsafe { self.register(offset).read_volatile() }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as in `read`, for a register write.
        unsafe { self.register(offset).write_volatile(value) }
    }

    /// Reads a little-endian u64 from the device configuration space.
    pub fn config_u64(&self, offset: u64) -> u64 {
        u64::from(self.read(reg::CONFIG + offset))
            | (u64::from(self.read(reg::CONFIG + offset + 4)) << 32)
    }

    /// Notifies the device that queue `index` has new buffers (one VM exit).
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }

    /// Resets the device, negotiates `wanted` features (plus VERSION_1), and hands it `queues`.
    pub fn setup(&self, device_id: u32, wanted: u64, queues: &[&Queue]) -> Result<(), SetupError> {
        if self.read(reg::MAGIC_VALUE) != MAGIC_VALUE
            || self.read(reg::VERSION) != VERSION
            || self.read(reg::DEVICE_ID) != device_id
        {
            return Err(SetupError::NotFound);
        }
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let offered = low | (u64::from(self.read(reg::DEVICE_FEATURES)) << 32);
        let features = offered & (wanted | VIRTIO_F_VERSION_1);
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        let (features_low, features_high) = halves(features);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features_low);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, features_high);
        let accepted = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, accepted);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        for (index, queue) in (0u32..).zip(queues) {
            self.write(reg::QUEUE_SEL, index);
            let max = self.read(reg::QUEUE_NUM_MAX);
            if max < u32::from(queue.size()) {
                return Err(SetupError::QueueTooSmall(max));
            }
            self.write(reg::QUEUE_NUM, u32::from(queue.size()));
            let (desc, avail, used) = queue.addresses();
            for (low_reg, high_reg, address) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
            ] {
                let (low, high) = halves(address);
                self.write(low_reg, low);
                self.write(high_reg, high);
            }
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, accepted | status::DRIVER_OK);
        Ok(())
    }
}

/// The low and high 32 bits of `value`, as a pair of 32-bit virtio-mmio registers takes it.
fn halves(value: u64) -> (u32, u32) {
    let [b0, b1, b2, b3, b4, b5, b6, b7] = value.to_le_bytes();
    (
        u32::from_le_bytes([b0, b1, b2, b3]),
        u32::from_le_bytes([b4, b5, b6, b7]),
    )
}
