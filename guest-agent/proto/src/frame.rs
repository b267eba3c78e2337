//! Framing of the tool-call protocol on a vsock stream: a little-endian u32 length, then that
//! many bytes of postcard-encoded message. The length is checked against a cap before anything
//! is allocated for the body.
//!
//! [`encode`] makes a frame; [`read`] reads one from a [`Source`] and decodes it: the one reader
//! both the guest agent (requests) and the host side (answers) use.

use alloc::vec::Vec;

/// Largest request frame the agent accepts (standard input and the shared directories dominate
/// it: the artifact is mapped, not sent).
pub const MAX_REQUEST_FRAME: u32 = 320 << 20;
/// Largest response frame the host accepts (the host keeps its output and directory limits
/// below it).
pub const MAX_RESPONSE_FRAME: u32 = 320 << 20;
/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// Why a frame could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length is over the cap.
    TooLarge {
        /// The announced length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// The body does not decode as the expected message.
    Malformed,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes is over the {max}-byte limit")
            }
            Self::Malformed => write!(f, "frame does not decode as a protocol message"),
        }
    }
}

/// Checks a length prefix against `max` and returns the body length.
pub fn body_len(prefix: [u8; PREFIX], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len as usize)
}

/// Encodes `msg` as a complete frame (prefix and body).
pub fn encode<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = alloc::vec![0u8; PREFIX];
    let body = postcard::to_allocvec(msg).map_err(|_| FrameError::Malformed)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    out[..PREFIX].copy_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a frame body.
pub fn decode<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|_| FrameError::Malformed)
}

/// Where a frame is read from: a stream that can fill a buffer completely. With feature `std`
/// every `std::io::Read` is one.
pub trait Source {
    /// Why a read failed.
    type Error;

    /// Fills all of `buf`, waiting as needed; a stream that ends first is an error.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), Self::Error>;
}

#[cfg(feature = "std")]
impl<R: std::io::Read + ?Sized> Source for R {
    type Error = std::io::Error;

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), std::io::Error> {
        std::io::Read::read_exact(self, buf)
    }
}

/// Why [`read`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The stream failed or ended while the length prefix was read: nothing of this frame
    /// arrived, or only part of its prefix.
    Prefix(E),
    /// The stream failed or ended inside the body.
    Body(E),
    /// The frame is over the cap, or does not decode.
    Frame(FrameError),
    /// No memory for a body of this many bytes (within the cap).
    NoMemory(usize),
}

impl<E: core::fmt::Display> core::fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Prefix(e) => write!(f, "reading a frame's length: {e}"),
            Self::Body(e) => write!(f, "reading a frame's body: {e}"),
            Self::Frame(e) => e.fmt(f),
            Self::NoMemory(len) => write!(f, "no memory for a {len}-byte frame"),
        }
    }
}

/// Reads one frame of at most `max` body bytes from `src` and returns its body. The length is
/// checked before the body is allocated, and an allocation that fails is an error, not an abort.
pub fn read_body<S: Source + ?Sized>(
    src: &mut S,
    max: u32,
) -> Result<Vec<u8>, ReadError<S::Error>> {
    let mut prefix = [0u8; PREFIX];
    src.read_exact(&mut prefix).map_err(ReadError::Prefix)?;
    let len = body_len(prefix, max).map_err(ReadError::Frame)?;
    let mut body = Vec::new();
    body.try_reserve_exact(len)
        .map_err(|_| ReadError::NoMemory(len))?;
    body.resize(len, 0);
    src.read_exact(&mut body).map_err(ReadError::Body)?;
    Ok(body)
}

/// Reads one frame of at most `max` body bytes from `src` and decodes it as a `T`.
pub fn read<T, S>(src: &mut S, max: u32) -> Result<T, ReadError<S::Error>>
where
    T: serde::de::DeserializeOwned,
    S: Source + ?Sized,
{
    let body = read_body(src, max)?;
    decode(&body).map_err(ReadError::Frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{Artifact, Limits, Outcome, Request, Response};

    #[test]
    fn frames_round_trip_and_lengths_are_capped() {
        let req = Request {
            version: crate::call::PROTOCOL_VERSION,
            artifact: Artifact {
                digest: [7; 32],
                size: 4096,
            },
            args: alloc::vec!["tool".into(), "--x".into()],
            env: alloc::vec![("K".into(), "V".into())],
            stdin: alloc::vec![1, 2, 3],
            dirs: alloc::vec![crate::tree::SharedDir {
                guest_path: "/data".into(),
                entries: alloc::vec![crate::tree::Entry {
                    path: "a.txt".into(),
                    node: crate::tree::Node::File(alloc::vec![b'x']),
                }],
            }],
            limits: Limits::default(),
            random_seed: [9; 32],
            realtime_ns: 1,
            stream: false,
        };
        let frame = encode(&req).unwrap();
        let len = body_len(frame[..PREFIX].try_into().unwrap(), MAX_REQUEST_FRAME).unwrap();
        assert_eq!(len, frame.len() - PREFIX);
        let back: Request = decode(&frame[PREFIX..]).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            body_len(u32::MAX.to_le_bytes(), MAX_REQUEST_FRAME),
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: MAX_REQUEST_FRAME
            })
        );
        assert_eq!(decode::<Request>(&[0xff; 3]), Err(FrameError::Malformed));
    }

    /// A source over a byte slice that fails with `()` when it runs out.
    struct Bytes<'a>(&'a [u8]);

    impl Source for Bytes<'_> {
        type Error = ();

        fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ()> {
            if buf.len() > self.0.len() {
                self.0 = &[];
                return Err(());
            }
            let (head, rest) = self.0.split_at(buf.len());
            buf.copy_from_slice(head);
            self.0 = rest;
            Ok(())
        }
    }

    #[test]
    fn read_takes_one_frame_and_checks_it() {
        let answer = Response::new(Outcome::Refused("over a limit".into()));
        let mut stream = encode(&answer).unwrap();
        stream.extend_from_slice(b"next");
        let mut src = Bytes(&stream);
        assert_eq!(
            read::<Response, _>(&mut src, MAX_RESPONSE_FRAME),
            Ok(answer)
        );
        assert_eq!(src.0, b"next", "only the frame is consumed");

        assert_eq!(
            read::<Response, _>(&mut Bytes(&[1, 0]), 10),
            Err(ReadError::Prefix(()))
        );
        let over = 11u32.to_le_bytes();
        assert_eq!(
            read::<Response, _>(&mut Bytes(&over), 10),
            Err(ReadError::Frame(FrameError::TooLarge { len: 11, max: 10 }))
        );
        assert_eq!(
            read::<Response, _>(&mut Bytes(&[5, 0, 0, 0, 1]), 10),
            Err(ReadError::Body(()))
        );
        assert_eq!(
            read::<Response, _>(&mut Bytes(&[1, 0, 0, 0, 0xff]), 10),
            Err(ReadError::Frame(FrameError::Malformed))
        );
    }

    #[test]
    fn byte_fields_keep_the_wire_format_of_a_sequence_of_u8() {
        // serde_bytes changes how fast byte vectors are encoded, not the bytes: a peer built
        // before it reads the same frames.
        let data: Vec<u8> = (0..=255).collect();
        let as_seq = postcard::to_allocvec(&data).unwrap();
        let as_bytes = postcard::to_allocvec(serde_bytes::Bytes::new(&data)).unwrap();
        assert_eq!(as_seq, as_bytes);
    }
}
