//! The artifact given late, for warm VMs: a VMM started with `--artifact-later` boots its guest
//! with an empty artifact window and receives the artifact afterwards, on the Unix stream socket
//! that is its standard input (the caller's end of a socketpair).
//!
//! # Protocol
//!
//! The caller sends one message, in one `sendmsg`: [`HEADER_LEN`] bytes, the artifact's offset
//! in its file then its length (each a `u64`, little-endian), with exactly one descriptor
//! attached (`SCM_RIGHTS`): the artifact's file, open for reading. The VMM checks it as it
//! checks `--artifact-from-stdin` (a regular file holding the whole range, the offset a multiple
//! of 4096, at most [`layout::ARTIFACT_MAX_SIZE`] bytes), maps it `MAP_PRIVATE`/`PROT_READ`,
//! registers it as the artifact's memory slot, writes its length into the boot info's
//! `artifact_size` and answers one line: [`ANSWER_MAPPED`], or `ERR <reason>\n`.
//!
//! A VM takes one artifact. A message that is refused (no descriptor, several, another size,
//! a file or range the checks refuse) changes nothing: the caller may send a good one after it.
//! Once one is mapped, every further message is refused. Every descriptor received is closed
//! unless it became the mapping's. Closing the socket without sending anything is fine: the
//! guest then refuses calls that need an artifact until the VM is killed.
//!
//! # Commands (reusable VMs)
//!
//! A VMM started with `--reusable` also takes commands on this socket once its artifact is
//! mapped: a message of [`HEADER_LEN`] bytes with no descriptor, the command's 8-byte name
//! (`SNAPSHOT`, or `RESET` padded with NULs) then 8 zero bytes. Each is carried out on the vCPU
//! thread ([`crate::reset::session`]) and answered with one line: `OK snapshot <pages>\n`,
//! `OK reset <written> <copied> <zeroed> <micros>\n`, or `ERR <reason>\n`. After an `ERR`
//! the caller must not reuse the VM.
//!
//! # Order
//!
//! The guest learns of the artifact from the boot info only, and only reads it when a call
//! comes: the caller sends the call over vsock after it read [`ANSWER_MAPPED`]. The size is
//! written after the slot exists, so a guest that sees a non-zero size sees the memory too.
//!
//! # Where it runs
//!
//! On the VMM's main thread, after it is confined, while the vCPU thread runs the guest (most
//! often blocked on the wait register). Its seccomp allow-list has what this needs
//! ([`crate::confine`]): `recvmsg` and `sendto` on this socket only, `ppoll`, `fstat`, `mmap`,
//! `close`, and `KVM_SET_USER_MEMORY_REGION` on the VM's descriptor only. The socket is never
//! read or written blocking: a caller that sends but never reads cannot stall the thread that
//! enforces the timeout.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bulwark_abi::boot::BootInfo;
use bulwark_abi::layout;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::artifact::{ArtifactFile, ArtifactMapping};
use crate::memory::GuestMemory;
use crate::reset::session::{Command, ResetControl};

/// Bytes of a message: offset and length, `u64` little-endian each.
pub const HEADER_LEN: usize = 16;

/// The answer once the artifact is mapped.
pub const ANSWER_MAPPED: &[u8] = b"OK\n";

/// The start of a refusal's answer line; the reason and `\n` follow.
pub const ANSWER_REFUSED: &str = "ERR ";

/// Longest answer line, `\n` included.
pub const MAX_ANSWER: usize = 512;

/// Most descriptors one message's control buffer takes; more are closed by the kernel and the
/// message refused.
const MAX_FDS: usize = 8;

/// The control buffer, in `u64`s (8-aligned, as `cmsghdr` needs): one 16-byte header and
/// [`MAX_FDS`] 4-byte descriptors, no more (`CMSG_SPACE`).
const CONTROL_WORDS: usize = 2 + MAX_FDS / 2;
const _: () = assert!(MAX_FDS.is_multiple_of(2) && std::mem::size_of::<libc::cmsghdr>() == 16);

/// Why `--artifact-later`'s standard input is unusable.
#[derive(Debug, thiserror::Error)]
pub enum LateError {
    /// Not a Unix stream socket.
    #[error("standard input must be a Unix stream socket (the caller's socketpair end): {0}")]
    NotASocket(String),
}

/// The descriptors the confined main thread may use for the late artifact.
#[derive(Clone, Copy, Debug)]
pub struct LateFds {
    /// The socket the artifact comes on.
    pub socket: RawFd,
    /// The KVM VM's descriptor (for `KVM_SET_USER_MEMORY_REGION`).
    pub vm: RawFd,
}

