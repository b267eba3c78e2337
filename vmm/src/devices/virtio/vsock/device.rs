//! The virtio-vsock device: RX, TX and event queues in guest memory, served on the vCPU thread.
//!
//! The guest has no interrupts. It kicks the TX queue (an MMIO write) to send, and reads the
//! wait register to sleep: [`VsockDevice::wait`] serves TX, delivers what it can to RX, and if
//! nothing was delivered blocks in the muxer's epoll until the host side produces something.
//! A guest that waits after queueing its packets needs no kick at all: one exit per round trip.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulwark_abi::ports::wait_result;
use bulwark_abi::virtio::vsock::{DEVICE_ID, F_STREAM, QUEUE_COUNT, QUEUE_MAX_SIZE};
use bulwark_abi::vsock::{HEADER_LEN, MAX_PACKET_DATA};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};

use super::muxer::{Muxer, MuxerError};
use super::packet;
use crate::devices::DeviceState;
use crate::devices::virtio::{DeviceFault, VirtioDevice};
use crate::memory::GuestMemory;

const RX: usize = bulwark_abi::virtio::vsock::RX_QUEUE as usize;
const TX: usize = bulwark_abi::virtio::vsock::TX_QUEUE as usize;
// virtio-vsock's header is the ABI's.
const _: () = assert!(HEADER_LEN as usize == PKT_HEADER_SIZE);

/// The vsock device.
pub struct VsockDevice {
    cid: u64,
    muxer: Muxer,
    mem: Option<GuestMemory>,
    queues: Vec<Queue>,
    queue_sizes: [u16; QUEUE_COUNT],
}

