//! The virtio-vsock device (virtio 1.2, 5.10), with Firecracker's host convention: the host
//! side is a Unix socket. A host client connects to it and writes `CONNECT <port>\n` to reach
//! guest port `<port>` (answered `OK <host port>\n`); a guest connection to host port P goes to
//! the Unix socket `<path>_P`.
//!
//! - [`packet`]: the header fields and constants, and building packets for the guest.
//! - [`connection`]: one stream's state and credit-based flow control.
//! - [`muxer`]: the host side: the listener, every connection, and the epoll loop.
//! - [`device`]: the virtio device: queues in guest memory, and the wait the guest blocks in.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::VsockDevice;
