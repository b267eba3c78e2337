//! The control port block: the guest's exit status, the exception stub's report, the wait
//! register the guest sleeps on, and the linear-memory windows' map requests and trap entry.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use std::io::Write;

use bulwark_abi::ports;
use vm_memory::{Bytes, GuestAddress};

use super::serial::SharedSink;
use super::virtio::mmio::lock;
use super::virtio::vsock::VsockDevice;
use super::{BadAccess, BusDevice, DeviceRequest, DeviceState, RestoreError};
use crate::cpu::windows::Windows;
use crate::memory::GuestMemory;

const EXIT: u64 = (ports::CONTROL_EXIT - ports::CONTROL_BASE) as u64;
const EXCEPTION: u64 = (ports::CONTROL_EXCEPTION - ports::CONTROL_BASE) as u64;
const WAIT: u64 = (ports::CONTROL_WAIT - ports::CONTROL_BASE) as u64;
const CONSOLE: u64 = (ports::CONTROL_CONSOLE - ports::CONTROL_BASE) as u64;
const WAIT_LIMIT: u64 = (ports::CONTROL_WAIT_LIMIT - ports::CONTROL_BASE) as u64;
const TRAP_ENTRY: u64 = (ports::CONTROL_TRAP_ENTRY - ports::CONTROL_BASE) as u64;
const TRAP_UNHANDLED: u64 = (ports::CONTROL_TRAP_UNHANDLED - ports::CONTROL_BASE) as u64;
const MAP_WINDOW: u64 = (ports::CONTROL_MAP_WINDOW - ports::CONTROL_BASE) as u64;

/// The control device at [`ports::CONTROL_BASE`].
pub struct Control {
    vsock: Option<Arc<Mutex<VsockDevice>>>,
    stop: Arc<AtomicBool>,
    /// Set when the VMM needs the vCPU between two guest instructions (a snapshot or reset,
    /// [`crate::reset`]): a wait in progress returns at once.
    attention: Arc<AtomicBool>,
    mem: GuestMemory,
    console: SharedSink,
    /// Bound of the next wait, in microseconds (0: none).
    wait_limit_us: u32,
    /// The linear-memory windows' page tables.
    windows: Windows,
}

impl Control {
    /// A control block whose wait register sleeps on `vsock` (if the VM has one) until it has
    /// something for the guest or `stop` or `attention` is set, whose console records go to
    /// `console`, and whose map requests go to `windows`.
    pub fn new(
        vsock: Option<Arc<Mutex<VsockDevice>>>,
        stop: Arc<AtomicBool>,
        attention: Arc<AtomicBool>,
        mem: GuestMemory,
        console: SharedSink,
        windows: Windows,
    ) -> Self {
        Self {
            vsock,
            stop,
            attention,
            mem,
            console,
            wait_limit_us: 0,
            windows,
        }
    }

