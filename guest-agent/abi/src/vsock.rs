//! The vsock wire format (virtio 1.2, 5.10.6) and the well-known addresses, shared by the VMM's
//! device and the guest's driver; and the [`handshake`] a host program does on the VMM's Unix
//! socket to reach a guest port.

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
/// [`HEADER_SIZE`] as descriptor and used-ring lengths (32-bit) count it.
pub const HEADER_LEN: u32 = 44;
const _: () = assert!(HEADER_LEN as usize == HEADER_SIZE);

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

/// The VMM's Unix-socket handshake (Firecracker's convention, so `socat` and existing clients
/// work): a host program connects to the socket given with `--vsock-uds` and writes
/// `CONNECT <port>\n` to reach guest port `<port>`; once the guest accepts, the VMM answers
/// `OK <host port>\n` and the stream carries the connection's bytes from then on. If the guest
/// refuses, the VMM closes the stream without an answer.
///
/// The VMM parses the request with [`parse_connect`](handshake::parse_connect) and writes
/// [`ok_line`](handshake::ok_line); clients write [`connect_line`](handshake::connect_line) and
/// parse the answer with [`parse_ok`](handshake::parse_ok) (or call `connect`, feature `std`).
pub mod handshake {
    /// Longest line of the handshake, in bytes before its newline; a longer one is refused.
    pub const MAX_LINE: usize = 32;

    /// One handshake line, newline included.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Line {
        buf: [u8; MAX_LINE + 1],
        len: usize,
    }

    impl Line {
        /// `<word> <port>\n`.
        fn new(word: &str, port: u32) -> Self {
            let mut line = Self {
                buf: [0; MAX_LINE + 1],
                len: 0,
            };
            // At most 7 + 1 + 10 + 1 bytes: it always fits, so the write cannot fail.
            let _ = core::fmt::Write::write_fmt(&mut line, format_args!("{word} {port}\n"));
            line
        }

        /// The line's bytes, newline included.
        pub fn as_bytes(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }

    impl core::fmt::Write for Line {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self
                .len
                .checked_add(s.len())
                .filter(|&end| end <= self.buf.len())
                .ok_or(core::fmt::Error)?;
            self.buf[self.len..end].copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }

    /// The client's request for guest port `port`: `CONNECT <port>\n`.
    pub fn connect_line(port: u32) -> Line {
        Line::new("CONNECT", port)
    }

    /// The VMM's answer once the guest accepted: `OK <host port>\n`.
    pub fn ok_line(host_port: u32) -> Line {
        Line::new("OK", host_port)
    }

    /// The port of `<word> <port>` (newline stripped; a trailing `\r` is allowed).
    fn parse(word: &str, line: &[u8]) -> Option<u32> {
        let text = core::str::from_utf8(line).ok()?;
        let rest = text.trim_end_matches('\r').strip_prefix(word)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    }

    /// Parses a client's `CONNECT <port>` line (its newline already stripped): the guest port.
    pub fn parse_connect(line: &[u8]) -> Option<u32> {
        parse("CONNECT", line)
    }

    /// Parses the VMM's `OK <port>` answer (its newline already stripped): the host-side port
    /// of the connection.
    pub fn parse_ok(line: &[u8]) -> Option<u32> {
        parse("OK", line)
    }

    /// Why [`connect`] failed.
    #[cfg(feature = "std")]
    #[derive(Debug, thiserror::Error)]
    pub enum HandshakeError {
        /// Writing the request or reading the answer failed. A timeout set on the stream shows
        /// here as `WouldBlock` or `TimedOut`.
        #[error("the vsock handshake failed: {0}")]
        Io(#[source] std::io::Error),
        /// The VMM closed the stream without answering: nothing listens on that guest port,
        /// or the VM is going down.
        #[error(
            "the VM closed the connection to guest port {port} during the vsock handshake: nothing listens there, or the VM ended"
        )]
        Closed {
            /// The guest port asked for.
            port: u32,
        },
        /// The answer is not `OK <port>`, or longer than [`MAX_LINE`].
        #[error("bad vsock handshake answer from the VM: {answer:?}")]
        BadAnswer {
            /// What came back (lossy UTF-8).
            answer: std::string::String,
        },
    }

    /// Does the handshake for guest port `port` on a fresh connection to the VMM's socket and
    /// returns the host-side port of the connection. The answer is read byte by byte, so
    /// nothing the guest sends right after it is consumed.
    #[cfg(feature = "std")]
    pub fn connect<S>(stream: &mut S, port: u32) -> Result<u32, HandshakeError>
    where
        S: std::io::Read + std::io::Write + ?Sized,
    {
        stream
            .write_all(connect_line(port).as_bytes())
            .map_err(HandshakeError::Io)?;
        let mut line = std::vec::Vec::new();
        let mut byte = [0u8];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Closed { port }),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() >= MAX_LINE => {
                    return Err(HandshakeError::BadAnswer {
                        answer: std::string::String::from_utf8_lossy(&line).into_owned(),
                    });
                }
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        parse_ok(&line).ok_or_else(|| HandshakeError::BadAnswer {
            answer: std::string::String::from_utf8_lossy(&line).into_owned(),
        })
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

    #[test]
    fn handshake_lines_are_written_and_parsed_by_the_same_rules() {
        use handshake::*;
        assert_eq!(connect_line(52).as_bytes(), b"CONNECT 52\n");
        assert_eq!(
            connect_line(u32::MAX).as_bytes(),
            b"CONNECT 4294967295\n".as_slice()
        );
        assert_eq!(ok_line(1 << 30).as_bytes(), b"OK 1073741824\n");
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT 4294967296",
            b"CONNECT x",
            b"CONNECTX 5",
            b"connect 52",
            b"OK 5",
            b"\xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
        assert_eq!(parse_ok(b"OK 1073741824"), Some(1 << 30));
        assert_eq!(parse_ok(b"CONNECT 5"), None);
        assert_eq!(parse_ok(b"OK"), None);
        let line = ok_line(7);
        let text = &line.as_bytes()[..line.as_bytes().len() - 1];
        assert_eq!(parse_ok(text), Some(7));
    }

    #[cfg(feature = "std")]
    #[test]
    fn connect_writes_the_request_and_reads_only_the_answer_line() {
        use handshake::*;
        use std::io::{Cursor, Read, Write};

        /// A stream that answers with `input` and records what was written.
        struct Fake {
            input: Cursor<std::vec::Vec<u8>>,
            written: std::vec::Vec<u8>,
        }
        impl Read for Fake {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.input.read(buf)
            }
        }
        impl Write for Fake {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.written.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let fake = |answer: &[u8]| Fake {
            input: Cursor::new(answer.to_vec()),
            written: std::vec::Vec::new(),
        };

        let mut s = fake(b"OK 1073741830\nguest data");
        assert_eq!(connect(&mut s, 52).unwrap(), 1073741830);
        assert_eq!(s.written, b"CONNECT 52\n");
        let mut rest = std::vec::Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"guest data");

        assert!(matches!(
            connect(&mut fake(b""), 9),
            Err(HandshakeError::Closed { port: 9 })
        ));
        assert!(matches!(
            connect(&mut fake(b"NO\n"), 9),
            Err(HandshakeError::BadAnswer { answer }) if answer == "NO"
        ));
        let long = [b'1'; 64];
        assert!(matches!(
            connect(&mut fake(&long), 9),
            Err(HandshakeError::BadAnswer { .. })
        ));
    }
}
