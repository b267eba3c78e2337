//! The tool-call protocol of Bulwark: what the host CLI and the guest agent say to each other
//! over vsock port [`call::AGENT_PORT`].
//!
//! [`call`] holds the request and its answer, [`tree`] the directory trees that travel with them,
//! and [`frame`] how one message is laid on the stream (and read back, with its size capped
//! before anything is allocated). Everything here is `no_std` + `alloc`; feature `std` lets
//! [`frame::read`] take any `std::io::Read`.
//!
//! The guest ABI the VMM and the guest share (memory layout, ports, boot info, the vsock wire
//! format and the VMM socket's handshake) is `bulwark-abi`: the VMM never links this crate.

#![no_std]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod call;
pub mod frame;
pub mod tree;
