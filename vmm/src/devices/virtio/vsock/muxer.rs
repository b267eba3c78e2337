//! The host side of the vsock device: the Unix listener, the clients still sending their
//! `CONNECT` line, every established connection, and one epoll set for all of them.
//!
//! The muxer never blocks except in [`Muxer::poll`], which the vCPU thread calls when the guest
//! waits; everything it sends to the guest is pulled by the device from
//! [`Muxer::next_packet_for_guest`] into the guest's RX buffers.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use bulwark_abi::vsock::HOST_CID;
use bulwark_abi::vsock::handshake::{self, parse_connect};
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, State};
use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Most connections at once; requests beyond are refused with RST.
pub const MAX_CONNECTIONS: usize = 512;
/// Most host clients that have connected but not yet sent their `CONNECT` line.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// First host-side port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most packets waiting for the guest's RX buffers. A guest that sends but never reads cannot
/// make the VMM queue answers without bound: past this, answers are dropped.
pub const MAX_CONTROL_QUEUE: usize = 4096;
/// Epoll token of the listener (the others are file descriptors).
const LISTENER: u64 = u64::MAX;

/// (host-side port, guest-side port).
type Key = (u32, u32);

/// A host client that has not finished its `CONNECT <port>\n` line.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The host side of the device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    clients: HashMap<RawFd, PendingClient>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    readable: VecDeque<Key>,
    control: VecDeque<Header>,
    next_local_port: u32,
    /// Whether dropping the muxer removes the socket file (not in a confined VMM, which has no
    /// file-system access left: whoever chose the path removes it).
    remove_socket_file: bool,
    /// Whether the guest may open connections to host sockets (`PATH_<port>`); off, each such
    /// request is refused with RST and no host socket is touched.
    guest_connections: bool,
}

