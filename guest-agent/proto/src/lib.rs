//! The guest ABI of Bulwark: what the VMM and the freestanding guest agree on.
//!
//! Everything here is plain data (`no_std`, no dependencies): the guest-physical memory layout, the
//! I/O ports, and the boot-info block the VMM writes before the guest's first instruction.

#![no_std]

pub mod boot;
pub mod layout;
pub mod ports;
pub mod vsock;

/// Version of the guest ABI described by this crate. The VMM writes it into boot info; a guest
/// built against another version refuses to run.
pub const ABI_VERSION: u32 = 1;
