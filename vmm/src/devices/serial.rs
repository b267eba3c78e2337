//! The serial console: a 16550 UART from vm-superio at COM1, writing to the `--console` sink.
//!
//! The guest has no interrupts, so the UART's interrupt line goes nowhere. Output is capped: a
//! guest that floods its console stops being recorded once the cap is reached.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::{Serial as Uart, Trigger};

use super::{BadAccess, BusDevice, DeviceRequest, DeviceState, RestoreError};

/// Console bytes recorded at most by default.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 16 << 20;

/// An interrupt line connected to nothing.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A line-buffered sink that stops writing after `limit` bytes and notes it once.
pub struct CappedSink {
    out: io::LineWriter<Box<dyn Write + Send>>,
    written: u64,
    limit: u64,
}

impl CappedSink {
    /// Wraps `out`, keeping at most `limit` bytes.
    pub fn new(out: Box<dyn Write + Send>, limit: u64) -> Self {
        Self {
            out: io::LineWriter::new(out),
            written: 0,
            limit,
        }
    }
}

impl Write for CappedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        if room == 0 {
            return Ok(buf.len());
        }
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.out.write_all(&buf[..take])?;
        self.written += take as u64;
        if self.written >= self.limit {
            writeln!(
                self.out,
                "\n[bulwark-vmm: console output capped at {} bytes]",
                self.limit
            )?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A console sink shared by the UART and the control port's console records.
#[derive(Clone)]
pub struct SharedSink(Arc<Mutex<CappedSink>>);

impl SharedSink {
    /// Shares `sink`.
    pub fn new(sink: CappedSink) -> Self {
        Self(Arc::new(Mutex::new(sink)))
    }
}

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// The COM1 UART.
pub struct Serial {
    uart: Uart<NoInterrupt, vm_superio::serial::NoEvents, SharedSink>,
}

impl Serial {
    /// A UART writing to `sink`.
    pub fn new(sink: SharedSink) -> Self {
        Self {
            uart: Uart::new(NoInterrupt, sink),
        }
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

impl BusDevice for Serial {
    fn name(&self) -> &'static str {
        "serial port"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) -> Result<DeviceRequest, BadAccess> {
        match (u8::try_from(offset), data) {
            (Ok(o), [b]) => {
                *b = self.uart.read(o);
                Ok(DeviceRequest::None)
            }
            (_, data) => Err(BadAccess {
                device: "serial port",
                what: "read",
                offset,
                len: data.len(),
            }),
        }
    }

    /// Byte writes only; `rep outsb` arrives here one byte at a time.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<DeviceRequest, BadAccess> {
        let bad = BadAccess {
            device: "serial port",
            what: "write",
            offset,
            len: data.len(),
        };
        let Ok(o) = u8::try_from(offset) else {
            return Err(bad);
        };
        if data.len() != 1 {
            return Err(bad);
        }
        // A failing console sink (closed pipe, full disk) must not kill the guest: the bytes
        // are dropped.
        let _ = self.uart.write(o, data[0]);
        Ok(DeviceRequest::None)
    }

    fn save(&self) -> DeviceState {
        Box::new(self.uart.state())
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        let fail = |why: String| RestoreError {
            device: "serial port",
            why,
        };
        let state = state
            .downcast_ref::<vm_superio::serial::SerialState>()
            .ok_or_else(|| fail("not a serial port's state".into()))?;
        // Output written so far stays written: the console is the host's record.
        let _ = self.flush();
        let sink = self.uart.writer_mut().clone();
        self.uart = Uart::from_state(state, NoInterrupt, vm_superio::serial::NoEvents, sink)
            .map_err(|e| fail(format!("{e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_console() {
        let out = Shared::default();
        let mut s = Serial::new(SharedSink::new(CappedSink::new(
            Box::new(out.clone()),
            1024,
        )));
        for b in b"hi\n" {
            s.write(0, &[*b]).unwrap();
        }
        s.flush().unwrap();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr).unwrap();
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert!(s.write(0, &[1, 2]).is_err());
    }

    #[test]
    fn a_restored_uart_has_the_saved_registers() {
        let out = Shared::default();
        let mut s = Serial::new(SharedSink::new(CappedSink::new(
            Box::new(out.clone()),
            1024,
        )));
        s.write(7, &[0x5a]).unwrap(); // scratch register
        let saved = s.save();
        s.write(7, &[0x11]).unwrap();
        s.restore(&saved).unwrap();
        let mut scratch = [0u8];
        s.read(7, &mut scratch).unwrap();
        assert_eq!(scratch[0], 0x5a);
        s.write(0, b"x").unwrap();
        s.flush().unwrap();
        assert_eq!(
            out.0.lock().unwrap().as_slice(),
            b"x",
            "same console after restore"
        );
        assert!(s.restore(&(Box::new(1u8) as DeviceState)).is_err());
    }

    #[test]
    fn console_output_is_capped() {
        let out = Shared::default();
        let mut sink = CappedSink::new(Box::new(out.clone()), 4);
        sink.write_all(b"abcdefgh").unwrap();
        sink.write_all(b"more").unwrap();
        sink.flush().unwrap();
        let got = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            got.starts_with("abcd\n[bulwark-vmm: console output capped at 4 bytes]"),
            "{got}"
        );
        assert!(!got.contains("more"));
    }
}
