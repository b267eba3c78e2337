//! The virtio-mmio transport (version 2), driver side: register access and device setup.

use super::queue::Queue;

/// Register offsets.
mod reg {
    pub const MAGIC_VALUE: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
    pub const CONFIG: usize = 0x100;
}

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// VIRTIO_F_VERSION_1.
const F_VERSION_1: u64 = 1 << 32;

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
    base: usize,
}

impl Transport {
    /// The device at `base` (an address in the MMIO window the VMM placed a device at).
    pub fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` is the device's register window (from the guest ABI), mapped uncached;
        // a 32-bit read of a register is what the transport defines.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`, for a register write.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Reads a little-endian u64 from the device configuration space.
    pub fn config_u64(&self, offset: usize) -> u64 {
        u64::from(self.read(reg::CONFIG + offset))
            | (u64::from(self.read(reg::CONFIG + offset + 4)) << 32)
    }

    /// Notifies the device that queue `index` has new buffers (one VM exit).
    pub fn notify(&self, index: u32) {
        self.write(reg::QUEUE_NOTIFY, index);
    }

    /// Resets the device, negotiates `wanted` features (plus VERSION_1), and hands it `queues`.
    pub fn setup(&self, device_id: u32, wanted: u64, queues: &[&Queue]) -> Result<(), SetupError> {
        if self.read(reg::MAGIC_VALUE) != 0x7472_6976
            || self.read(reg::VERSION) != 2
            || self.read(reg::DEVICE_ID) != device_id
        {
            return Err(SetupError::NotFound);
        }
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE);
        self.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let offered = low | (u64::from(self.read(reg::DEVICE_FEATURES)) << 32);
        let features = offered & (wanted | F_VERSION_1);
        if features & F_VERSION_1 == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(reg::STATUS, status);
        if self.read(reg::STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        for (index, queue) in queues.iter().enumerate() {
            self.write(reg::QUEUE_SEL, index as u32);
            let max = self.read(reg::QUEUE_NUM_MAX);
            if max < u32::from(queue.size()) {
                return Err(SetupError::QueueTooSmall(max));
            }
            self.write(reg::QUEUE_NUM, u32::from(queue.size()));
            let (desc, avail, used) = queue.addresses();
            self.write(reg::QUEUE_DESC_LOW, desc as u32);
            self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(reg::QUEUE_DRIVER_LOW, avail as u32);
            self.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
            self.write(reg::QUEUE_DEVICE_LOW, used as u32);
            self.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, status | STATUS_DRIVER_OK);
        Ok(())
    }
}