/// Errors from setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The Unix socket path is taken.
    #[error("vsock socket {0} already exists: remove it, or pick another --vsock-uds path")]
    PathExists(PathBuf),
    /// Binding or epoll setup failed.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl Muxer {
    /// Listens on `uds_path` for a guest with CID `guest_cid`.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, MuxerError> {
        if uds_path.exists() && !remove_stale_socket(uds_path) {
            return Err(MuxerError::PathExists(uds_path.to_owned()));
        }
        let listen_err = |source| MuxerError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        // Bind under a temporary name and rename into place, so a client that sees the path
        // always finds a listening socket (between bind and listen a connect is refused).
        let mut tmp_name = uds_path.as_os_str().to_owned();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(listen_err)?;
        if let Err(e) = std::fs::rename(&tmp, uds_path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(listen_err(e));
        }
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(listen_err)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(listen_err)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            clients: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            readable: VecDeque::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            remove_socket_file: true,
            guest_connections: false,
        })
    }

    /// Lets the guest open connections to host ports: a request for port P connects to the
    /// Unix socket `<path>_P`. Off by default: a tool call needs only host-initiated
    /// connections, and a VMM that never connects needs no `socket`/`connect` calls.
    pub fn allow_guest_connections(&mut self) {
        self.guest_connections = true;
    }

    /// Leaves the socket file in place when the muxer is dropped (a confined VMM cannot remove
    /// it; the caller that chose the path does).
    pub fn keep_socket_file(&mut self) {
        self.remove_socket_file = false;
    }

    /// Number of open connections (for tests and reports).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Closes every connection and pending client and forgets what was queued for the guest:
    /// the guest is being put back to a state with no connection ([`crate::reset`]). The
    /// listening socket stays. Closed sockets leave the epoll set as they close.
    pub fn drop_connections(&mut self) {
        self.conns.clear();
        self.by_fd.clear();
        self.clients.clear();
        self.readable.clear();
        self.control.clear();
    }

    /// Whether nothing is connected or connecting: no connection, no pending client, nothing
    /// queued for the guest.
    pub fn is_idle(&self) -> bool {
        self.conns.is_empty() && self.clients.is_empty() && self.control.is_empty()
    }

    /// Whether a packet is waiting to go to the guest.
    pub fn has_work(&self) -> bool {
        !self.control.is_empty()
            || self
                .readable
                .iter()
                .any(|k| self.conns.get(k).is_some_and(Connection::wants_rx))
    }

    /// A header addressed to the guest, from `key`'s host port to its guest port.
    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    /// Queues a packet without payload for the guest, stamped with the connection's credit.
    fn queue_control(&mut self, key: Key, op: u16, flags: u32) {
        let mut hdr = self.header(key, op);
        hdr.flags = flags;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.stamp(&mut hdr);
        }
        self.push_control(hdr);
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() < MAX_CONTROL_QUEUE {
            self.control.push_back(hdr);
        }
    }

    /// Drops a connection (closing its socket) and tells the guest with RST.
    fn reset(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_fd.remove(&conn.stream.as_raw_fd());
        }
        self.push_control(self.header(key, op::RST));
    }

    fn mark_readable(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.host_readable = true;
            if conn.wants_rx() && !conn.rx_queued {
                conn.rx_queued = true;
                self.readable.push_back(key);
            }
        }
    }

    /// Handles one packet the guest sent. Anything malformed or unexpected is answered with RST
    /// (never with an error for the VMM).
    pub fn handle_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.push_control(self.header(key, op::RST));
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.update_peer_credit(hdr);
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(key),
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(conn) if conn.state == State::Connecting => {
                    conn.state = State::Established;
                    let line = handshake::ok_line(key.0);
                    // A fresh socket's buffer always takes these few bytes.
                    if conn.stream.write_all(line.as_bytes()).is_err() {
                        self.reset(key);
                    } else {
                        self.mark_readable(key);
                    }
                }
                _ => self.reset(key),
            },
            op::RW => self.guest_data(key, data),
            op::SHUTDOWN => self.guest_shutdown(key, hdr.flags),
            op::RST => {
                if let Some(conn) = self.conns.remove(&key) {
                    self.by_fd.remove(&conn.stream.as_raw_fd());
                }
            }
            op::CREDIT_UPDATE => self.mark_readable_if_known(key),
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.queue_control(key, op::CREDIT_UPDATE, 0);
                } else {
                    self.reset(key);
                }
            }
            _ => self.reset(key),
        }
    }

    fn mark_readable_if_known(&mut self, key: Key) {
        match self.conns.get(&key) {
            Some(conn) if conn.host_readable => self.mark_readable(key),
            Some(_) => {}
            None => self.reset(key),
        }
    }

    /// The guest asks for a connection to host port `key.0`: the Unix socket `<path>_<port>`.
    fn guest_connect(&mut self, key: Key) {
        if !self.guest_connections
            || self.conns.contains_key(&key)
            || self.conns.len() >= MAX_CONNECTIONS
        {
            self.reset(key);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        // Never blocks: nothing listening, a full backlog or a path too long is a refusal.
        let Ok(stream) = connect_nonblocking(&path) else {
            self.push_control(self.header(key, op::RST));
            return;
        };
        let fd = stream.as_raw_fd();
        if self
            .epoll
            .ctl(ControlOperation::Add, fd, fd_event(fd))
            .is_err()
        {
            self.push_control(self.header(key, op::RST));
            return;
        }
        self.conns.insert(
            key,
            Connection::new(stream, key.0, key.1, State::Established),
        );
        self.by_fd.insert(fd, key);
        self.queue_control(key, op::RESPONSE, 0);
    }

    fn guest_data<B: BitmapSlice>(&mut self, key: Key, data: Option<&VolatileSlice<'_, B>>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset(key);
            return;
        };
        if conn.state != State::Established || conn.peer_shut_send {
            self.reset(key);
            return;
        }
        if let Some(Err(_)) = data.map(|d| conn.send_to_host(d)) {
            self.reset(key);
            return;
        }
        if conn.needs_credit_update() {
            self.queue_control(key, op::CREDIT_UPDATE, 0);
        }
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.reset(key);
            return;
        };
        conn.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        conn.peer_shut_recv |= flags & SHUTDOWN_RCV != 0;
        if conn.flush().is_err() {
            self.reset(key);
            return;
        }
        self.close_if_done(key);
    }

    /// A connection both sides have finished with is closed, and the guest told with RST.
    fn close_if_done(&mut self, key: Key) {
        let done = self.conns.get(&key).is_some_and(|c| {
            !c.has_pending() && c.peer_shut_send && (c.peer_shut_recv || c.host_eof)
        });
        if done {
            self.reset(key);
        }
    }

    /// Fills the next packet for the guest: a control packet, or host data read into `buf`.
    /// Returns `None` if there is nothing to send.
    pub fn next_packet_for_guest<B: BitmapSlice>(
        &mut self,
        buf: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        let buf = buf?;
        while let Some(key) = self.readable.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.rx_queued = false;
            if !conn.wants_rx() {
                continue;
            }
            let n = conn.read_from_host(buf);
            if n > 0 {
                let requeue = conn.wants_rx();
                let mut hdr = self.header(key, op::RW);
                hdr.len = n;
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.stamp(&mut hdr);
                }
                if requeue {
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.rx_queued = true;
                    }
                    self.readable.push_back(key);
                }
                return Some(hdr);
            }
            if conn.host_eof {
                // The host will send no more: tell the guest, and close if it is done too.
                self.queue_control(key, op::SHUTDOWN, SHUTDOWN_SEND);
                self.close_if_done(key);
                return self.control.pop_front();
            }
        }
        None
    }

    /// Waits up to `timeout_ms` (-1: no limit) for host events and handles them: new clients,
    /// `CONNECT` lines, readable or writable connections. An interrupted wait returns `Ok`.
    pub fn poll(&mut self, timeout_ms: i32) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            match event.data() {
                LISTENER => self.accept_clients(),
                // Every other token is a descriptor (see `fd_event`).
                token => {
                    if let Ok(fd) = RawFd::try_from(token) {
                        self.fd_event(fd);
                    }
                }
            }
        }
        Ok(())
    }

    fn accept_clients(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let full =
                self.clients.len() >= MAX_PENDING_CLIENTS || self.conns.len() >= MAX_CONNECTIONS;
            if full || stream.set_nonblocking(true).is_err() {
                continue; // dropping the stream closes it: the client sees EOF
            }
            let fd = stream.as_raw_fd();
            if self
                .epoll
                .ctl(ControlOperation::Add, fd, fd_event(fd))
                .is_ok()
            {
                self.clients.insert(
                    fd,
                    PendingClient {
                        stream,
                        line: Vec::new(),
                    },
                );
                // Data may have arrived before registration; edge-triggered epoll won't say so.
                self.client_readable(fd);
            }
        }
    }

    fn fd_event(&mut self, fd: RawFd) {
        if self.clients.contains_key(&fd) {
            self.client_readable(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let flushed = self.conns.get_mut(&key).map(Connection::flush);
        if let Some(Err(_)) = flushed {
            self.reset(key);
            return;
        }
        // The host took buffered guest data: tell the guest its credit grew.
        if self
            .conns
            .get(&key)
            .is_some_and(Connection::needs_credit_update)
        {
            self.queue_control(key, op::CREDIT_UPDATE, 0);
        }
        self.close_if_done(key);
        self.mark_readable(key);
    }

    /// Reads a client's `CONNECT <port>\n` line; a complete one becomes a connection request to
    /// the guest, a bad one closes the client.
    fn client_readable(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the newline (the client's first data) is consumed.
        let outcome = loop {
            match client.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(Some(parse_connect(&client.line))),
                Ok(_) if client.line.len() >= handshake::MAX_LINE => break Err(()),
                Ok(_) => client.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(Some(port))) => {
                if let Some(client) = self.clients.remove(&fd) {
                    self.host_connect(client.stream, port);
                }
            }
            Ok(Some(None)) | Err(()) => {
                self.clients.remove(&fd);
            }
        }
    }

    /// A host client asked for guest port `port`: send REQUEST and wait for the guest's answer.
    fn host_connect(&mut self, stream: UnixStream, port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return;
        }
        let mut local = self.next_local_port;
        while self.conns.contains_key(&(local, port)) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local, port);
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns
            .insert(key, Connection::new(stream, local, port, State::Connecting));
        self.queue_control(key, op::REQUEST, 0);
    }
}

