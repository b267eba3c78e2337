//! Virtio devices and their MMIO transport.

pub mod mmio;
pub mod vsock;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

// The register map, status and feature bits are the guest ABI's, shared with the guest's driver.
pub use bulwark_abi::virtio::{VIRTIO_F_VERSION_1, status};

/// A guest error that breaks a device: the VM is stopped with this description.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeviceFault(pub String);

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts the device with the guest's queues, after the driver set DRIVER_OK.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), DeviceFault>;
    /// The guest notified queue `index`.
    fn queue_notify(&mut self, index: u32) -> Result<(), DeviceFault>;
    /// The guest reset the device: forget the queues and every piece of state.
    fn reset(&mut self);
    /// Everything the guest can change in the device (see [`crate::devices::BusDevice::save`]).
    fn save(&self) -> crate::devices::DeviceState;
    /// Puts back what [`VirtioDevice::save`] found, closing whatever the device opened since.
    fn restore(&mut self, state: &crate::devices::DeviceState) -> Result<(), DeviceFault>;
}