/// What serving the socket did.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Nothing was there (yet).
    Nothing,
    /// A message was answered: the artifact's length if it was mapped, else the refusal.
    Answered(Result<u64, String>),
    /// A command was answered: the text after `OK ` or `ERR `.
    Commanded(Result<String, String>),
    /// The caller closed the socket (or it failed): it is not watched any more.
    Closed,
}

/// How long a snapshot or reset may take, from the command to its answer (the guest may have
/// to get back to its wait first).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The late artifact's socket and, once received, its mapping.
///
/// The mapping must outlive every run of the VM's vCPU: [`crate::Vm::run`] drops this after the
/// vCPU and the VM's descriptor.
#[derive(Debug)]
pub struct LateArtifact {
    socket: Arc<OwnedFd>,
    open: bool,
    readonly: bool,
    mapping: Option<ArtifactMapping>,
    /// With `--reusable`: where snapshot and reset commands go.
    reset: Option<ResetControl>,
}

impl LateArtifact {
    /// Watches `socket`, which must be a Unix stream socket. The slot will be read-only for the
    /// guest ([`LateArtifact::set_readonly`] says whether KVM can).
    pub fn new(socket: Arc<OwnedFd>) -> Result<Self, LateError> {
        let domain = sockopt(&socket, libc::SO_DOMAIN).map_err(|e| {
            LateError::NotASocket(if e.raw_os_error() == Some(libc::ENOTSOCK) {
                "it is not a socket".into()
            } else {
                e.to_string()
            })
        })?;
        let kind =
            sockopt(&socket, libc::SO_TYPE).map_err(|e| LateError::NotASocket(e.to_string()))?;
        if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
            return Err(LateError::NotASocket(format!(
                "it is a socket of domain {domain}, type {kind}"
            )));
        }
        Ok(Self {
            socket,
            open: true,
            readonly: true,
            mapping: None,
            reset: None,
        })
    }

    /// Whether the slot is made read-only for the guest (KVM_CAP_READONLY_MEM); the page
    /// tables map the window read-only either way.
    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly = readonly;
    }

    /// The descriptors the confined main thread uses, with `vm` the KVM VM's.
    pub fn fds(&self, vm: &VmFd) -> LateFds {
        LateFds {
            socket: self.socket.as_raw_fd(),
            vm: vm.as_raw_fd(),
        }
    }

    /// Takes snapshot and reset commands, handing them to `control` (a reusable VM).
    pub fn accept_commands(&mut self, control: ResetControl) {
        self.reset = Some(control);
    }

    /// Whether the socket is still watched (the caller has not closed it).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The mapped artifact's length, once there is one.
    pub fn mapped_len(&self) -> Option<u64> {
        self.mapping.as_ref().map(ArtifactMapping::len)
    }

    /// Waits up to `timeout` for something on the socket (a message, or its end); `true` if
    /// there is. A signal (SIGTERM) ends the wait early.
    pub fn readable(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask; ppoll writes only
        // `revents` of the pollfd.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        n > 0 && pfd.revents != 0
    }

    /// Reads one message without blocking and answers it: maps the artifact into `vm` (whose
    /// guest RAM is `mem`) if it is the first good one; carries out a command, calling `kick`
    /// to interrupt the vCPU thread until it takes it.
    pub fn serve(&mut self, vm: &VmFd, mem: &GuestMemory, kick: &dyn Fn()) -> Served {
        if !self.open {
            return Served::Nothing;
        }
        let message = match receive(&self.socket) {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.open = false;
                return Served::Closed;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                return Served::Nothing;
            }
            Err(_) => {
                self.open = false;
                return Served::Closed;
            }
        };
        let (served, line) = match command_of(&message) {
            Some(command) => {
                drop(message);
                let answer = self.command(command, kick);
                let line = match &answer {
                    Ok(text) => format!("OK {text}\n").into_bytes(),
                    Err(reason) => refusal_line(reason),
                };
                (Served::Commanded(answer), line)
            }
            None => {
                let result = self.take(message, vm, mem);
                let line = match &result {
                    Ok(_) => ANSWER_MAPPED.to_vec(),
                    Err(reason) => refusal_line(reason),
                };
                (Served::Answered(result), line)
            }
        };
        // Never blocking: a caller that does not read its answers loses them.
        // SAFETY: sends `line.len()` bytes from `line`, which lives across the call.
        let _ = unsafe {
            libc::send(
                self.socket.as_raw_fd(),
                line.as_ptr().cast(),
                line.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        served
    }

    /// Carries out `command`, if this VM takes commands and has its artifact.
    fn command(&mut self, command: Command, kick: &dyn Fn()) -> Result<String, String> {
        let Some(control) = self.reset.as_mut() else {
            return Err("this VM is not reusable (start the VMM with --reusable)".into());
        };
        if self.mapping.is_none() {
            return Err("the artifact comes first: a VM snapshots with its artifact mapped".into());
        }
        control.ask(command, COMMAND_TIMEOUT, kick)
    }

    /// Checks `message` and maps its artifact; `Err` is the refusal's reason. The message's
    /// descriptors are closed on every path but the one that maps.
    fn take(&mut self, message: Message, vm: &VmFd, mem: &GuestMemory) -> Result<u64, String> {
        let Message {
            bytes,
            len,
            mut fds,
            truncated,
            other_control,
        } = message;
        if truncated {
            return Err(format!(
                "the message carried more descriptors than fit ({MAX_FDS}): send exactly one"
            ));
        }
        if other_control {
            return Err("the message carried ancillary data other than descriptors".into());
        }
        if let Some(mapped) = self.mapped_len() {
            return Err(format!(
                "this VM already has its artifact ({mapped} bytes): a VM takes one"
            ));
        }
        if len != HEADER_LEN {
            return Err(format!(
                "a message is {HEADER_LEN} bytes (offset and length, u64 little-endian each), not {}",
                if len > HEADER_LEN {
                    format!("more than {HEADER_LEN}")
                } else {
                    len.to_string()
                }
            ));
        }
        if fds.len() != 1 {
            return Err(format!(
                "a message carries exactly one descriptor (the artifact's file), not {}",
                fds.len()
            ));
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let (offset, length) = (word(0), word(8));
        let file = fds.pop().map(File::from).ok_or("no descriptor")?;
        let artifact = ArtifactFile {
            file: Arc::new(file),
            offset,
            len: length,
        };
        let mapping = ArtifactMapping::map(&artifact).map_err(|e| e.to_string())?;
        // SAFETY: no artifact slot exists in this VM yet (`self.mapping` is empty, and a VM
        // built with `--artifact-later` has no artifact at build: `Vm::build`), and the
        // mapping is kept in `self.mapping` from here on, which `Vm::run` drops only after
        // the vCPU and the VM's descriptor.
        unsafe { mapping.register(vm, self.readonly) }.map_err(|e| e.to_string())?;
        let mapped = mapping.len();
        self.mapping = Some(mapping);
        // The size goes into the boot info only now that the slot exists: a guest that reads
        // a non-zero size finds the memory behind it. One aligned 8-byte store.
        let at = GuestAddress(layout::BOOT_INFO + BootInfo::ARTIFACT_SIZE_OFFSET as u64);
        mem.store(mapped, at, Ordering::Release)
            .map_err(|e| format!("cannot write the artifact's size into the boot info: {e}"))?;
        Ok(mapped)
    }
}

/// The command `message` is, if it is one: [`HEADER_LEN`] bytes, no descriptor, a known name
/// and zeros after it.
fn command_of(message: &Message) -> Option<Command> {
    let plain = message.len == HEADER_LEN
        && message.fds.is_empty()
        && !message.truncated
        && !message.other_control
        && message.bytes[8..HEADER_LEN].iter().all(|&b| b == 0);
    plain
        .then(|| Command::from_wire(&message.bytes[..8]))
        .flatten()
}

/// One message as received.
struct Message {
    bytes: [u8; HEADER_LEN + 1],
    /// Bytes received (up to `HEADER_LEN + 1`: one more means the message was too long).
    len: usize,
    /// The descriptors it carried, closed when dropped.
    fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors that did not fit.
    truncated: bool,
    /// It carried control messages other than `SCM_RIGHTS`.
    other_control: bool,
}

/// Receives one message without blocking; `None` at the end of the stream.
fn receive(socket: &OwnedFd) -> std::io::Result<Option<Message>> {
    let mut bytes = [0u8; HEADER_LEN + 1];
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points to one iovec over `bytes` and to `control`, both alive across the
    // call and of the lengths given; the kernel writes at most those lengths.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let Ok(len) = usize::try_from(n) else {
        return Err(std::io::Error::last_os_error());
    };
    let mut fds = Vec::new();
    let mut other_control = false;
    // SAFETY: `msg` was filled in by a successful recvmsg; its control buffer is `control`,
    // which outlives this loop. CMSG_FIRSTHDR/CMSG_NXTHDR stay inside `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside the control buffer.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a length.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = header.cmsg_len.saturating_sub(head) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of a header inside the buffer starts inside it too.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel wrote `count` descriptors after the header, within
                // `cmsg_len`, which lies inside the control buffer.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                if fd >= 0 {
                    // SAFETY: the kernel just installed this descriptor in this process for
                    // us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        } else {
            other_control = true;
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is a header inside the buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if len == 0 && fds.is_empty() && !other_control {
        return Ok(None);
    }
    Ok(Some(Message {
        bytes,
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        other_control,
    }))
}

