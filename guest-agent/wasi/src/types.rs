//! WASI preview 1 constants and the fixed-size structures that cross the tool's memory, with
//! their little-endian encoders and decoders (layouts of `wasi_snapshot_preview1`, wasm32).

use crate::Errno;

/// `rights` bits.
pub mod rights {
    /// `fd_datasync`.
    pub const FD_DATASYNC: u64 = 1 << 0;
    /// `fd_read`.
    pub const FD_READ: u64 = 1 << 1;
    /// `fd_seek`.
    pub const FD_SEEK: u64 = 1 << 2;
    /// `fd_fdstat_set_flags`.
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    /// `fd_sync`.
    pub const FD_SYNC: u64 = 1 << 4;
    /// `fd_tell`.
    pub const FD_TELL: u64 = 1 << 5;
    /// `fd_write`.
    pub const FD_WRITE: u64 = 1 << 6;
    /// `fd_advise`.
    pub const FD_ADVISE: u64 = 1 << 7;
    /// `fd_allocate`.
    pub const FD_ALLOCATE: u64 = 1 << 8;
    /// `path_create_directory`.
    pub const PATH_CREATE_DIRECTORY: u64 = 1 << 9;
    /// `path_open` with `oflags::CREAT`.
    pub const PATH_CREATE_FILE: u64 = 1 << 10;
    /// `path_link` source.
    pub const PATH_LINK_SOURCE: u64 = 1 << 11;
    /// `path_link` target.
    pub const PATH_LINK_TARGET: u64 = 1 << 12;
    /// `path_open`.
    pub const PATH_OPEN: u64 = 1 << 13;
    /// `fd_readdir`.
    pub const FD_READDIR: u64 = 1 << 14;
    /// `path_readlink`.
    pub const PATH_READLINK: u64 = 1 << 15;
    /// `path_rename` source.
    pub const PATH_RENAME_SOURCE: u64 = 1 << 16;
    /// `path_rename` target.
    pub const PATH_RENAME_TARGET: u64 = 1 << 17;
    /// `path_filestat_get`.
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    /// `path_filestat_set_size`.
    pub const PATH_FILESTAT_SET_SIZE: u64 = 1 << 19;
    /// `path_filestat_set_times`.
    pub const PATH_FILESTAT_SET_TIMES: u64 = 1 << 20;
    /// `fd_filestat_get`.
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    /// `fd_filestat_set_size`.
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    /// `fd_filestat_set_times`.
    pub const FD_FILESTAT_SET_TIMES: u64 = 1 << 23;
    /// `path_symlink`.
    pub const PATH_SYMLINK: u64 = 1 << 24;
    /// `path_remove_directory`.
    pub const PATH_REMOVE_DIRECTORY: u64 = 1 << 25;
    /// `path_unlink_file`.
    pub const PATH_UNLINK_FILE: u64 = 1 << 26;
    /// `poll_oneoff` on fd read/write.
    pub const POLL_FD_READWRITE: u64 = 1 << 27;
    /// `sock_shutdown`.
    pub const SOCK_SHUTDOWN: u64 = 1 << 28;
    /// `sock_accept`.
    pub const SOCK_ACCEPT: u64 = 1 << 29;
    /// Every right WASI preview 1 defines.
    pub const ALL: u64 = (1 << 30) - 1;
}

/// `oflags` bits of `path_open`.
pub mod oflags {
    /// Create the file if missing.
    pub const CREAT: u16 = 1 << 0;
    /// Fail unless it is a directory.
    pub const DIRECTORY: u16 = 1 << 1;
    /// With `CREAT`: fail if it exists.
    pub const EXCL: u16 = 1 << 2;
    /// Truncate to size 0.
    pub const TRUNC: u16 = 1 << 3;
}

/// `fdflags` bits.
pub mod fdflags {
    /// Writes go to the end.
    pub const APPEND: u16 = 1 << 0;
    /// Synchronized data writes.
    pub const DSYNC: u16 = 1 << 1;
    /// Non-blocking.
    pub const NONBLOCK: u16 = 1 << 2;
    /// Synchronized reads.
    pub const RSYNC: u16 = 1 << 3;
    /// Synchronized writes.
    pub const SYNC: u16 = 1 << 4;
}

