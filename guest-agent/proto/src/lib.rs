//! The guest ABI of Bulwark: what the VMM and the freestanding guest agree on.
//!
//! Everything here is plain data (`no_std`): the guest-physical memory layout, the I/O ports, the
//! boot-info block the VMM writes before the guest's first instruction, the vsock wire format,
//! the directory trees shared with a call, and the tool-call protocol the host speaks with the guest agent over vsock.

#![no_std]

extern crate alloc;

pub mod boot;
pub mod call;
pub mod frame;
pub mod layout;
pub mod ports;
pub mod tree;
pub mod vsock;

/// Version of the guest ABI described by this crate. The VMM writes it into boot info; a guest
/// built against another version refuses to run. Version 2: the exception stubs have a page of
/// their own (`layout::IMAGE_USER_START`).
pub const ABI_VERSION: u32 = 2;
