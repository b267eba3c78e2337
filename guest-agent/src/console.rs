//! Console output, through the control port's console records.
//!
//! The UART costs one VM exit per byte under kvm_pvm (KVM splits `rep outsb` into single-byte
//! exits there), tens of microseconds each. A console record costs one exit for up to 4 KiB:
//! the text goes into a record in guest memory and its address is written to
//! `ports::CONTROL_CONSOLE`; the VMM copies it to the same sink as the UART.

use core::cell::UnsafeCell;
use core::fmt::{self, Write};

use bulwark_abi::ports;

const CAPACITY: usize = ports::MAX_CONSOLE_RECORD as usize;

/// The record the VMM reads: length, then text.
#[repr(C, align(8))]
struct Record {
    len: u32,
    text: [u8; CAPACITY],
}

/// The one console record. The guest has a single thread and nothing re-enters `write_bytes`.
struct RecordCell(UnsafeCell<Record>);

// SAFETY: the guest runs one thread without interrupts, so the cell is never shared across
// threads; `write_bytes` does not re-enter.
unsafe impl Sync for RecordCell {}

static RECORD: RecordCell = RecordCell(UnsafeCell::new(Record {
    len: 0,
    text: [0; CAPACITY],
}));

/// Writes raw bytes to the console, one VM exit per 4 KiB.
pub fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(CAPACITY) {
        // A chunk is at most CAPACITY bytes.
        let chunk_len = u32::try_from(chunk.len()).unwrap_or(ports::MAX_CONSOLE_RECORD);
        let record = RECORD.0.get();
        // SAFETY: single thread, no re-entry (see `RecordCell`): nothing else accesses the
        // record now; `chunk` fits the text array.
        unsafe {
            let record = &mut *record;
            record.text[..chunk.len()].copy_from_slice(chunk);
            record.len = chunk_len;
        }
        // The image lives below 4 GiB (the VMM loads it inside the layout's image region), so
        // the address fits the 32-bit port value.
        let Ok(addr) = u32::try_from(record as usize) else {
            crate::control::exit(bulwark_abi::ports::exit_status::PANIC);
        };
        // SAFETY: `out` to the console port, granted by the TSS I/O bitmap; the VMM only reads
        // the record, which the compiler sees as read by the asm (no `nomem`).
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") ports::CONTROL_CONSOLE, in("eax") addr, options(nostack, preserves_flags));
        }
    }
}

/// Writes a string to the console.
pub fn print(s: &str) {
    write_bytes(s.as_bytes());
}

/// A formatter that collects a line in a fixed buffer and sends it in one record.
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

/// Prints formatted text and a newline to the console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::console::LineWriter::new();
        let _ = writeln!(line, $($arg)*);
        line.flush();
    }};
}
