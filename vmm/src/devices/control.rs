//! The control port block: the guest's exit status and the exception stub's report.

use bulwark_proto::ports;

use super::{BadAccess, BusDevice, DeviceRequest};

/// The control device at [`ports::CONTROL_BASE`].
#[derive(Debug, Default)]
pub struct Control;

impl BusDevice for Control {
    fn name(&self) -> &'static str {
        "control port"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), BadAccess> {
        Err(BadAccess {
            device: self.name(),
            what: "read",
            offset,
            len: data.len(),
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess> {
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        let exit_offset = u64::from(ports::CONTROL_EXIT - ports::CONTROL_BASE);
        let exception_offset = u64::from(ports::CONTROL_EXCEPTION - ports::CONTROL_BASE);
        match (offset, value) {
            (o, Ok(status)) if o == exit_offset => Ok(DeviceRequest::Exit(status)),
            (o, Ok(vector)) if o == exception_offset => {
                Ok(DeviceRequest::ExceptionReported(vector))
            }
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
        let mut c = Control;
        assert_eq!(c.write(0, &7u32.to_le_bytes()), Ok(DeviceRequest::Exit(7)));
        assert_eq!(
            c.write(4, &14u32.to_le_bytes()),
            Ok(DeviceRequest::ExceptionReported(14))
        );
        assert!(c.write(0, &[1]).is_err(), "byte-sized exit");
        assert!(c.write(2, &0u32.to_le_bytes()).is_err(), "unknown offset");
        assert!(c.read(0, &mut [0; 4]).is_err());
    }
}
