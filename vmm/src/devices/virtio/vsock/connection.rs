//! One vsock stream between a guest port and a host Unix socket, with credit-based flow control.
//!
//! Guest → host: the guest may have at most [`BUF_ALLOC`] bytes in flight that the host socket
//! has not taken yet; they wait in `pending` and nothing else is buffered. A guest that sends
//! more than its credit is cut off. Host → guest: bytes are read from the socket straight into
//! the guest's RX buffers, and only as many as the guest's advertised credit allows, so a slow
//! guest reader makes the host socket back up instead of the VMM's memory.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::Header;

/// The receive buffer the VMM advertises per connection (bytes of guest data it will hold).
pub const BUF_ALLOC: u32 = 128 * 1024;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE or RST.
    Connecting,
    /// Data flows.
    Established,
}

/// Why guest data could not be taken: the guest broke the protocol, or the host side is gone.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The host socket failed or was closed for writing.
    #[error("the host side of the connection is gone")]
    HostGone,
    /// More data than the credit the VMM gave.
    #[error("the guest sent {sent} bytes with only {credit} bytes of credit")]
    CreditExceeded {
        /// Bytes in the packet.
        sent: usize,
        /// Credit left.
        credit: u32,
    },
}

/// `n` bytes as a step of a vsock byte counter (`fwd_cnt`, `rx_cnt`): the counters run
/// modulo 2^32, so only the low 32 bits of `n` count.
fn counter_step(n: usize) -> Wrapping<u32> {
    let [b0, b1, b2, b3, ..] = n.to_le_bytes();
    Wrapping(u32::from_le_bytes([b0, b1, b2, b3]))
}

/// One stream.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// The host-side port of the stream.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// Life-cycle state.
    pub state: State,
    /// The host socket has data we have not read yet.
    pub host_readable: bool,
    /// The host closed its sending side (read returned 0), or the socket failed.
    pub host_eof: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    pub peer_shut_send: bool,
    /// The guest will receive no more (SHUTDOWN with RCV).
    pub peer_shut_recv: bool,
    /// The connection is in the muxer's queue of connections with host data to deliver.
    pub rx_queued: bool,
    pending: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    write_shut: bool,
}

