//! The guest's virtio-vsock driver and a small stream API over it.
//!
//! Packets go out through TX buffers (header and data in one descriptor) and come in through RX
//! buffers the driver keeps posted. Nothing interrupts the guest: [`Vsock::poll`] takes what
//! the device delivered, and [`Vsock::wait`] reads the VMM's wait register, which first sends
//! everything queued on TX and then blocks until RX has something. A guest that queues its
//! replies and then waits needs one VM exit per round trip.
//!
//! Every packet from the device is checked (addresses, ports, lengths, credit); a peer that
//! breaks the protocol gets its connection reset, never a panic.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use bulwark_abi::layout;
use bulwark_abi::ports;
use bulwark_abi::virtio::vsock::{EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use bulwark_abi::vsock::{
    HEADER_LEN, HEADER_SIZE, HOST_CID, Header, MAX_PACKET_DATA, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM, op,
};

use super::mmio::{SetupError, Transport};
use super::queue::{DESC_F_WRITE, Queue};

/// Bytes of one buffer area: QUEUE_SIZE buffers of BUF_SIZE bytes.
const AREA_SIZE: usize = BUF_SIZE * QUEUE_SIZE as usize;

/// A buffer area for RX or TX packets. It lives in the image's `.bss`, which is zero in the
/// fresh guest RAM the VMM hands over, so setting up the driver touches none of its pages:
/// zeroing the same 8 MiB on the heap cost ~10 ms of first-touch page faults on kvm_pvm, most
/// of a tool call's start-up. Pages are touched when packets first use them.
#[repr(C, align(4096))]
struct BufferArea(UnsafeCell<[u8; AREA_SIZE]>);

// SAFETY: the areas are handed out once, to the one `Vsock` (see `AREAS_TAKEN`), which reaches
// them only through `&mut self`; no two threads exist in the guest.
unsafe impl Sync for BufferArea {}

static RX_AREA: BufferArea = BufferArea(UnsafeCell::new([0; AREA_SIZE]));
static TX_AREA: BufferArea = BufferArea(UnsafeCell::new([0; AREA_SIZE]));
/// Set by the first `Vsock::init`; a second driver would share the areas, so it is refused.
static AREAS_TAKEN: AtomicBool = AtomicBool::new(false);

fn area(a: &'static BufferArea) -> NonNull<u8> {
    // SAFETY: UnsafeCell::get of a static is never null.
    unsafe { NonNull::new_unchecked(a.0.get().cast::<u8>()) }
}

const HEADER: usize = HEADER_SIZE;
/// A buffer: one packet, header and the most data a packet carries.
const BUF_LEN: u32 = HEADER_LEN + MAX_PACKET_DATA;
const BUF_SIZE: usize = BUF_LEN as usize;
/// Receive buffer per connection that the guest advertises (bytes it will hold unread).
pub const BUF_ALLOC: u32 = 1 << 20;
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 256;
const FIRST_EPHEMERAL_PORT: u32 = 49152;

/// A stream: (local port, peer port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stream {
    local: u32,
    peer: u32,
}

/// Why a stream operation did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// Nothing to read, or no credit or buffer to send, right now: poll or wait, then retry.
    WouldBlock,
    /// The peer reset the stream, or it does not exist.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Established,
    Reset,
}

struct Conn {
    state: State,
    rx: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    peer_shut_send: bool,
}

