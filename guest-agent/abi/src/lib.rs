//! The guest ABI of Bulwark: what the VMM and the freestanding guest agree on.
//!
//! Everything here is plain data (`no_std`, no allocation): the guest-physical memory layout
//! ([`layout`], the one place for guest-physical addresses), the I/O ports and the values
//! written to them ([`ports`]), the boot-info block the VMM writes before the guest's first
//! instruction ([`boot`]), the frame the guest's exception stub reports ([`exception`]), the
//! virtio-mmio register map and the vsock device's constants ([`virtio`]), and the vsock wire
//! format with the VMM socket's `CONNECT <port>` handshake ([`vsock`]), and the map requests
//! and trap delivery of linear-memory windows ([`window`]).
//!
//! The call protocol the host CLI speaks with the guest agent is not here: it is
//! `bulwark-proto`, which the VMM never links.
//!
//! Feature `std` adds the client side of the handshake over `std::io`
//! (`vsock::handshake::connect`).

#![no_std]
#[cfg(feature = "std")]
extern crate std;

pub mod boot;
pub mod exception;
pub mod layout;
pub mod ports;
pub mod virtio;
pub mod vsock;
pub mod window;

/// Version of the guest ABI described by this crate. The VMM writes it into boot info; a guest
/// built against another version refuses to run. Version 2: the exception stubs have a page of
/// their own (`layout::IMAGE_USER_START`). Version 3: RAM past 3 GiB goes above 4 GiB
/// (`layout::ram_ranges`, `BootInfo::high_ram_size`). Version 4: the artifact window
/// (`layout::ARTIFACT_START`, `BootInfo::artifact_size`); the vsock device is set up by the VMM
/// before the guest starts (`layout::VIRTQUEUES`). Version 5: linear-memory windows mapped by
/// the VMM (`layout::WINDOWS_START`, `window::MapRequest`) and exceptions delivered to the
/// guest (`ports::CONTROL_TRAP_ENTRY`). Version 6: an artifact may be mapped after the guest
/// started (`bulwark-vmm --artifact-later`): `BootInfo::artifact_size` goes from 0 to the
/// artifact's size once, when the VMM has mapped it, and the guest reads it again (volatile)
/// when a call needs the artifact.
pub const ABI_VERSION: u32 = 6;
