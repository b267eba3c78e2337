//! Devices the guest reaches through port I/O or MMIO, and the bus that routes accesses to them.

pub mod bus;
pub mod control;
pub mod serial;
pub mod virtio;

/// What a device asks of the VM after a guest access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Nothing: the guest continues.
    None,
    /// The guest asked to exit with this status.
    Exit(u32),
    /// The exception stub reported this vector; its frame is on the stub's stack.
    ExceptionReported(u32),
    /// The guest broke a device (malformed queue, protocol violation); the VM must stop.
    DeviceBroken(String),
    /// The guest asked for exceptions to be delivered to this CPL3 address.
    TrapEntry(u64),
    /// The guest's trap entry did not handle the exception it was given: the VM must stop
    /// with that exception.
    TrapUnhandled,
    /// The guest read the wait register and it returned: the guest is between two steps of
    /// its own, the place a snapshot is taken ([`crate::reset`]).
    Waited,
}

/// A guest access a device refuses (wrong size or offset): fatal for the VM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {what} of {len} bytes at offset {offset:#x} is not a valid access")]
pub struct BadAccess {
    /// Name of the device.
    pub device: &'static str,
    /// "read" or "write".
    pub what: &'static str,
    /// Offset inside the device's range.
    pub offset: u64,
    /// Access size in bytes.
    pub len: usize,
}

/// A device's state as [`BusDevice::save`] took it, for [`BusDevice::restore`] only (VM
/// reset, [`crate::reset`]).
pub type DeviceState = Box<dyn std::any::Any + Send>;

/// A device state that does not fit the device it is given back to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device}: cannot restore its state: {why}")]
pub struct RestoreError {
    /// Name of the device.
    pub device: &'static str,
    /// What was wrong.
    pub why: String,
}

/// A device on a [`bus::Bus`].
pub trait BusDevice: Send {
    /// Name used in error reports.
    fn name(&self) -> &'static str;
    /// The guest reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess>;
    /// The guest writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess>;
    /// Everything the guest can change in the device, for a later [`BusDevice::restore`].
    fn save(&self) -> DeviceState;
    /// Puts the device back as [`BusDevice::save`] found it, dropping whatever it holds since
    /// (vsock connections, pending output to the guest).
    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError>;
}