/// The epoll registration of an accepted or connected socket `fd`: edge-triggered reads and
/// writes, with the descriptor as its token (open descriptors are never negative, so a token
/// never meets [`LISTENER`]'s).
fn fd_event(fd: RawFd) -> EpollEvent {
    EpollEvent::new(
        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
        u64::from(fd.unsigned_abs()),
    )
}

/// Connects a new non-blocking, close-on-exec stream socket to the Unix socket at `path`,
/// without ever waiting.
///
/// A Unix-domain `connect` on Linux completes at once or fails: it is never left in progress
/// (no `EINPROGRESS` to wait on with epoll). When the listener's backlog is full, a blocking
/// socket would sleep until the host program accepts, stalling the vCPU thread and every other
/// connection with it; a non-blocking one fails with `EAGAIN`. That, like any other failure, is
/// returned, and the caller refuses the guest's request with RST, as a TCP stack does under a
/// SYN flood: the guest may retry. Retrying here instead would need a timer the muxer does not
/// have, and would let a guest keep host work queued.
fn connect_nonblocking(path: &OsStr) -> io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The path and its terminating NUL must fit; a NUL inside would name another socket.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX)
        .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: socket(2) with constant arguments; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and `len` is at most its size; `fd` is open.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Removes `path` if it is a Unix socket nobody listens on (one a confined VMM left behind);
