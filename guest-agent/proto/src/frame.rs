//! Framing of the tool-call protocol on a vsock stream: a little-endian u32 length, then that
//! many bytes of postcard-encoded message. The length is checked against a cap before anything
//! is allocated for the body.

use alloc::vec::Vec;

/// Largest request frame the agent accepts (the module artifact dominates it).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::{Artifact, Limits, Request};

    #[test]
    fn frames_round_trip_and_lengths_are_capped() {
        let req = Request {
            version: crate::call::PROTOCOL_VERSION,
            artifact: Artifact::Cached { digest: [7; 32] },
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
}
