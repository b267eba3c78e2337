//! The control port block: the guest's exit status, the exception stub's report, and the wait
//! register the guest sleeps on.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bulwark_proto::ports;

use super::virtio::mmio::lock;
use super::virtio::vsock::VsockDevice;
use super::{BadAccess, BusDevice, DeviceRequest};

const EXIT: u64 = (ports::CONTROL_EXIT - ports::CONTROL_BASE) as u64;
const EXCEPTION: u64 = (ports::CONTROL_EXCEPTION - ports::CONTROL_BASE) as u64;
const WAIT: u64 = (ports::CONTROL_WAIT - ports::CONTROL_BASE) as u64;

/// The control device at [`ports::CONTROL_BASE`].
#[derive(Default)]
pub struct Control {
    vsock: Option<Arc<Mutex<VsockDevice>>>,
    stop: Arc<AtomicBool>,
}

impl Control {
    /// A control block whose wait register sleeps on `vsock` (if the VM has one) until it has
    /// something for the guest or `stop` is set.
    pub fn new(vsock: Option<Arc<Mutex<VsockDevice>>>, stop: Arc<AtomicBool>) -> Self {
        Self { vsock, stop }
    }
}

impl BusDevice for Control {
    fn name(&self) -> &'static str {
        "control port"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess> {
        if offset != WAIT || data.len() != 4 {
            return Err(BadAccess {
                device: "control port",
                what: "read",
                offset,
                len: data.len(),
            });
        }
        let bits = match &self.vsock {
            Some(vsock) => match lock(vsock).wait(&self.stop) {
                Ok(bits) => bits,
                Err(fault) => return Ok(DeviceRequest::DeviceBroken(format!("vsock: {fault}"))),
            },
            None => 0,
        };
        data.copy_from_slice(&bits.to_le_bytes());
        Ok(DeviceRequest::None)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess> {
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        match (offset, value) {
            (EXIT, Ok(status)) => Ok(DeviceRequest::Exit(status)),
            (EXCEPTION, Ok(vector)) => Ok(DeviceRequest::ExceptionReported(vector)),
            _ => Err(BadAccess {
                device: self.name(),
                what: "write",
                offset,
                len: data.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exit_and_exception_writes() {
        let mut c = Control::default();
        assert_eq!(c.write(0, &7u32.to_le_bytes()), Ok(DeviceRequest::Exit(7)));
        assert_eq!(
            c.write(4, &14u32.to_le_bytes()),
            Ok(DeviceRequest::ExceptionReported(14))
        );
        assert!(c.write(0, &[1]).is_err(), "byte-sized exit");
        assert!(c.write(2, &0u32.to_le_bytes()).is_err(), "unknown offset");
        assert!(c.read(0, &mut [0; 4]).is_err());
    }

    #[test]
    fn wait_without_vsock_returns_at_once() {
        let mut c = Control::default();
        let mut v = [0xffu8; 4];
        assert_eq!(c.read(WAIT, &mut v), Ok(DeviceRequest::None));
        assert_eq!(v, [0; 4]);
        assert!(c.read(WAIT, &mut [0; 2]).is_err());
    }
}