/// anything else at the path is left alone. Returns whether the path is free now.
fn remove_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return false;
    }
    // Non-blocking: a live listener with a full backlog must not stall start-up.
    match connect_nonblocking(path.as_os_str()) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if self.remove_socket_file {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The type of "no data" for `handle_guest_packet`.
    fn no_data<'a>() -> Option<&'a VolatileSlice<'a, ()>> {
        None
    }

    #[test]
    fn only_a_socket_nobody_listens_on_is_removed() {
        let dir = std::env::temp_dir().join(format!("bulwark-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(remove_stale_socket(&stale) && !stale.exists());
        let live = dir.join("live.sock");
        let listener = UnixListener::bind(&live).unwrap();
        assert!(!remove_stale_socket(&live) && live.exists());
        drop(listener);
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(!remove_stale_socket(&file) && file.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn answers_to_a_guest_that_never_reads_are_bounded() {
        let dir = std::env::temp_dir().join(format!("bulwark-muxer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Muxer::new(&dir.join("m.sock"), 3).unwrap();
        let bogus = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1,
            dst_port: 2,
            type_: TYPE_STREAM,
            op: 99,
            ..Header::default()
        };
        for _ in 0..MAX_CONTROL_QUEUE + 1000 {
            m.handle_guest_packet(&bogus, no_data());
        }
        assert_eq!(m.control.len(), MAX_CONTROL_QUEUE);
        assert_eq!(
            m.next_packet_for_guest(no_data()).map(|h| h.op),
            Some(op::RST)
        );
        drop(m);
        assert!(
            !dir.join("m.sock").exists(),
            "the socket is removed with the muxer"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_guest_connection_to_a_full_backlog_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("bulwark-muxer-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Muxer::new(&dir.join("m.sock"), 3).unwrap();
        m.allow_guest_connections();
        let host = dir.join("m.sock_5000");
        let listener = UnixListener::bind(&host).unwrap();
        listener.set_nonblocking(true).unwrap();
        // SAFETY: listen(2) again on our own listening socket only shrinks its backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let mut queued = Vec::new();
        let refused = loop {
            match connect_nonblocking(host.as_os_str()) {
                Ok(s) => queued.push(s),
                Err(e) => break e,
            }
            assert!(queued.len() < 10_000, "the backlog never filled");
        };
        assert_eq!(refused.raw_os_error(), Some(libc::EAGAIN), "{refused}");
        let request = |src_port| Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port: 5000,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            ..Header::default()
        };
        // On another thread, so a connect that blocks fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            m.handle_guest_packet(&request(7), no_data());
            let _ = tx.send(m);
        });
        let mut m = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the muxer blocked connecting to a full backlog");
        let answer = m.next_packet_for_guest(no_data()).unwrap();
        assert_eq!((answer.op, answer.dst_port), (op::RST, 7));
        assert_eq!(m.connection_count(), 0);
        // Once the host program accepts, the backlog has room and the next request connects.
        drop(queued);
        while listener.accept().is_ok() {}
        m.handle_guest_packet(&request(8), no_data());
        let answer = m.next_packet_for_guest(no_data()).unwrap();
        assert_eq!((answer.op, answer.dst_port), (op::RESPONSE, 8));
        assert_eq!(m.connection_count(), 1);
        drop(m);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn guest_connections_are_refused_unless_allowed() {
        let dir = std::env::temp_dir().join(format!("bulwark-muxer-off-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Muxer::new(&dir.join("m.sock"), 3).unwrap();
        let listener = UnixListener::bind(dir.join("m.sock_5000")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let request = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 9,
            dst_port: 5000,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            ..Header::default()
        };
        m.handle_guest_packet(&request, no_data());
        let answer = m.next_packet_for_guest(no_data()).unwrap();
        assert_eq!((answer.op, answer.dst_port), (op::RST, 9));
        assert!(
            listener.accept().is_err(),
            "nothing reached the host socket"
        );
        m.allow_guest_connections();
        m.handle_guest_packet(&request, no_data());
        let answer = m.next_packet_for_guest(no_data()).unwrap();
        assert_eq!((answer.op, answer.dst_port), (op::RESPONSE, 9));
        assert!(listener.accept().is_ok());
        drop(m);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_guest_connection_to_nothing_or_a_long_path_is_refused() {
        let long = format!("/tmp/{}", "x".repeat(200));
        let e = connect_nonblocking(OsStr::new(&long)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
        let e = connect_nonblocking(OsStr::new("/nonexistent/bulwark.sock")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