impl VsockDevice {
    /// A device for guest CID `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        Ok(Self {
            cid,
            muxer: Muxer::new(uds_path, cid)?,
            mem: None,
            queues: Vec::new(),
            queue_sizes: [QUEUE_MAX_SIZE; QUEUE_COUNT],
        })
    }

    /// Lets the guest connect to host ports (see [`Muxer::allow_guest_connections`]).
    pub fn allow_guest_connections(&mut self) {
        self.muxer.allow_guest_connections();
    }

    /// Leaves the socket file in place when the device is dropped (see
    /// [`Muxer::keep_socket_file`]).
    pub fn keep_socket_file(&mut self) {
        self.muxer.keep_socket_file();
    }

    /// The host side, for inspection.
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Takes every packet the guest put on the TX queue. Returns how many.
    fn process_tx(&mut self) -> Result<u32, DeviceFault> {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(TX)) else {
            return Ok(0);
        };
        let mut count = 0;
        loop {
            let next = queue
                .iter(mem)
                .map_err(|e| DeviceFault(format!("vsock TX queue: {e}")))?
                .next();
            let Some(mut chain) = next else { break };
            let head = chain.head_index();
            let pkt = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA)
                .map_err(|e| DeviceFault(format!("vsock TX descriptor chain at {head}: {e}")))?;
            let hdr = packet::read_header(&pkt);
            let data = match (hdr.len, pkt.data_slice()) {
                (0, _) => None,
                (len, Some(d)) if d.len() >= len as usize => d.subslice(0, len as usize).ok(),
                (len, _) => {
                    return Err(DeviceFault(format!(
                        "vsock TX packet at {head} claims {len} bytes its buffer does not hold"
                    )));
                }
            };
            self.muxer.handle_guest_packet(&hdr, data.as_ref());
            queue
                .add_used(mem, head, 0)
                .map_err(|e| DeviceFault(format!("vsock TX used ring: {e}")))?;
            count += 1;
        }
        Ok(count)
    }

    /// Fills RX buffers with what the host side has for the guest. Returns how many.
    fn process_rx(&mut self) -> Result<u32, DeviceFault> {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(RX)) else {
            return Ok(0);
        };
        let mut count = 0;
        while self.muxer.has_work() {
            let next = queue
                .iter(mem)
                .map_err(|e| DeviceFault(format!("vsock RX queue: {e}")))?
                .next();
            let Some(mut chain) = next else { break };
            let head = chain.head_index();
            let mut pkt = VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA)
                .map_err(|e| DeviceFault(format!("vsock RX descriptor chain at {head}: {e}")))?;
            let data = pkt
                .data_slice()
                .and_then(|d| d.subslice(0, d.len().min(MAX_PACKET_DATA as usize)).ok());
            let Some(mut hdr) = self.muxer.next_packet_for_guest(data.as_ref()) else {
                queue.go_to_previous_position();
                break;
            };
            hdr.dst_cid = self.cid;
            packet::write_header(&hdr, &mut pkt)
                .map_err(|e| DeviceFault(format!("vsock RX header at {head}: {e}")))?;
            queue
                .add_used(mem, head, HEADER_LEN + hdr.len)
                .map_err(|e| DeviceFault(format!("vsock RX used ring: {e}")))?;
            count += 1;
        }
        Ok(count)
    }

    /// Closes every connection (see [`Muxer::drop_connections`]).
    pub fn drop_connections(&mut self) {
        self.muxer.drop_connections();
    }

    /// The guest waits: serve TX, deliver to RX, and block until something was delivered,
    /// `stop` or `attention` is set, or `limit` (if any) passed. Returns the [`wait_result`]
    /// bits.
    pub fn wait(
        &mut self,
        stop: &AtomicBool,
        attention: &AtomicBool,
        limit: Option<Duration>,
    ) -> Result<u32, DeviceFault> {
        let deadline = limit.map(|l| Instant::now() + l);
        if self.mem.is_none() {
            return Ok(if limit.is_some() {
                wait_result::TIMED_OUT
            } else {
                0
            });
        }
        let sent = self.process_tx()?;
        let tx_bit = if sent > 0 { wait_result::VSOCK_TX } else { 0 };
        // Take what the host already has without blocking first.
        let mut timeout = 0;
        loop {
            self.muxer
                .poll(timeout)
                .map_err(|e| DeviceFault(format!("vsock epoll: {e}")))?;
            if self.process_rx()? > 0 {
                return Ok(tx_bit | wait_result::VSOCK_RX);
            }
            if stop.load(Ordering::Acquire)
                || attention.load(Ordering::Acquire)
                || (self.muxer.has_work() && timeout != 0)
            {
                // Stopping, wanted by the VMM, or work is pending that the guest gave no RX
                // buffers for.
                return Ok(tx_bit);
            }
            timeout = match deadline {
                None => -1,
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(tx_bit | wait_result::TIMED_OUT);
                    }
                    // epoll counts milliseconds: round up, so the bound is never cut short.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_STREAM
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The configuration space is the guest's CID alone (at `CONFIG_GUEST_CID`, 0).
        const _: () = assert!(bulwark_abi::virtio::vsock::CONFIG_GUEST_CID == 0);
        let config = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|a| usize::try_from(a).ok());
            *b = at.and_then(|a| config.get(a)).copied().unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        _features: u64,
    ) -> Result<(), DeviceFault> {
        if queues.len() != QUEUE_COUNT {
            return Err(DeviceFault(format!(
                "vsock needs {QUEUE_COUNT} queues, got {}",
                queues.len()
            )));
        }
        self.mem = Some(mem);
        self.queues = queues;
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) -> Result<(), DeviceFault> {
        if index as usize == TX {
            self.process_tx()?;
        }
        // Data the host sent meanwhile, and answers to what was just sent, go out at once.
        self.muxer
            .poll(0)
            .map_err(|e| DeviceFault(format!("vsock epoll: {e}")))?;
        self.process_rx()?;
        Ok(())
    }

    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
    }

    fn save(&self) -> DeviceState {
        let queues: Vec<QueueState> = self.queues.iter().map(Queue::state).collect();
        Box::new((self.mem.clone(), queues))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceFault> {
        let (mem, queues) = state
            .downcast_ref::<(Option<GuestMemory>, Vec<QueueState>)>()
            .ok_or_else(|| DeviceFault("not a vsock device's state".into()))?;
        self.queues = queues
            .iter()
            .map(|q| Queue::try_from(*q))
            .collect::<Result<_, _>>()
            .map_err(|e| DeviceFault(format!("a saved vsock queue: {e:?}")))?;
        self.mem.clone_from(mem);
        self.muxer.drop_connections();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::Duration;

    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::vsock::packet::{Header, SHUTDOWN_SEND, TYPE_STREAM, op};

    const QSIZE: u16 = 16;
    const QBASE: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
    const MEM_SIZE: usize = 4 << 20;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const GUEST: u64 = 3;
    const HOST: u64 = bulwark_abi::vsock::HOST_CID;

    struct Rig {
        mem: GuestMemory,
        dev: VsockDevice,
        next_desc: [u16; 3],
        /// (available ring, used ring) addresses of each queue.
        rings: [(u64, u64); 3],
        next_buf: u64,
        used_seen: [u16; 3],
        path: PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
        }
    }

    /// A guest packet from guest port `src` to host port `dst`.
    fn guest_pkt(op: u16, src: u32, dst: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST,
            src_port: src,
            dst_port: dst,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    impl Rig {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("bulwark-vsock-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("v.sock");
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let mut dev = VsockDevice::new(GUEST, &path).unwrap();
            dev.allow_guest_connections();
            // Creating a mock queue zeroes its rings: do it once, then keep the addresses.
            let mocks = QBASE.map(|b| MockSplitQueue::create(&mem, GuestAddress(b), QSIZE));
            let rings = [0, 1, 2].map(|i| (mocks[i].avail_addr().0, mocks[i].used_addr().0));
            let queues = mocks
                .iter()
                .map(|m| m.create_queue::<Queue>().unwrap())
                .collect();
            dev.activate(mem.clone(), queues, 0).unwrap();
            Self {
                mem,
                dev,
                next_desc: [0; 3],
                rings,
                next_buf: 0x10_0000,
                used_seen: [0; 3],
                path,
            }
        }

        /// Makes a chain of `(addr, len, flags)` descriptors available on queue `q`.
        fn push(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
            let first = self.next_desc[q];
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i == descs.len() - 1;
                    let flags = if last { flags } else { flags | F_NEXT };
                    let next = (first + u16::try_from(i).unwrap() + 1) % QSIZE;
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect();
            self.publish(q, first, &raw);
            self.next_desc[q] = (first + u16::try_from(descs.len()).unwrap()) % QSIZE;
        }

        /// Writes `raw` into queue `q`'s descriptor table from index `first` and puts `first`
        /// on the available ring.
        fn publish(&self, q: usize, first: u16, raw: &[RawDescriptor]) {
            for (i, d) in raw.iter().enumerate() {
                let slot = u64::from((first + u16::try_from(i).unwrap()) % QSIZE);
                self.mem
                    .write_obj(*d, GuestAddress(QBASE[q] + slot * 16))
                    .unwrap();
            }
            let avail = self.rings[q].0;
            let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
            let slot = u64::from(idx % QSIZE);
            self.mem
                .write_obj(first, GuestAddress(avail + 4 + slot * 2))
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let at = self.next_buf;
            self.next_buf += len.next_multiple_of(0x1000);
            at
        }

        /// The guest sends a packet: header and data in two descriptors.
        fn send(&mut self, hdr: Header, data: &[u8]) {
            let h = self.alloc(u64::from(HEADER_LEN));
            self.mem
                .write_slice(&hdr.encode(), GuestAddress(h))
                .unwrap();
            if data.is_empty() {
                self.push(TX, &[(h, HEADER_LEN, 0)]);
            } else {
                let d = self.alloc(data.len() as u64);
                self.mem.write_slice(data, GuestAddress(d)).unwrap();
                self.push(
                    TX,
                    &[
                        (h, HEADER_LEN, 0),
                        (d, u32::try_from(data.len()).unwrap(), 0),
                    ],
                );
            }
        }

        /// The guest offers an RX buffer (one descriptor, header and data).
        fn offer_rx(&mut self) -> u64 {
            let at = self.alloc(0x1000);
            self.push(RX, &[(at, 0x1000, F_WRITE)]);
            at
        }

        /// New used-ring entries of queue `q` since the last call: (descriptor id, length).
        fn new_used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let base = self.rings[q].1;
            let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).unwrap();
            let mut out = Vec::new();
            while self.used_seen[q] != idx {
                let slot = u64::from(self.used_seen[q] % QSIZE);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(base + 4 + slot * 8))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(base + 8 + slot * 8))
                    .unwrap();
                out.push((id, len));
                self.used_seen[q] = self.used_seen[q].wrapping_add(1);
            }
            out
        }

        /// Delivers one packet to the guest through a fresh RX buffer and decodes it.
        fn receive(&mut self) -> (Header, Vec<u8>) {
            let at = self.offer_rx();
            for _ in 0..100 {
                self.dev.muxer.poll(10).unwrap();
                if self.dev.process_rx().unwrap() > 0 {
                    break;
                }
            }
            let used = self.new_used(RX);
            assert_eq!(used.len(), 1, "one RX buffer used");
            let mut raw = vec![0u8; used[0].1 as usize];
            self.mem.read_slice(&mut raw, GuestAddress(at)).unwrap();
            let hdr = Header::decode(raw[..PKT_HEADER_SIZE].try_into().unwrap());
            assert_eq!(hdr.len as usize, raw.len() - PKT_HEADER_SIZE);
            (hdr, raw[PKT_HEADER_SIZE..].to_vec())
        }

        fn tx(&mut self) -> Result<u32, DeviceFault> {
            self.dev.process_tx()
        }
    }

    fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn host_client_connects_exchanges_data_and_closes() {
        let mut rig = Rig::new("host");
        let mut client = UnixStream::connect(&rig.path).unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        let (req, _) = rig.receive();
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.dst_port),
            (op::REQUEST, HOST, GUEST, 1234)
        );
        let host_port = req.src_port;

        rig.send(guest_pkt(op::RESPONSE, 1234, host_port, 0), &[]);
        assert_eq!(rig.tx(), Ok(1));
        assert_eq!(
            read_exactly(&mut client, 14),
            format!("OK {host_port}\n").as_bytes()
        );

        rig.send(guest_pkt(op::RW, 1234, host_port, 5), b"hello");
        rig.tx().unwrap();
        assert_eq!(read_exactly(&mut client, 5), b"hello");
        assert_eq!(rig.new_used(TX).len(), 2);

        client.write_all(b"world").unwrap();
        let (rw, data) = rig.receive();
        assert_eq!((rw.op, rw.src_port, rw.dst_port), (op::RW, host_port, 1234));
        assert_eq!(data, b"world");
        assert_eq!(rw.fwd_cnt, 5, "the host consumed the guest's 5 bytes");

        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (shut, _) = rig.receive();
        assert_eq!((shut.op, shut.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        rig.send(guest_pkt(op::SHUTDOWN, 1234, host_port, 0), &[]);
        let mut shut_both = guest_pkt(op::SHUTDOWN, 1234, host_port, 0);
        shut_both.flags = 3;
        rig.send(shut_both, &[]);
        rig.tx().unwrap();
        let (rst, _) = rig.receive();
        assert_eq!(rst.op, op::RST);
        assert_eq!(rig.dev.muxer().connection_count(), 0);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the host client sees EOF");
    }

    #[test]
    fn guest_connects_to_a_host_listener_or_gets_rst() {
        let mut rig = Rig::new("guest");
        let listener = UnixListener::bind(format!("{}_5000", rig.path.display())).unwrap();
        rig.send(guest_pkt(op::REQUEST, 777, 5000, 0), &[]);
        rig.tx().unwrap();
        let (resp, _) = rig.receive();
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (op::RESPONSE, 5000, 777)
        );
        let (mut server, _) = listener.accept().unwrap();
        rig.send(guest_pkt(op::RW, 777, 5000, 3), b"abc");
        rig.tx().unwrap();
        assert_eq!(read_exactly(&mut server, 3), b"abc");

        rig.send(guest_pkt(op::REQUEST, 778, 5001, 0), &[]);
        rig.tx().unwrap();
        let (rst, _) = rig.receive();
        assert_eq!((rst.op, rst.dst_port), (op::RST, 778));
    }

    #[test]
    fn a_connect_to_a_closed_guest_port_ends_the_host_client() {
        let mut rig = Rig::new("refused");
        let mut client = UnixStream::connect(&rig.path).unwrap();
        client.write_all(b"CONNECT 9\n").unwrap();
        let (req, _) = rig.receive();
        let mut rst = guest_pkt(op::RST, 9, req.src_port, 0);
        rst.buf_alloc = 0;
        rig.send(rst, &[]);
        rig.tx().unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no OK line, just EOF");
        let mut bad = UnixStream::connect(&rig.path).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        rig.dev.muxer.poll(100).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            bad.read(&mut [0u8; 8]).unwrap(),
            0,
            "a bad CONNECT line closes the client"
        );
    }

    #[test]
    fn protocol_errors_are_answered_with_rst() {
        let mut rig = Rig::new("rst");
        rig.send(guest_pkt(99, 1, 2, 0), &[]);
        let mut wrong_cid = guest_pkt(op::REQUEST, 1, 2, 0);
        wrong_cid.src_cid = 42;
        rig.send(wrong_cid, &[]);
        rig.send(guest_pkt(op::RW, 5, 6, 2), b"hi");
        assert_eq!(rig.tx(), Ok(3));
        for _ in 0..3 {
            assert_eq!(rig.receive().0.op, op::RST);
        }
    }

    fn expect_fault(rig: &mut Rig, what: &str) {
        match rig.tx() {
            Err(DeviceFault(msg)) => assert!(msg.contains("vsock TX"), "{what}: {msg}"),
            Ok(n) => panic!("{what}: accepted as {n} packets"),
        }
    }

    #[test]
    fn a_descriptor_outside_guest_ram_breaks_the_device() {
        let mut rig = Rig::new("oob");
        rig.push(TX, &[(MEM_SIZE as u64 - 8, HEADER_LEN, 0)]);
        expect_fault(&mut rig, "header past the end of RAM");
        let mut rig = Rig::new("overflow");
        rig.push(TX, &[(u64::MAX - 10, HEADER_LEN, 0)]);
        expect_fault(&mut rig, "address + length overflows");
    }

    #[test]
    fn malformed_chains_break_the_device() {
        let mut rig = Rig::new("wo");
        let h = rig.alloc(64);
        rig.mem
            .write_slice(&guest_pkt(op::REQUEST, 1, 2, 0).encode(), GuestAddress(h))
            .unwrap();
        rig.push(TX, &[(h, HEADER_LEN, F_WRITE)]);
        expect_fault(&mut rig, "write-only TX buffer");

        let mut rig = Rig::new("short");
        let h = rig.alloc(64);
        rig.mem
            .write_slice(&guest_pkt(op::RW, 1, 2, 100).encode(), GuestAddress(h))
            .unwrap();
        let d = rig.alloc(16);
        rig.push(TX, &[(h, HEADER_LEN, 0), (d, 10, 0)]);
        expect_fault(&mut rig, "packet longer than its buffer");

        let mut rig = Rig::new("huge");
        let h = rig.alloc(64);
        rig.mem
            .write_slice(&guest_pkt(op::RW, 1, 2, u32::MAX).encode(), GuestAddress(h))
            .unwrap();
        rig.push(TX, &[(h, HEADER_LEN, 0), (h, u32::MAX, 0)]);
        expect_fault(&mut rig, "length beyond the maximum packet");

        let mut rig = Rig::new("tiny");
        let h = rig.alloc(64);
        rig.push(TX, &[(h, 8, 0)]);
        expect_fault(&mut rig, "header descriptor too small");

        let mut rig = Rig::new("dangling");
        let h = rig.alloc(64);
        rig.mem
            .write_slice(&guest_pkt(op::RW, 1, 2, 4).encode(), GuestAddress(h))
            .unwrap();
        // The header says data follows, but NEXT points past the descriptor table.
        let raw = [RawDescriptor::from(Descriptor::new(
            h, HEADER_LEN, F_NEXT, 99,
        ))];
        rig.publish(TX, 0, &raw);
        expect_fault(&mut rig, "next index outside the table");
    }

    #[test]
    fn a_looping_chain_or_a_runaway_avail_index_cannot_hang_the_device() {
        let mut rig = Rig::new("loop");
        let h = rig.alloc(64);
        rig.mem
            .write_slice(&guest_pkt(op::RW, 1, 2, 4).encode(), GuestAddress(h))
            .unwrap();
        // Two descriptors pointing at each other forever.
        let raw = [
            RawDescriptor::from(Descriptor::new(h, HEADER_LEN, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(h, HEADER_LEN, F_NEXT, 0)),
        ];
        rig.publish(TX, 0, &raw);
        // The packet is parsed from its first two descriptors; the loop is never followed.
        let _ = rig.tx();

        let mut rig = Rig::new("avail");
        rig.mem
            .write_obj(QSIZE + 5, GuestAddress(rig.rings[TX].0 + 2))
            .unwrap();
        expect_fault(&mut rig, "avail index more than a queue ahead");
    }

    #[test]
    fn wait_returns_when_stopped_and_when_data_arrives() {
        let mut rig = Rig::new("wait");
        let stop = AtomicBool::new(true);
        assert_eq!(rig.dev.wait(&stop, &AtomicBool::new(false), None), Ok(0));
        stop.store(false, Ordering::Release);
        // With nothing to deliver, a bounded wait ends when its bound passes.
        let started = Instant::now();
        assert_eq!(
            rig.dev.wait(
                &stop,
                &AtomicBool::new(false),
                Some(Duration::from_millis(30))
            ),
            Ok(wait_result::TIMED_OUT)
        );
        assert!(started.elapsed() >= Duration::from_millis(30), "cut short");
        let mut client = UnixStream::connect(&rig.path).unwrap();
        client.write_all(b"CONNECT 1\n").unwrap();
        rig.offer_rx();
        assert_eq!(
            rig.dev.wait(
                &stop,
                &AtomicBool::new(false),
                Some(Duration::from_secs(60))
            ),
            Ok(wait_result::VSOCK_RX),
            "data ends a bounded wait before its bound"
        );
        client.set_nonblocking(true).unwrap();
        match client.read(&mut [0u8; 1]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the client waits for the guest's answer, got {other:?}"),
        }
    }
}
