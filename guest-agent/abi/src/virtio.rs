//! The virtio devices the VMM gives the guest: the virtio-mmio transport's register map
//! (version 2, "modern": virtio 1.2, 4.2.2), the device status and feature bits, and the vsock
//! device's identity, queues and configuration space. The VMM's transport and device and the
//! guest's driver both use these values; neither side writes them out again.
//!
//! Where each device's register window lies is in [`crate::layout`]
//! ([`VIRTIO_VSOCK_MMIO`](crate::layout::VIRTIO_VSOCK_MMIO),
//! [`VIRTIO_MMIO_SIZE`](crate::layout::VIRTIO_MMIO_SIZE)).

/// The virtio-mmio transport: identification values and register offsets within a device's
/// register window. Every register is 32 bits wide and accessed whole, except the
/// device-specific configuration space from [`reg::CONFIG`](mmio::reg::CONFIG) on.
pub mod mmio {
    /// Value of [`reg::MAGIC_VALUE`]: `"virt"` little-endian.
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
    /// Value of [`reg::VERSION`]: the modern (version 2) register layout.
    pub const VERSION: u32 = 2;
    /// Value of [`reg::VENDOR_ID`] for Bulwark's devices: `"BUWL"`.
    pub const VENDOR_ID: u32 = 0x4c57_5542;

    /// Register offsets from the start of the window.
    pub mod reg {
        /// Read: [`MAGIC_VALUE`](super::MAGIC_VALUE).
        pub const MAGIC_VALUE: u64 = 0x000;
        /// Read: [`VERSION`](super::VERSION).
        pub const VERSION: u64 = 0x004;
        /// Read: the virtio device ID (0 for none).
        pub const DEVICE_ID: u64 = 0x008;
        /// Read: [`VENDOR_ID`](super::VENDOR_ID).
        pub const VENDOR_ID: u64 = 0x00c;
        /// Read: 32 bits of the device's features, selected by [`DEVICE_FEATURES_SEL`].
        pub const DEVICE_FEATURES: u64 = 0x010;
        /// Write: which 32 bits [`DEVICE_FEATURES`] shows (0: bits 0..32, 1: bits 32..64).
        pub const DEVICE_FEATURES_SEL: u64 = 0x014;
        /// Write: 32 bits of the features the driver accepts, selected by
        /// [`DRIVER_FEATURES_SEL`].
        pub const DRIVER_FEATURES: u64 = 0x020;
        /// Write: which 32 bits [`DRIVER_FEATURES`] sets.
        pub const DRIVER_FEATURES_SEL: u64 = 0x024;
        /// Write: the queue the `QUEUE_*` registers below refer to.
        pub const QUEUE_SEL: u64 = 0x030;
        /// Read: the selected queue's largest size (0: no such queue).
        pub const QUEUE_NUM_MAX: u64 = 0x034;
        /// Write: the selected queue's size.
        pub const QUEUE_NUM: u64 = 0x038;
        /// Read/write: the selected queue is ready (1) or not (0).
        pub const QUEUE_READY: u64 = 0x044;
        /// Write: the index of a queue that has new buffers.
        pub const QUEUE_NOTIFY: u64 = 0x050;
        /// Read: pending interrupt causes (always 0: the guest has no interrupts).
        pub const INTERRUPT_STATUS: u64 = 0x060;
        /// Write: interrupt causes handled.
        pub const INTERRUPT_ACK: u64 = 0x064;
        /// Read/write: the device status, a set of [`status`](crate::virtio::status) bits;
        /// writing 0 resets the device.
        pub const STATUS: u64 = 0x070;
        /// Write: low 32 bits of the selected queue's descriptor table address.
        pub const QUEUE_DESC_LOW: u64 = 0x080;
        /// Write: high 32 bits of the selected queue's descriptor table address.
        pub const QUEUE_DESC_HIGH: u64 = 0x084;
        /// Write: low 32 bits of the selected queue's available (driver) ring address.
        pub const QUEUE_DRIVER_LOW: u64 = 0x090;
        /// Write: high 32 bits of the selected queue's available (driver) ring address.
        pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
        /// Write: low 32 bits of the selected queue's used (device) ring address.
        pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
        /// Write: high 32 bits of the selected queue's used (device) ring address.
        pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
        /// Read: the configuration space's generation (always 0: it never changes).
        pub const CONFIG_GENERATION: u64 = 0x0fc;
        /// Start of the device-specific configuration space.
        pub const CONFIG: u64 = 0x100;
    }
}

/// Device status bits (virtio 1.2, 2.1), in [`mmio::reg::STATUS`].
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1 (feature bit 32): the device is a modern (virtio 1.x) device. Every device
/// offers it and a driver must accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The virtio-vsock device (virtio 1.2, 5.10) at
/// [`VIRTIO_VSOCK_MMIO`](crate::layout::VIRTIO_VSOCK_MMIO). Its packets are
/// [`crate::vsock`].
pub mod vsock {
    /// Virtio device ID of vsock.
    pub const DEVICE_ID: u32 = 19;
    /// VIRTIO_VSOCK_F_STREAM: stream sockets, the only kind carried.
    pub const F_STREAM: u64 = 1;
    /// Index of the receive queue (device to guest).
    pub const RX_QUEUE: u32 = 0;
    /// Index of the transmit queue (guest to device).
    pub const TX_QUEUE: u32 = 1;
    /// Index of the event queue.
    pub const EVENT_QUEUE: u32 = 2;
    /// Number of queues.
    pub const QUEUE_COUNT: usize = 3;
    /// Largest size of each queue the device offers ([`QUEUE_NUM_MAX`]); a driver may use
    /// smaller queues.
    ///
    /// [`QUEUE_NUM_MAX`]: crate::virtio::mmio::reg::QUEUE_NUM_MAX
    pub const QUEUE_MAX_SIZE: u16 = 256;
    /// Offset in the configuration space of the guest's CID (a little-endian u64).
    pub const CONFIG_GUEST_CID: u64 = 0;
    /// Size of each queue as the VMM sets the device up before the guest starts (see
    /// [`crate::layout::VIRTQUEUES`]).
    pub const QUEUE_SIZE: u16 = 64;
    const _: () = assert!(QUEUE_SIZE <= QUEUE_MAX_SIZE && QUEUE_SIZE.is_power_of_two());
}
