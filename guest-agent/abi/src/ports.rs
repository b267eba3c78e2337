//! I/O ports the guest uses at CPL3. The TSS's I/O permission bitmap grants exactly these
//! ranges ([`GUEST_PORTS`]); any other `in`/`out` raises #GP.

/// First port of the 16550 UART used as the guest's serial console (COM1).
pub const SERIAL_COM1: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_PORT_COUNT: u16 = 8;

/// First port of the control block.
pub const CONTROL_BASE: u16 = 0x600;
/// `out` a 32-bit status here to end the VM; the VMM exits with it (see [`exit_status`]).
pub const CONTROL_EXIT: u16 = CONTROL_BASE;
/// The CPL0 exception stub `out`s the vector here (32-bit); the frame is on its stack (see
/// [`ExceptionFrame`](crate::exception::ExceptionFrame)).
pub const CONTROL_EXCEPTION: u16 = CONTROL_BASE + 4;
/// `in` a 32-bit value here to wait: the VMM first serves the vsock device's queues, then blocks
/// until it has something for the guest (a used RX buffer) or the VM is stopped. The value read
/// is a bit set of [`wait_result`]. This is how the guest sleeps: it has no interrupts.
pub const CONTROL_WAIT: u16 = CONTROL_BASE + 8;
/// `out` a 32-bit number of microseconds here to bound the next wait on [`CONTROL_WAIT`]: it
/// then also returns, with [`wait_result::TIMED_OUT`], once that long has passed (0: no bound).
/// This is how the guest sleeps for a time (WASI `poll_oneoff` on a clock) without spinning.
/// The bound applies to one wait; a VM without a vsock device returns at once.
pub const CONTROL_WAIT_LIMIT: u16 = CONTROL_BASE + 16;
/// `out` a 32-bit guest-physical address here to print a console record: a little-endian u32
/// length followed by that many bytes (at most [`MAX_CONSOLE_RECORD`]). One VM exit per record,
/// where the UART costs one per byte under kvm_pvm (`rep outsb` is split into single bytes).
pub const CONTROL_CONSOLE: u16 = CONTROL_BASE + 12;
/// Largest console record, in bytes of text.
pub const MAX_CONSOLE_RECORD: u32 = 4096;
/// `out` a 32-bit CPL3 address here to have CPU exceptions [`TRAP_VECTORS`] delivered to it
/// (see [`crate::window`] for the registers it finds). Until then every exception is fatal.
pub const CONTROL_TRAP_ENTRY: u16 = CONTROL_BASE + 20;
/// `out` any 32-bit value here when a delivered exception was not a Wasm trap: the VMM then
/// ends the VM with the exception it delivered, as if it had never been delivered.
pub const CONTROL_TRAP_UNHANDLED: u16 = CONTROL_BASE + 24;
/// `out` the 32-bit guest-physical address of a [`MapRequest`](crate::window::MapRequest)
/// here to map part of a linear-memory window onto heap RAM.
pub const CONTROL_MAP_WINDOW: u16 = CONTROL_BASE + 28;
/// Number of ports in the control block.
pub const CONTROL_PORT_COUNT: u16 = 32;

/// CPU exception vectors that the VMM delivers to the guest's [`CONTROL_TRAP_ENTRY`] when they
/// arise at CPL3: divide error, invalid opcode (`ud2`) and page fault, the three ways compiled
/// Wasm traps when wasmtime runs with signal-based traps.
pub const TRAP_VECTORS: [u32; 3] = [0, 6, 14];

/// Bits of the value read from [`CONTROL_WAIT`].
pub mod wait_result {
    /// The vsock device put buffers on its RX used ring.
    pub const VSOCK_RX: u32 = 1 << 0;
    /// The vsock device put buffers on its TX used ring.
    pub const VSOCK_TX: u32 = 1 << 1;
    /// The bound set through [`super::CONTROL_WAIT_LIMIT`] passed.
    pub const TIMED_OUT: u32 = 1 << 2;
}

/// Guest exit statuses written to [`CONTROL_EXIT`].
pub mod exit_status {
    /// Everything the guest was asked to do succeeded.
    pub const OK: u32 = 0;
    /// The Wasm self-test failed (error on the console).
    pub const SELF_TEST_FAILED: u32 = 1;
    /// The guest panicked (message on the console).
    pub const PANIC: u32 = 2;
    /// The boot-info block was missing, of another ABI version, or inconsistent.
    pub const BAD_BOOT_INFO: u32 = 3;
    /// The guest's heap is exhausted.
    pub const OUT_OF_MEMORY: u32 = 4;
    /// Largest status the VMM passes through as its own exit code; larger values are clamped.
    pub const MAX: u32 = 63;
}

/// Port ranges (first port, count) the guest may access; everything else is denied.
pub const GUEST_PORTS: [(u16, u16); 2] = [
    (SERIAL_COM1, SERIAL_PORT_COUNT),
    (CONTROL_BASE, CONTROL_PORT_COUNT),
];