    /// Prints the console record at guest address `addr`. The record is guest data: its length
    /// is capped and every byte is read through bounds-checked guest memory.
    fn console_record(&mut self, addr: u32) -> DeviceRequest {
        let addr = GuestAddress(u64::from(addr));
        let Ok(len) = self.mem.read_obj::<u32>(addr) else {
            return DeviceRequest::DeviceBroken(format!(
                "console record at {:#x} is outside RAM",
                addr.0
            ));
        };
        if len > ports::MAX_CONSOLE_RECORD {
            return DeviceRequest::DeviceBroken(format!(
                "console record of {len} bytes is over the {}-byte limit",
                ports::MAX_CONSOLE_RECORD
            ));
        }
        let mut text = vec![0u8; len as usize];
        if self
            .mem
            .read_slice(&mut text, GuestAddress(addr.0 + 4))
            .is_err()
        {
            return DeviceRequest::DeviceBroken(format!(
                "console record at {:#x} runs past RAM",
                addr.0
            ));
        }
        // A failing console sink must not stop the guest: the text is dropped.
        let _ = self.console.write_all(&text);
        DeviceRequest::None
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
        let limit = std::mem::take(&mut self.wait_limit_us);
        let limit = (limit > 0).then(|| std::time::Duration::from_micros(u64::from(limit)));
        let bits = match &self.vsock {
            Some(vsock) => match lock(vsock).wait(&self.stop, &self.attention, limit) {
                Ok(bits) => bits,
                Err(fault) => return Ok(DeviceRequest::DeviceBroken(format!("vsock: {fault}"))),
            },
            None if limit.is_some() => ports::wait_result::TIMED_OUT,
            None => 0,
        };
        data.copy_from_slice(&bits.to_le_bytes());
        Ok(DeviceRequest::Waited)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess> {
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        match (offset, value) {
            (EXIT, Ok(status)) => Ok(DeviceRequest::Exit(status)),
            (EXCEPTION, Ok(vector)) => Ok(DeviceRequest::ExceptionReported(vector)),
            (CONSOLE, Ok(addr)) => Ok(self.console_record(addr)),
            (WAIT_LIMIT, Ok(us)) => {
                self.wait_limit_us = us;
                Ok(DeviceRequest::None)
            }
            (TRAP_ENTRY, Ok(addr)) => Ok(DeviceRequest::TrapEntry(u64::from(addr))),
            (TRAP_UNHANDLED, Ok(_)) => Ok(DeviceRequest::TrapUnhandled),
            (MAP_WINDOW, Ok(addr)) => Ok(match self.windows.serve(u64::from(addr)) {
                Ok(()) => DeviceRequest::None,
                Err(e) => DeviceRequest::DeviceBroken(format!("map request: {e}")),
            }),
            _ => Err(BadAccess {
                device: self.name(),
                what: "write",
                offset,
                len: data.len(),
            }),
        }
    }

    fn save(&self) -> DeviceState {
        Box::new((self.wait_limit_us, self.windows.save()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        let (limit, windows) = state
            .downcast_ref::<(u32, crate::cpu::windows::WindowsState)>()
            .ok_or_else(|| RestoreError {
                device: "control port",
                why: "not a control port's state".into(),
            })?;
        self.wait_limit_us = *limit;
        self.windows.restore(windows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::CappedSink;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn control() -> (Control, Captured) {
        let out = Captured::default();
        let sink = SharedSink::new(CappedSink::new(Box::new(out.clone()), 1 << 20));
        let mem = crate::memory::create(4).unwrap();
        let windows = Windows::new(mem.clone(), 4 << 20, 4 << 20);
        (
            Control::new(None, Arc::default(), Arc::default(), mem, sink, windows),
            out,
        )
    }

    #[test]
    fn console_records_are_read_from_guest_memory_with_bounds() {
        let (mut c, out) = control();
        c.mem.write_obj(5u32, GuestAddress(0x1000)).unwrap();
        c.mem.write_slice(b"hello", GuestAddress(0x1004)).unwrap();
        assert_eq!(
            c.write(CONSOLE, &0x1000u32.to_le_bytes()),
            Ok(DeviceRequest::None)
        );
        c.console.flush().unwrap();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello");
        c.mem
            .write_obj(ports::MAX_CONSOLE_RECORD + 1, GuestAddress(0x2000))
            .unwrap();
        let too_long = c.write(CONSOLE, &0x2000u32.to_le_bytes()).unwrap();
        assert!(matches!(too_long, DeviceRequest::DeviceBroken(m) if m.contains("limit")));
        let end = (4u32 << 20) - 4;
        c.mem
            .write_obj(100u32, GuestAddress(u64::from(end)))
            .unwrap();
        let past = c.write(CONSOLE, &end.to_le_bytes()).unwrap();
        assert!(matches!(past, DeviceRequest::DeviceBroken(m) if m.contains("past RAM")));
        let outside = c.write(CONSOLE, &u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(outside, DeviceRequest::DeviceBroken(m) if m.contains("outside RAM")));
    }

    #[test]
    fn decodes_exit_and_exception_writes() {
        let (mut c, _) = control();
        assert_eq!(c.write(0, &7u32.to_le_bytes()), Ok(DeviceRequest::Exit(7)));
        assert_eq!(
            c.write(4, &14u32.to_le_bytes()),
            Ok(DeviceRequest::ExceptionReported(14))
        );
        assert_eq!(
            c.write(TRAP_ENTRY, &0x60_0000u32.to_le_bytes()),
            Ok(DeviceRequest::TrapEntry(0x60_0000))
        );
        assert_eq!(
            c.write(TRAP_UNHANDLED, &0u32.to_le_bytes()),
            Ok(DeviceRequest::TrapUnhandled)
        );
        // A map request outside RAM ends the VM, never the VMM.
        let bad = c.write(MAP_WINDOW, &u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(bad, DeviceRequest::DeviceBroken(m) if m.contains("outside guest RAM")));
        assert!(c.write(0, &[1]).is_err(), "byte-sized exit");
        assert!(c.write(2, &0u32.to_le_bytes()).is_err(), "unknown offset");
        assert!(c.read(0, &mut [0; 4]).is_err());
    }

    #[test]
    fn wait_without_vsock_returns_at_once() {
        let (mut c, _) = control();
        let mut v = [0xffu8; 4];
        assert_eq!(c.read(WAIT, &mut v), Ok(DeviceRequest::Waited));
        assert_eq!(v, [0; 4]);
        assert!(c.read(WAIT, &mut [0; 2]).is_err());
        // A bound applies to the next wait only.
        assert_eq!(
            c.write(WAIT_LIMIT, &500u32.to_le_bytes()),
            Ok(DeviceRequest::None)
        );
        assert_eq!(c.read(WAIT, &mut v), Ok(DeviceRequest::Waited));
        assert_eq!(u32::from_le_bytes(v), ports::wait_result::TIMED_OUT);
        assert_eq!(c.read(WAIT, &mut v), Ok(DeviceRequest::Waited));
        assert_eq!(v, [0; 4]);
        assert!(c.write(WAIT_LIMIT, &[0; 2]).is_err());
    }

    #[test]
    fn restore_puts_back_the_wait_bound() {
        let (mut c, _) = control();
        let saved = c.save();
        c.write(WAIT_LIMIT, &500u32.to_le_bytes()).unwrap();
        c.restore(&saved).unwrap();
        let mut v = [0xffu8; 4];
        c.read(WAIT, &mut v).unwrap();
        assert_eq!(v, [0; 4], "the bound set after the save is gone");
        assert!(c.restore(&(Box::new(()) as DeviceState)).is_err());
    }
}