impl Conn {
    fn new(state: State) -> Self {
        Self {
            state,
            rx: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            peer_shut_send: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The vsock device and every stream on it.
pub struct Vsock {
    transport: Transport,
    cid: u64,
    rx: Queue,
    tx: Queue,
    rx_bufs: NonNull<u8>,
    tx_bufs: NonNull<u8>,
    tx_free: Vec<u16>,
    tx_queued: bool,
    conns: BTreeMap<Stream, Conn>,
    listening: BTreeSet<u32>,
    accepted: VecDeque<Stream>,
    next_port: u32,
}

impl Vsock {
    /// The driver of the device the VMM placed at `layout::VIRTIO_VSOCK_MMIO` for CID `cid`
    /// and set up before the guest started (rings at `layout::VIRTQUEUES`): no register is
    /// touched here, so starting the driver costs no VM exit. Only the receive buffers are
    /// posted (the device reads them when it has a packet to deliver).
    pub fn init(cid: u64) -> Result<Self, SetupError> {
        let transport = Transport::new(layout::VIRTIO_VSOCK_MMIO);
        if AREAS_TAKEN.swap(true, Ordering::Relaxed) {
            return Err(SetupError::AlreadySetUp);
        }
        // The event queue is the device's; the guest only has to leave its rings alone.
        const _: () = assert!(RX_QUEUE == 0 && TX_QUEUE == 1 && EVENT_QUEUE == 2);
        let rx = Queue::settled(u64::from(RX_QUEUE), QUEUE_SIZE);
        let tx = Queue::settled(u64::from(TX_QUEUE), QUEUE_SIZE);
        let rx_bufs = area(&RX_AREA);
        let tx_bufs = area(&TX_AREA);
        let mut vsock = Self {
            transport,
            cid,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            tx_free: (0..QUEUE_SIZE).collect(),
            tx_queued: false,
            conns: BTreeMap::new(),
            listening: BTreeSet::new(),
            accepted: VecDeque::new(),
            next_port: FIRST_EPHEMERAL_PORT,
        };
        for id in 0..QUEUE_SIZE {
            vsock.post_rx(id);
        }
        vsock.rx.publish();
        Ok(vsock)
    }

    fn buf(&mut self, base: NonNull<u8>, id: u16) -> &mut [u8] {
        let offset = usize::from(id % QUEUE_SIZE) * BUF_SIZE;
        // SAFETY: the buffer area holds QUEUE_SIZE buffers of BUF_SIZE bytes, is a static this
        // driver alone took in `init`; `id % QUEUE_SIZE` selects one, and `&mut self` guarantees no
        // other slice into it is alive. The device only writes RX buffers while the guest is in
        // a VM exit, never while this slice is used.
        unsafe { core::slice::from_raw_parts_mut(base.as_ptr().add(offset), BUF_SIZE) }
    }

    fn post_rx(&mut self, id: u16) {
        let addr = self.buf(self.rx_bufs, id).as_ptr() as u64;
        self.rx.set_descriptor(id, addr, BUF_LEN, DESC_F_WRITE);
        self.rx.push_avail(id);
    }

    /// Accepts connections to guest port `port` from now on.
    pub fn listen(&mut self, port: u32) {
        self.listening.insert(port);
    }

    /// A connection accepted on a listening port, if one is waiting.
    pub fn accept(&mut self) -> Option<Stream> {
        self.accepted.pop_front()
    }

    /// Opens a stream to host port `port`, waiting for the host's answer.
    pub fn connect(&mut self, port: u32) -> Result<Stream, StreamError> {
        let mut local = self.next_port;
        while self.conns.keys().any(|s| s.local == local) {
            local = local.wrapping_add(1).max(FIRST_EPHEMERAL_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_EPHEMERAL_PORT);
        let stream = Stream { local, peer: port };
        self.conns.insert(stream, Conn::new(State::Connecting));
        self.send_control(stream, op::REQUEST, 0);
        loop {
            match self.conns.get(&stream).map(|c| c.state) {
                Some(State::Established) => return Ok(stream),
                Some(State::Connecting) => self.wait(),
                _ => {
                    self.conns.remove(&stream);
                    return Err(StreamError::Reset);
                }
            }
        }
    }

    /// Bytes that [`Vsock::send`] on `stream` can take now.
    pub fn send_capacity(&self, stream: Stream) -> usize {
        match self.conns.get(&stream) {
            Some(c) if c.state == State::Established => c.credit() as usize,
            _ => 0,
        }
    }

    /// Reads what has arrived on `stream`. `Ok(0)` is end of stream (the peer shut its sending
    /// side and everything was read).
    pub fn recv(&mut self, stream: Stream, buf: &mut [u8]) -> Result<usize, StreamError> {
        let conn = self.conns.get_mut(&stream).ok_or(StreamError::Reset)?;
        if conn.rx.is_empty() {
            return match conn.state {
                State::Reset => Err(StreamError::Reset),
                _ if conn.peer_shut_send => Ok(0),
                _ if buf.is_empty() => Ok(0),
                _ => Err(StreamError::WouldBlock),
            };
        }
        let n = buf.len().min(conn.rx.len());
        // The ring's two halves, copied as blocks (a byte-by-byte drain costs ~10x more).
        let (front, back) = conn.rx.as_slices();
        let from_front = n.min(front.len());
        let (head, tail) = buf.split_at_mut(from_front);
        head.copy_from_slice(&front[..from_front]);
        let rest = n - from_front;
        if let (Some(dst), Some(src)) = (tail.get_mut(..rest), back.get(..rest)) {
            dst.copy_from_slice(src);
        }
        conn.rx.drain(..n);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(low_32_bits(n));
        if conn.fwd_cnt.wrapping_sub(conn.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
            self.send_control(stream, op::CREDIT_UPDATE, 0);
        }
        Ok(n)
    }

    /// Queues as much of `data` as the peer's credit allows, in packets of at most 64 KiB.
    pub fn send(&mut self, stream: Stream, data: &[u8]) -> Result<usize, StreamError> {
        let conn = self.conns.get(&stream).ok_or(StreamError::Reset)?;
        if conn.state != State::Established {
            return Err(StreamError::Reset);
        }
        let mut sent = 0;
        while sent < data.len() {
            let room = self.send_capacity(stream).min(MAX_PACKET_DATA as usize);
            let n = room.min(data.len() - sent);
            if n == 0 || !self.send_packet(stream, op::RW, 0, &data[sent..sent + n]) {
                break;
            }
            if let Some(conn) = self.conns.get_mut(&stream) {
                conn.tx_cnt = conn.tx_cnt.wrapping_add(low_32_bits(n));
            }
            sent += n;
        }
        if sent == 0 && !data.is_empty() {
            return Err(StreamError::WouldBlock);
        }
        Ok(sent)
    }

    /// Tells the peer this side will send no more on `stream` (it can still receive).
    pub fn shutdown(&mut self, stream: Stream) {
        if self
            .conns
            .get(&stream)
            .is_some_and(|c| c.state == State::Established)
        {
            self.send_control(stream, op::SHUTDOWN, SHUTDOWN_SEND);
        }
    }

    /// Closes `stream` in both directions and forgets it.
    pub fn close(&mut self, stream: Stream) {
        let open = self
            .conns
            .remove(&stream)
            .is_some_and(|c| c.state != State::Reset);
        if open {
            self.send_packet(stream, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
        }
    }

    fn header(&mut self, stream: Stream, op: u16, flags: u32, len: u32) -> Header {
        let mut hdr = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: stream.local,
            dst_port: stream.peer,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        };
        if let Some(conn) = self.conns.get_mut(&stream) {
            hdr.fwd_cnt = conn.fwd_cnt;
            conn.last_fwd_cnt_sent = conn.fwd_cnt;
        }
        hdr
    }

    fn send_control(&mut self, stream: Stream, op: u16, flags: u32) {
        self.send_packet(stream, op, flags, &[]);
    }

    /// Puts one packet on the TX queue (published at the next wait or flush). Returns false if
    /// no TX buffer came free even after the device was kicked, or if `data` is over
    /// [`MAX_PACKET_DATA`] (callers never pass more).
    fn send_packet(&mut self, stream: Stream, op: u16, flags: u32, data: &[u8]) -> bool {
        let Some(data_len) = u32::try_from(data.len())
            .ok()
            .filter(|&len| len <= MAX_PACKET_DATA)
        else {
            return false;
        };
        if self.tx_free.is_empty() {
            self.flush();
            self.reclaim_tx();
        }
        let Some(id) = self.tx_free.pop() else {
            return false;
        };
        let hdr = self.header(stream, op, flags, data_len);
        let buf = self.buf(self.tx_bufs, id);
        buf[..HEADER].copy_from_slice(&hdr.encode());
        buf[HEADER..HEADER + data.len()].copy_from_slice(data);
        let addr = buf.as_ptr() as u64;
        self.tx.set_descriptor(id, addr, HEADER_LEN + data_len, 0);
        self.tx.push_avail(id);
        self.tx_queued = true;
        true
    }

    /// Publishes queued TX packets and notifies the device (one VM exit), if any are queued.
    pub fn flush(&mut self) {
        if self.tx_queued {
            self.tx.publish();
            self.tx_queued = false;
            self.transport.notify(TX_QUEUE);
        }
        self.poll();
    }

    fn reclaim_tx(&mut self) {
        while let Some(used) = self.tx.pop_used() {
            if !self.tx_free.contains(&used.id) {
                self.tx_free.push(used.id);
            }
        }
    }

    /// Takes what the device delivered (no VM exit).
    pub fn poll(&mut self) {
        self.reclaim_tx();
        let mut reposted = false;
        while let Some(used) = self.rx.pop_used() {
            let len = (used.len as usize).min(BUF_SIZE);
            if len >= HEADER {
                let buf = self.buf(self.rx_bufs, used.id);
                let mut raw = [0u8; HEADER];
                raw.copy_from_slice(&buf[..HEADER]);
                let hdr = Header::decode(&raw);
                let data_len = (hdr.len as usize).min(len - HEADER);
                let data: Vec<u8> = buf[HEADER..HEADER + data_len].to_vec();
                if data_len == hdr.len as usize {
                    self.dispatch(hdr, &data);
                }
            }
            self.post_rx(used.id);
            reposted = true;
        }
        if reposted {
            self.rx.publish();
        }
    }

    /// Sleeps in the VMM until the device delivers something, then takes it. Queued TX packets
    /// are published first; the VMM sends them before it blocks.
    pub fn wait(&mut self) {
        if self.tx_queued {
            self.tx.publish();
            self.tx_queued = false;
        }
        let _bits: u32;
        // SAFETY: a 32-bit `in` from the wait register, granted by the TSS I/O bitmap; the VMM
        // serves the queues in guest memory during it, which the volatile ring accesses in
        // `poll` account for.
        unsafe {
            core::arch::asm!("in eax, dx", in("dx") ports::CONTROL_WAIT, out("eax") _bits, options(nostack));
        }
        self.poll();
    }

    fn dispatch(&mut self, hdr: Header, data: &[u8]) {
        let stream = Stream {
            local: hdr.dst_port,
            peer: hdr.src_port,
        };
        if hdr.src_cid != HOST_CID || hdr.dst_cid != self.cid || hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.send_control(stream, op::RST, 0);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&stream) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = hdr.fwd_cnt;
        }
        let state = self.conns.get(&stream).map(|c| c.state);
        match (hdr.op, state) {
            (op::REQUEST, None)
                if self.listening.contains(&stream.local) && self.conns.len() < MAX_CONNECTIONS =>
            {
                let mut conn = Conn::new(State::Established);
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                self.conns.insert(stream, conn);
                self.accepted.push_back(stream);
                self.send_control(stream, op::RESPONSE, 0);
            }
            (op::RESPONSE, Some(State::Connecting)) => {
                if let Some(conn) = self.conns.get_mut(&stream) {
                    conn.state = State::Established;
                }
            }
            (op::RW, Some(State::Established)) => {
                let Some(conn) = self.conns.get_mut(&stream) else {
                    return;
                };
                // Data past a SHUTDOWN, or beyond the credit this side gave, breaks the stream.
                let overrun =
                    conn.peer_shut_send || conn.rx.len() + data.len() > BUF_ALLOC as usize;
                if overrun {
                    conn.state = State::Reset;
                    self.send_control(stream, op::RST, 0);
                } else {
                    conn.rx.extend(data);
                }
            }
            (op::SHUTDOWN, Some(_)) => {
                if let Some(conn) = self.conns.get_mut(&stream) {
                    conn.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                }
            }
            (op::RST, Some(_)) => {
                if let Some(conn) = self.conns.get_mut(&stream) {
                    conn.state = State::Reset;
                }
            }
            (op::RST, None) => {}
            (op::CREDIT_UPDATE, Some(_)) => {}
            (op::CREDIT_REQUEST, Some(_)) => self.send_control(stream, op::CREDIT_UPDATE, 0),
            _ => self.send_control(stream, op::RST, 0),
        }
    }
}

/// The low 32 bits of `n`: a step of a vsock byte counter (`fwd_cnt`, `tx_cnt`), which runs
/// modulo 2^32.
fn low_32_bits(n: usize) -> u32 {
    let [b0, b1, b2, b3, ..] = n.to_le_bytes();
    u32::from_le_bytes([b0, b1, b2, b3])
}
