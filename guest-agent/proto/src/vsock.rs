//! The vsock wire format (virtio 1.2, 5.10.6) and the well-known addresses, shared by the VMM's
//! device and the guest's driver.

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

/// Size of a packet header on the wire.
pub const HEADER_SIZE: usize = 44;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, or aborted).
    pub const RST: u16 = 3;
    /// The sender will not send (flag SEND) and/or not receive (flag RCV) any more.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's receive-buffer state, unsolicited.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Please send a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The only socket type carried.
pub const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header as plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes the little-endian wire form.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_through_the_wire_form() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 65536,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 1 << 20,
            fwd_cnt: u32::MAX,
        };
        let wire = h.encode();
        assert_eq!(&wire[0..8], &3u64.to_le_bytes());
        assert_eq!(&wire[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::decode(&wire), h);
    }
}
