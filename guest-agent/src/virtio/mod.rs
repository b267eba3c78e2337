//! The guest's virtio drivers: the split virtqueue, the MMIO transport, and vsock.
//!
//! The guest has no interrupts: it polls used rings, and sleeps by reading the VMM's wait
//! register, which returns once the vsock device has filled RX buffers.

pub mod mmio;
pub mod queue;
pub mod vsock;
