//! The guest ABI of Bulwark: what the VMM and the freestanding guest agree on.
//!
//! Everything here is plain data (`no_std`, no dependencies): the guest-physical memory layout, the
//! I/O ports, and the boot-info block the VMM writes before the guest's first instruction.

#![no_std]

pub mod boot;
pub mod layout;
pub mod ports;

/// Version of the guest ABI described by this crate. The VMM writes it into boot info; a guest
/// built against another version refuses to run.
pub const ABI_VERSION: u32 = 1;

/// Well-known vsock addresses.
pub mod vsock {
    /// CID of the host.
    pub const HOST_CID: u64 = 2;
    /// The guest's CID unless the VMM is told otherwise (`--cid`).
    pub const DEFAULT_GUEST_CID: u64 = 3;
    /// Largest payload of one vsock packet either side sends or accepts.
    pub const MAX_PACKET_DATA: u32 = 64 * 1024;
    /// Guest port of the echo service the guest runs for tests.
    pub const ECHO_PORT: u32 = 1234;
    /// Host port the guest connects to in its connect test mode.
    pub const HOST_TEST_PORT: u32 = 5000;
    /// The greeting the guest writes first in its connect test mode.
    pub const GUEST_GREETING: &[u8] = b"hello from the guest\n";
}
