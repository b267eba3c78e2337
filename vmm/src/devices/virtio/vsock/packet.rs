//! Vsock packet headers: the wire format is `bulwark_abi::vsock`, shared with the guest; this
//! module moves it in and out of virtio-vsock's packets in guest memory.

use bulwark_abi::vsock::HEADER_SIZE;
pub use bulwark_abi::vsock::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

/// Reads the header of a packet the guest sent.
pub fn read_header<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    let mut raw = [0u8; HEADER_SIZE];
    pkt.header_slice().copy_to(&mut raw[..]);
    Header::decode(&raw)
}

/// Writes `hdr` into a packet going to the guest.
pub fn write_header<B: BitmapSlice>(
    hdr: &Header,
    pkt: &mut VsockPacket<'_, B>,
) -> Result<(), virtio_vsock::packet::Error> {
    pkt.set_header_from_raw(&hdr.encode())
}