/// `lookupflags` bits.
pub mod lookupflags {
    /// Follow a symbolic link in the last component.
    pub const SYMLINK_FOLLOW: u32 = 1 << 0;
}

/// `fstflags` bits of the `*_set_times` functions.
pub mod fstflags {
    /// Set the access time to the given value.
    pub const ATIM: u16 = 1 << 0;
    /// Set the access time to now.
    pub const ATIM_NOW: u16 = 1 << 1;
    /// Set the modification time to the given value.
    pub const MTIM: u16 = 1 << 2;
    /// Set the modification time to now.
    pub const MTIM_NOW: u16 = 1 << 3;
}

/// `filetype` values.
pub mod filetype {
    /// Unknown (what wasmtime-wasi reports for standard streams that are not terminals).
    pub const UNKNOWN: u8 = 0;
    /// A block device.
    pub const BLOCK_DEVICE: u8 = 1;
    /// A character device.
    pub const CHARACTER_DEVICE: u8 = 2;
    /// A directory.
    pub const DIRECTORY: u8 = 3;
    /// A regular file.
    pub const REGULAR_FILE: u8 = 4;
    /// A symbolic link.
    pub const SYMBOLIC_LINK: u8 = 7;
}

/// `whence` values of `fd_seek`.
pub mod whence {
    /// From the start.
    pub const SET: u8 = 0;
    /// From the current position.
    pub const CUR: u8 = 1;
    /// From the end.
    pub const END: u8 = 2;
}

/// `clockid` values.
pub mod clockid {
    /// Wall-clock time.
    pub const REALTIME: u32 = 0;
    /// Monotonic time.
    pub const MONOTONIC: u32 = 1;
    /// CPU time of the process.
    pub const PROCESS_CPUTIME: u32 = 2;
    /// CPU time of the thread.
    pub const THREAD_CPUTIME: u32 = 3;
}

/// `eventtype` values.
pub mod eventtype {
    /// A clock subscription.
    pub const CLOCK: u8 = 0;
    /// Readable descriptor.
    pub const FD_READ: u8 = 1;
    /// Writable descriptor.
    pub const FD_WRITE: u8 = 2;
}

/// `subclockflags::subscription_clock_abstime`: the timeout is an absolute time.
pub const SUBCLOCK_ABSTIME: u16 = 1;

/// Largest `advice` value of `fd_advise` (`noreuse`).
pub const ADVICE_MAX: u8 = 5;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// `fdstat` (24 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fdstat {
    /// A `filetype` value.
    pub filetype: u8,
    /// `fdflags`.
    pub flags: u16,
    /// Rights of the descriptor.
    pub rights_base: u64,
    /// Rights descriptors opened through it get.
    pub rights_inheriting: u64,
}

impl Fdstat {
    /// Size in the tool's memory.
    pub const SIZE: usize = 24;

    /// The bytes the tool reads.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut s = [0u8; Self::SIZE];
        s[0] = self.filetype;
        s[2..4].copy_from_slice(&self.flags.to_le_bytes());
        s[8..16].copy_from_slice(&self.rights_base.to_le_bytes());
        s[16..24].copy_from_slice(&self.rights_inheriting.to_le_bytes());
        s
    }
}

/// `filestat` (64 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filestat {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// A `filetype` value.
    pub filetype: u8,
    /// Hard links.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Access time, ns.
    pub atim: u64,
    /// Modification time, ns.
    pub mtim: u64,
    /// Status change time, ns.
    pub ctim: u64,
}

impl Filestat {
    /// Size in the tool's memory.
    pub const SIZE: usize = 64;

    /// The bytes the tool reads.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut s = [0u8; Self::SIZE];
        s[0..8].copy_from_slice(&self.dev.to_le_bytes());
        s[8..16].copy_from_slice(&self.ino.to_le_bytes());
        s[16] = self.filetype;
        s[24..32].copy_from_slice(&self.nlink.to_le_bytes());
        s[32..40].copy_from_slice(&self.size.to_le_bytes());
        s[40..48].copy_from_slice(&self.atim.to_le_bytes());
        s[48..56].copy_from_slice(&self.mtim.to_le_bytes());
        s[56..64].copy_from_slice(&self.ctim.to_le_bytes());
        s
    }
}

