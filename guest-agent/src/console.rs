//! Serial console output on COM1.
//!
//! Each `out` instruction is a VM exit (tens of microseconds under kvm_pvm), so text goes out
//! with `rep outsb`: one exit for a whole line.

use core::fmt::{self, Write};

use bulwark_proto::ports;

/// Most bytes one `rep outsb` sends (KVM hands the VMM at most a page per exit).
const CHUNK: usize = 4096;

/// Writes raw bytes to the serial port.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(CHUNK) {
        // SAFETY: `rep outsb` reads `chunk.len()` bytes from `chunk` (a live slice) and writes
        // them to COM1, which the TSS I/O bitmap grants; the direction flag is clear as the ABI
        // requires, and nothing else is touched.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                in("dx") ports::SERIAL_COM1,
                inout("rsi") chunk.as_ptr() => _,
                inout("rcx") chunk.len() => _,
                options(nostack, readonly),
            );
        }
    }
}

/// Writes a string to the serial port.
pub fn print(s: &str) {
    write_bytes(s.as_bytes());
}

/// A formatter that collects a line in a fixed buffer and sends it in one `rep outsb`.
pub struct LineWriter {
    buf: [u8; 512],
    len: usize,
}

impl LineWriter {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
        }
    }

    /// Sends what was collected.
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints formatted text and a newline to the serial console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::console::LineWriter::new();
        let _ = writeln!(line, $($arg)*);
        line.flush();
    }};
}
