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

/// A device on a [`bus::Bus`].
pub trait BusDevice: Send {
    /// Name used in error reports.
    fn name(&self) -> &'static str;
    /// The guest reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess>;
    /// The guest writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess>;
}