/// `ERR <reason>\n`, on one line of at most [`MAX_ANSWER`] bytes.
fn refusal_line(reason: &str) -> Vec<u8> {
    let mut line = String::from(ANSWER_REFUSED);
    for c in reason.chars() {
        if line.len() + c.len_utf8() >= MAX_ANSWER {
            break;
        }
        line.push(if c.is_control() { ' ' } else { c });
    }
    line.push('\n');
    line.into_bytes()
}

/// An integer socket option of `socket`.
fn sockopt(socket: &OwnedFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len: libc::socklen_t = 4;
    const _: () = assert!(std::mem::size_of::<libc::c_int>() == 4);
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn refusals_are_one_bounded_line() {
        let line = refusal_line("bad\nrange");
        assert_eq!(line, b"ERR bad range\n");
        let long = refusal_line(&"x".repeat(10_000));
        assert!(long.len() <= MAX_ANSWER);
        assert_eq!(long.last(), Some(&b'\n'));
        assert_eq!(long.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn only_a_unix_stream_socket_is_accepted() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(LateArtifact::new(Arc::new(OwnedFd::from(a))).is_ok());
        let file = File::open(std::env::temp_dir()).unwrap();
        let e = LateArtifact::new(Arc::new(OwnedFd::from(file))).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let e = LateArtifact::new(Arc::new(OwnedFd::from(d))).unwrap_err();
        assert!(e.to_string().contains("type"), "{e}");
    }

    /// Sends `bytes` with `fds` attached.
    fn send_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let mut control = [0u64; 16];
        let fd_bytes = u32::try_from(std::mem::size_of_val(fds)).unwrap();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        // SAFETY: plain data; the buffers outlive the sendmsg below; CMSG_* stay inside
        // `control`, which holds 128 bytes, more than a header and 9 descriptors.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(fd_bytes) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
            assert_eq!(
                usize::try_from(libc::sendmsg(s.as_raw_fd(), &msg, 0)).ok(),
                Some(bytes.len())
            );
        }
    }

    #[test]
    fn descriptors_come_with_their_message_and_too_many_are_flagged() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = OwnedFd::from(a);
        let file = File::open(std::env::temp_dir()).unwrap();
        send_fds(&b, &[5u8; HEADER_LEN], &[file.as_raw_fd()]);
        let m = receive(&a).unwrap().unwrap();
        assert_eq!((m.len, m.fds.len(), m.truncated), (HEADER_LEN, 1, false));
        assert_ne!(m.fds[0].as_raw_fd(), file.as_raw_fd(), "a new descriptor");
        // More than the control buffer holds: the kernel drops the rest and says so.
        send_fds(&b, &[5u8; HEADER_LEN], &[file.as_raw_fd(); MAX_FDS + 1]);
        let m = receive(&a).unwrap().unwrap();
        assert!(m.truncated);
        assert_eq!(m.fds.len(), MAX_FDS);
        send_fds(&b, &[5u8; HEADER_LEN], &[file.as_raw_fd(); MAX_FDS]);
        let m = receive(&a).unwrap().unwrap();
        assert_eq!((m.fds.len(), m.truncated), (MAX_FDS, false));
    }

    #[test]
    fn messages_are_received_with_their_descriptors_and_the_end_is_seen() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let a = OwnedFd::from(a);
        assert!(matches!(receive(&a), Err(e) if e.raw_os_error() == Some(libc::EAGAIN)));
        b.write_all(&[1u8; 20]).unwrap();
        let m = receive(&a).unwrap().unwrap();
        assert_eq!(
            (m.len, m.fds.len(), m.truncated),
            (HEADER_LEN + 1, 0, false)
        );
        // The rest of the bytes are the next "message".
        let m = receive(&a).unwrap().unwrap();
        assert_eq!(m.len, 3);
        drop(b);
        assert!(receive(&a).unwrap().is_none());
        let mut s = UnixStream::from(a);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