/// `prestat` of a preopened directory (8 bytes: tag 0, then the name's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prestat {
    /// Length of the directory's name.
    pub name_len: u32,
}

impl Prestat {
    /// Size in the tool's memory.
    pub const SIZE: usize = 8;

    /// The bytes the tool reads.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut s = [0u8; Self::SIZE];
        s[4..8].copy_from_slice(&self.name_len.to_le_bytes());
        s
    }
}

/// `dirent` header (24 bytes; the name follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dirent {
    /// Cookie of the next entry.
    pub next: u64,
    /// Inode.
    pub ino: u64,
    /// Length of the name.
    pub namlen: u32,
    /// A `filetype` value.
    pub filetype: u8,
}

impl Dirent {
    /// Size in the tool's memory.
    pub const SIZE: usize = 24;

    /// The bytes the tool reads.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut s = [0u8; Self::SIZE];
        s[0..8].copy_from_slice(&self.next.to_le_bytes());
        s[8..16].copy_from_slice(&self.ino.to_le_bytes());
        s[16..20].copy_from_slice(&self.namlen.to_le_bytes());
        s[20] = self.filetype;
        s
    }
}

/// `iovec` / `ciovec` (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iovec {
    /// Address in the tool's memory.
    pub ptr: u32,
    /// Length.
    pub len: u32,
}

impl Iovec {
    /// Size in the tool's memory.
    pub const SIZE: usize = 8;

    /// Reads one from its bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        Self {
            ptr: u32_at(b, 0),
            len: u32_at(b, 4),
        }
    }
}

/// What a subscription waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionKind {
    /// A clock reaching a time.
    Clock {
        /// A `clockid` value.
        id: u32,
        /// Relative or absolute timeout, ns.
        timeout: u64,
        /// Accepted imprecision, ns.
        precision: u64,
        /// `subclockflags`.
        flags: u16,
    },
    /// A descriptor becoming readable.
    FdRead(u32),
    /// A descriptor becoming writable.
    FdWrite(u32),
}

/// `subscription` (48 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Returned in the event.
    pub userdata: u64,
    /// What it waits for.
    pub kind: SubscriptionKind,
}

impl Subscription {
    /// Size in the tool's memory.
    pub const SIZE: usize = 48;

    /// Reads one from its bytes; an unknown event type is EINVAL.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Self, Errno> {
        let kind = match b[8] {
            eventtype::CLOCK => SubscriptionKind::Clock {
                id: u32_at(b, 16),
                timeout: u64_at(b, 24),
                precision: u64_at(b, 32),
                flags: u16::from_le_bytes([b[40], b[41]]),
            },
            eventtype::FD_READ => SubscriptionKind::FdRead(u32_at(b, 16)),
            eventtype::FD_WRITE => SubscriptionKind::FdWrite(u32_at(b, 16)),
            _ => return Err(Errno::Inval),
        };
        Ok(Self {
            userdata: u64_at(b, 0),
            kind,
        })
    }
}

/// `event` (32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// The subscription's userdata.
    pub userdata: u64,
    /// An error number, 0 for none.
    pub error: u16,
    /// An `eventtype` value.
    pub kind: u8,
    /// Bytes available (descriptor events).
    pub nbytes: u64,
    /// `eventrwflags` (descriptor events).
    pub flags: u16,
}

impl Event {
    /// Size in the tool's memory.
    pub const SIZE: usize = 32;

    /// The bytes the tool reads.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut s = [0u8; Self::SIZE];
        s[0..8].copy_from_slice(&self.userdata.to_le_bytes());
        s[8..10].copy_from_slice(&self.error.to_le_bytes());
        s[10] = self.kind;
        s[16..24].copy_from_slice(&self.nbytes.to_le_bytes());
        s[24..26].copy_from_slice(&self.flags.to_le_bytes());
        s
    }
}