impl Connection {
    /// A connection over `stream` (already non-blocking).
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            host_readable: false,
            host_eof: false,
            peer_shut_send: false,
            peer_shut_recv: false,
            rx_queued: false,
            pending: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            write_shut: false,
        }
    }

    /// Records the guest's buffer state from a packet header it sent.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Credit the VMM has left for guest data.
    fn own_credit(&self) -> u32 {
        // More pending than a u32 holds leaves no credit at all.
        BUF_ALLOC.saturating_sub(u32::try_from(self.pending.len()).unwrap_or(u32::MAX))
    }

    /// Whether host data can go to the guest now.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.peer_shut_recv
            && self.peer_credit() > 0
    }

    /// Whether the VMM should tell the guest about freed buffer space unprompted: half the
    /// buffer was consumed since the guest last heard.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= BUF_ALLOC / 2
    }

    /// Fills in the VMM's buffer state on a header going to the guest.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Guest data for the host: written to the socket as far as it takes it, the rest kept.
    pub fn send_to_host<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), ConnError> {
        let len = data.len();
        if !u32::try_from(len).is_ok_and(|len| len <= self.own_credit()) {
            return Err(ConnError::CreditExceeded {
                sent: len,
                credit: self.own_credit(),
            });
        }
        let mut written = 0;
        if self.pending.is_empty() {
            written = match self.stream.write_volatile(data) {
                Ok(n) => n,
                Err(e) if would_block(&e) => 0,
                // The guest learns it from the RST the muxer sends.
                Err(_) => return Err(ConnError::HostGone),
            };
        }
        self.fwd_cnt += counter_step(written);
        if written < data.len() {
            let rest = data.subslice(written, data.len() - written).map_err(|_| {
                ConnError::CreditExceeded {
                    sent: len,
                    credit: 0,
                }
            })?;
            let mut buf = vec![0u8; rest.len()];
            rest.copy_to(&mut buf[..]);
            self.pending.extend(buf);
        }
        Ok(())
    }

    /// Writes buffered guest data to the socket, then shuts its write side if the guest is done.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt += counter_step(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.peer_shut_send && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Whether guest data is still waiting for the host socket.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Reads host data into `buf` (a guest RX buffer), at most the guest's credit. Returns the
    /// byte count; 0 means nothing to read now (and `host_readable` is cleared) or end of file
    /// (and `host_eof` is set).
    pub fn read_from_host<B: BitmapSlice>(&mut self, buf: &VolatileSlice<'_, B>) -> u32 {
        let want = self
            .peer_credit()
            .min(u32::try_from(buf.len()).unwrap_or(u32::MAX));
        let Ok(mut window) = buf.subslice(0, want as usize) else {
            return 0;
        };
        match self.stream.read_volatile(&mut window) {
            Ok(0) if want > 0 => {
                self.host_eof = true;
                0
            }
            Ok(n) => {
                // A read fills at most the window: `want` bytes.
                let n = u32::try_from(n).map_or(want, |n| n.min(want));
                self.rx_cnt += Wrapping(n);
                n
            }
            Err(e) if would_block(&e) => {
                self.host_readable = false;
                0
            }
            Err(_) => {
                self.host_eof = true;
                0
            }
        }
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (Connection::new(a, 1 << 30, 1234, State::Established), b)
    }

    fn slice(buf: &mut [u8]) -> VolatileSlice<'_> {
        VolatileSlice::from(buf)
    }

    #[test]
    fn credit_limits_what_goes_to_the_guest() {
        let (mut c, mut host) = pair();
        c.update_peer_credit(&Header {
            buf_alloc: 4,
            fwd_cnt: 0,
            ..Header::default()
        });
        host.write_all(b"abcdefgh").unwrap();
        c.host_readable = true;
        assert!(c.wants_rx());
        let mut rx = [0u8; 16];
        assert_eq!(c.read_from_host(&slice(&mut rx)), 4);
        assert_eq!(&rx[..4], b"abcd");
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_rx(), "no credit, no reading");
        c.update_peer_credit(&Header {
            buf_alloc: 4,
            fwd_cnt: 4,
            ..Header::default()
        });
        assert_eq!(c.read_from_host(&slice(&mut rx)), 4);
        assert_eq!(&rx[..4], b"efgh");
        c.update_peer_credit(&Header {
            buf_alloc: 4,
            fwd_cnt: 8,
            ..Header::default()
        });
        assert_eq!(c.read_from_host(&slice(&mut rx)), 0);
        assert!(!c.host_readable, "drained");
        assert!(!c.host_eof);
        drop(host);
        c.host_readable = true;
        assert_eq!(c.read_from_host(&slice(&mut rx)), 0);
        assert!(c.host_eof);
    }

    #[test]
    fn guest_data_beyond_credit_is_refused_and_backlog_is_bounded() {
        let (mut c, mut host) = pair();
        // Fill the host socket until it would block, so the rest must wait in `pending`.
        let mut big = vec![7u8; BUF_ALLOC as usize];
        let mut sent = 0usize;
        while sent < 8 << 20 {
            c.send_to_host(&slice(&mut big[..4096])).unwrap();
            sent += 4096;
            if c.has_pending() {
                break;
            }
        }
        assert!(c.has_pending());
        let over = BUF_ALLOC as usize;
        let err = c.send_to_host(&slice(&mut big[..over])).unwrap_err();
        assert!(matches!(err, ConnError::CreditExceeded { .. }));
        // The host drains; flush moves the backlog and counts it as forwarded.
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match host.read(&mut sink) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.flush().unwrap();
                    if !c.has_pending() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut hdr = Header::default();
        c.stamp(&mut hdr);
        assert_eq!(hdr.fwd_cnt as usize, sent % (1 << 32));
        assert_eq!(hdr.buf_alloc, BUF_ALLOC);
        assert!(!c.needs_credit_update());
    }
}
