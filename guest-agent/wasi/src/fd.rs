//! Descriptors and the `fd_*` functions: standard input and output, the preopened shared
//! directories, and the files and directories a tool opens in them.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use bulwark_memfs::{Ino, Kind};

use crate::mem::{HOSTCALL_FUEL, iovecs, slice, slice_mut, write_bytes, write_u32, write_u64};
use crate::types::{
    ADVICE_MAX, Dirent, Fdstat, Filestat, Prestat, fdflags, filetype, fstflags, rights, whence,
};
use crate::{Errno, Host, WasiCtx};

/// Most descriptors a tool may hold at once.
pub const MAX_FDS: usize = 1024;

/// A file opened by the tool.
#[derive(Clone, Debug)]
pub struct OpenFile {
    /// Its inode.
    pub ino: Ino,
    /// Offset of the next read or write.
    pub pos: u64,
    /// Writes go to the end.
    pub append: bool,
    /// The tool asked for non-blocking I/O (noted and reported; nothing here blocks).
    pub nonblock: bool,
    /// Opened for reading.
    pub read: bool,
    /// Opened for writing.
    pub write: bool,
}

/// What a descriptor refers to.
#[derive(Clone, Debug)]
pub enum Desc {
    /// Standard input: the request's bytes.
    Stdin,
    /// Standard output, captured.
    Stdout,
    /// Standard error, captured.
    Stderr,
    /// A directory; `preopen` is its name for a preopened one.
    Dir {
        /// Its inode.
        ino: Ino,
        /// The name it was preopened under.
        preopen: Option<String>,
        /// Opened for reading.
        read: bool,
    },
    /// A regular file.
    File(OpenFile),
}

impl Desc {
    /// The inode behind a file or directory descriptor.
    pub fn ino(&self) -> Option<Ino> {
        match self {
            Desc::Dir { ino, .. } => Some(*ino),
            Desc::File(f) => Some(f.ino),
            _ => None,
        }
    }
}

/// The descriptor table.
pub struct Fds {
    table: BTreeMap<u32, Desc>,
}

impl Default for Fds {
    fn default() -> Self {
        Self::new()
    }
}

impl Fds {
    /// A table with standard input, output and error at 0, 1 and 2.
    pub fn new() -> Self {
        let mut table = BTreeMap::new();
        table.insert(0, Desc::Stdin);
        table.insert(1, Desc::Stdout);
        table.insert(2, Desc::Stderr);
        Self { table }
    }

    /// The descriptor `fd`, or EBADF.
    pub fn get(&self, fd: u32) -> Result<&Desc, Errno> {
        self.table.get(&fd).ok_or(Errno::BadF)
    }

    /// The descriptor `fd`, mutably, or EBADF.
    pub fn get_mut(&mut self, fd: u32) -> Result<&mut Desc, Errno> {
        self.table.get_mut(&fd).ok_or(Errno::BadF)
    }

    /// The directory inode behind `fd` for the `path_*` functions: EBADF for anything else,
    /// a file included (wasmtime-wasi's answer; only `path_open` says ENOTDIR for a file).
    pub fn dir(&self, fd: u32) -> Result<Ino, Errno> {
        match self.get(fd)? {
            Desc::Dir { ino, .. } => Ok(*ino),
            _ => Err(Errno::BadF),
        }
    }

    /// The open file behind `fd`: EBADF for anything else.
    pub fn file(&self, fd: u32) -> Result<&OpenFile, Errno> {
        match self.get(fd)? {
            Desc::File(f) => Ok(f),
            _ => Err(Errno::BadF),
        }
    }

    /// The open file behind `fd`, mutably: EBADF for anything else.
    pub fn file_mut(&mut self, fd: u32) -> Result<&mut OpenFile, Errno> {
        match self.get_mut(fd)? {
            Desc::File(f) => Ok(f),
            _ => Err(Errno::BadF),
        }
    }

    /// The inode behind a file or directory descriptor: EBADF for standard streams.
    pub fn inode(&self, fd: u32) -> Result<Ino, Errno> {
        self.get(fd)?.ino().ok_or(Errno::BadF)
    }

    /// Whether the table holds [`MAX_FDS`] descriptors.
    pub fn is_full(&self) -> bool {
        self.table.len() >= MAX_FDS
    }

    /// Puts `desc` at the lowest free number; EMFILE when the table is full.
    pub fn insert(&mut self, desc: Desc) -> Result<u32, Errno> {
        if self.is_full() {
            return Err(Errno::MFile);
        }
        let mut n = 0u32;
        for &used in self.table.keys() {
            if used != n {
                break;
            }
            n += 1;
        }
        self.table.insert(n, desc);
        Ok(n)
    }

    /// Takes `fd` out of the table.
    pub fn remove(&mut self, fd: u32) -> Result<Desc, Errno> {
        self.table.remove(&fd).ok_or(Errno::BadF)
    }
}

/// [`iovecs`] cut to what is left of [`HOSTCALL_FUEL`] after the array: the first buffer
/// must fit (ENOMEM, as wasmtime-wasi answers, which only ever uses that one), the others are
/// cut (a short read or write). Every buffer is checked to be inside memory first (EFAULT),
/// so a bad one fails the call before any byte moves (stdin would otherwise lose what was
/// read).
fn checked_iovecs(mem: &[u8], iovs: u32, count: u32) -> Result<Vec<crate::types::Iovec>, Errno> {
    let mut list = iovecs(mem, iovs, count)?;
    let mut fuel = HOSTCALL_FUEL.saturating_sub(u64::from(count).saturating_mul(8));
    if list.first().is_some_and(|iov| u64::from(iov.len) > fuel) {
        return Err(Errno::NoMem);
    }
    for iov in &mut list {
        iov.len = iov.len.min(u32::try_from(fuel).unwrap_or(u32::MAX));
        fuel -= u64::from(iov.len);
        slice(mem, iov.ptr, iov.len)?;
    }
    list.retain(|iov| iov.len > 0);
    Ok(list)
}

/// The WASI file type of a memfs kind.
pub(crate) fn file_type(kind: Kind) -> u8 {
    match kind {
        Kind::Dir => filetype::DIRECTORY,
        Kind::File => filetype::REGULAR_FILE,
        Kind::Symlink => filetype::SYMBOLIC_LINK,
    }
}

/// The rights wasmtime-wasi reports for a preopened directory (a fixed set "expected by many
/// userlands", not every right).
const PREOPEN_BASE: u64 = rights::PATH_CREATE_DIRECTORY
    | rights::PATH_CREATE_FILE
    | rights::PATH_LINK_SOURCE
    | rights::PATH_LINK_TARGET
    | rights::PATH_OPEN
    | rights::FD_READDIR
    | rights::PATH_READLINK
    | rights::PATH_RENAME_SOURCE
    | rights::PATH_RENAME_TARGET
    | rights::PATH_SYMLINK
    | rights::PATH_REMOVE_DIRECTORY
    | rights::PATH_UNLINK_FILE
    | rights::PATH_FILESTAT_GET
    | rights::PATH_FILESTAT_SET_TIMES
    | rights::FD_FILESTAT_GET
    | rights::FD_FILESTAT_SET_TIMES;

/// What a preopened directory passes on, as wasmtime-wasi reports it.
const PREOPEN_INHERITING: u64 = PREOPEN_BASE
    | rights::FD_DATASYNC
    | rights::FD_READ
    | rights::FD_SEEK
    | rights::FD_FDSTAT_SET_FLAGS
    | rights::FD_SYNC
    | rights::FD_TELL
    | rights::FD_WRITE
    | rights::FD_ADVISE
    | rights::FD_ALLOCATE
    | rights::FD_FILESTAT_GET
    | rights::FD_FILESTAT_SET_SIZE
    | rights::FD_FILESTAT_SET_TIMES
    | rights::POLL_FD_READWRITE;

/// The `fdstat` of a descriptor, as wasmtime-wasi computes it: standard streams are
/// `UNKNOWN` (they are not terminals) with only `FD_READ` or `FD_WRITE`; a preopened directory
/// has a fixed set; other descriptors have every right but those their open mode or type
/// excludes, inheriting the same.
pub(crate) fn fdstat(desc: &Desc) -> Fdstat {
    let stream = |r| Fdstat {
        filetype: filetype::UNKNOWN,
        flags: 0,
        rights_base: r,
        rights_inheriting: r,
    };
    let (kind, flags, read, write) = match desc {
        Desc::Stdin => return stream(rights::FD_READ),
        Desc::Stdout | Desc::Stderr => return stream(rights::FD_WRITE),
        Desc::Dir {
            preopen: Some(_), ..
        } => {
            return Fdstat {
                filetype: filetype::DIRECTORY,
                flags: 0,
                rights_base: PREOPEN_BASE,
                rights_inheriting: PREOPEN_INHERITING,
            };
        }
        Desc::Dir { read, .. } => (filetype::DIRECTORY, 0, *read, false),
        Desc::File(f) => {
            let mut flags = 0;
            if f.append {
                flags |= fdflags::APPEND;
            }
            if f.nonblock {
                flags |= fdflags::NONBLOCK;
            }
            (filetype::REGULAR_FILE, flags, f.read, f.write)
        }
    };
    let mut base = rights::ALL;
    if kind == filetype::DIRECTORY {
        base &= !(rights::FD_SEEK | rights::FD_FILESTAT_SET_SIZE | rights::PATH_FILESTAT_SET_SIZE);
    }
    if !read {
        base &= !(rights::FD_READ | rights::FD_READDIR);
    }
    if !write {
        base &= !rights::FD_WRITE;
    }
    Fdstat {
        filetype: kind,
        flags,
        rights_base: base,
        rights_inheriting: base,
    }
}

/// Turns `fstflags` and the two times into what to set: EINVAL for a time both given and
/// "now", or unknown bits.
pub(crate) fn times(
    now: u64,
    atim: u64,
    mtim: u64,
    flags: u16,
) -> Result<(Option<u64>, Option<u64>), Errno> {
    if flags & !0xf != 0 {
        return Err(Errno::Inval);
    }
    let pick = |set: u16, set_now: u16, value: u64| match (flags & set != 0, flags & set_now != 0) {
        (true, true) => Err(Errno::Inval),
        (true, false) => Ok(Some(value)),
        (false, true) => Ok(Some(now)),
        (false, false) => Ok(None),
    };
    Ok((
        pick(fstflags::ATIM, fstflags::ATIM_NOW, atim)?,
        pick(fstflags::MTIM, fstflags::MTIM_NOW, mtim)?,
    ))
}

impl<H: Host> WasiCtx<H> {
    /// The `filestat` of an inode.
    pub(crate) fn filestat(&self, ino: Ino) -> Result<Filestat, Errno> {
        let st = self.fs.stat(ino)?;
        Ok(Filestat {
            dev: 1,
            ino: st.ino,
            filetype: file_type(st.kind),
            nlink: st.nlink,
            size: st.size,
            atim: st.atime_ns,
            mtim: st.mtime_ns,
            ctim: st.mtime_ns,
        })
    }

    /// `fd_read` (`offset` None) and `fd_pread`: stores the bytes read at `nread`.
    pub fn fd_read(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        iovs: u32,
        count: u32,
        offset: Option<u64>,
        nread: u32,
    ) -> Result<(), Errno> {
        let list = checked_iovecs(mem, iovs, count)?;
        let mut total = 0u32;
        match self.fds.get(fd)? {
            Desc::Stdin => {
                // wasmtime-wasi: `fd_pread` on stdin is ESPIPE.
                if offset.is_some() {
                    return Err(Errno::SPipe);
                }
                for iov in list {
                    let want = iov.len.min(u32::MAX - total);
                    let rest = self.stdin.get(self.stdin_pos..).unwrap_or(&[]);
                    let n = rest.len().min(usize::try_from(want).unwrap_or(usize::MAX));
                    write_bytes(mem, iov.ptr, &rest[..n])?;
                    self.stdin_pos = self.stdin_pos.saturating_add(n);
                    total = total.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                }
            }
            Desc::File(f) => {
                if !f.read {
                    return Err(Errno::BadF);
                }
                let ino = f.ino;
                let mut pos = offset.unwrap_or(f.pos);
                for iov in list {
                    let want = iov.len.min(u32::MAX - total);
                    let n = self.fs.read(ino, pos, slice_mut(mem, iov.ptr, want)?)?;
                    let n = u32::try_from(n).unwrap_or(u32::MAX);
                    pos = pos.saturating_add(u64::from(n));
                    total = total.saturating_add(n);
                    if n < iov.len {
                        break;
                    }
                }
                if offset.is_none() {
                    self.fds.file_mut(fd)?.pos = pos;
                }
            }
            _ => return Err(Errno::BadF),
        }
        write_u32(mem, nread, total)
    }

    /// `fd_write` (`offset` None) and `fd_pwrite`: stores the bytes written at `nwritten`.
    /// Output past the `--max-output` cap is accepted and dropped (the response says so).
    /// Like Linux (and wasmtime-wasi), `fd_pwrite` on a file opened for appending writes at
    /// the end.
    pub fn fd_write(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        iovs: u32,
        count: u32,
        offset: Option<u64>,
        nwritten: u32,
    ) -> Result<(), Errno> {
        let list = checked_iovecs(mem, iovs, count)?;
        let mut total = 0u32;
        match self.fds.get(fd)? {
            Desc::Stdout | Desc::Stderr if offset.is_some() => return Err(Errno::SPipe),
            s @ (Desc::Stdout | Desc::Stderr) => {
                let out = if matches!(s, Desc::Stdout) {
                    &mut self.stdout
                } else {
                    &mut self.stderr
                };
                for iov in list {
                    let want = iov.len.min(u32::MAX - total);
                    out.push(slice(mem, iov.ptr, want)?);
                    total = total.saturating_add(want);
                }
            }
            Desc::File(f) => {
                if !f.write {
                    return Err(Errno::BadF);
                }
                let (ino, append, at) = (f.ino, f.append, f.pos);
                let mut pos = if append {
                    self.fs.stat(ino)?.size
                } else {
                    offset.unwrap_or(at)
                };
                let now = self.now_ns();
                for iov in list {
                    let want = iov.len.min(u32::MAX - total);
                    match self.fs.write(ino, pos, slice(mem, iov.ptr, want)?, now) {
                        Ok(_) => {}
                        // What was written stays written: a short write, as POSIX has it.
                        Err(_) if total > 0 => break,
                        Err(e) => return Err(e.into()),
                    }
                    pos = pos.saturating_add(u64::from(want));
                    total = total.saturating_add(want);
                }
                if offset.is_none() {
                    self.fds.file_mut(fd)?.pos = pos;
                }
            }
            _ => return Err(Errno::BadF),
        }
        write_u32(mem, nwritten, total)
    }

    /// The new position of a seek: ESPIPE on standard streams, EBADF on directories.
    fn seek(&mut self, fd: u32, offset: i64, whence: u8) -> Result<u64, Errno> {
        let f = match self.fds.get(fd)? {
            Desc::Stdin | Desc::Stdout | Desc::Stderr => return Err(Errno::SPipe),
            Desc::Dir { .. } => return Err(Errno::BadF),
            Desc::File(f) => f,
        };
        let pos = match whence {
            whence::SET => u64::try_from(offset).map_err(|_| Errno::Inval)?,
            whence::CUR => f.pos.checked_add_signed(offset).ok_or(Errno::Inval)?,
            whence::END => self
                .fs
                .stat(f.ino)?
                .size
                .checked_add_signed(offset)
                .ok_or(Errno::Inval)?,
            _ => return Err(Errno::Inval),
        };
        self.fds.file_mut(fd)?.pos = pos;
        Ok(pos)
    }

    /// `fd_seek`.
    pub fn fd_seek(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        offset: i64,
        whence: u32,
        newoffset: u32,
    ) -> Result<(), Errno> {
        let whence = u8::try_from(whence).map_err(|_| Errno::Inval)?;
        let pos = self.seek(fd, offset, whence)?;
        write_u64(mem, newoffset, pos)
    }

    /// `fd_tell`.
    pub fn fd_tell(&mut self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let pos = self.seek(fd, 0, whence::CUR)?;
        write_u64(mem, out, pos)
    }

    /// `fd_close`: a preopened directory can be closed too.
    pub fn fd_close(&mut self, fd: u32) -> Result<(), Errno> {
        if let Some(ino) = self.fds.remove(fd)?.ino() {
            self.fs.close(ino);
        }
        Ok(())
    }

    /// `fd_renumber`: both must be open.
    pub fn fd_renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        self.fds.get(from)?;
        self.fds.get(to)?;
        if from == to {
            return Ok(());
        }
        self.fd_close(to)?;
        let desc = self.fds.remove(from)?;
        self.fds.table.insert(to, desc);
        Ok(())
    }

    /// `fd_sync` and `fd_datasync`: nothing is ever written anywhere but memory, so this only
    /// checks that `fd` is a file (EBADF otherwise, as wasmtime-wasi).
    pub fn fd_sync(&mut self, fd: u32) -> Result<(), Errno> {
        self.fds.file(fd).map(|_| ())
    }

    /// `fd_advise`: checks the advice and that `fd` is a file; advice changes nothing here.
    pub fn fd_advise(
        &mut self,
        fd: u32,
        _offset: u64,
        _len: u64,
        advice: u32,
    ) -> Result<(), Errno> {
        if advice > u32::from(ADVICE_MAX) {
            return Err(Errno::Inval);
        }
        self.fds.file(fd).map(|_| ())
    }

    /// `fd_allocate`: ENOTSUP for a file, as wasmtime-wasi answers (the spec would grow the
    /// file); EBADF for anything else.
    pub fn fd_allocate(&mut self, fd: u32, _offset: u64, _len: u64) -> Result<(), Errno> {
        self.fds.file(fd)?;
        Err(Errno::NotSup)
    }

    /// `fd_fdstat_get`.
    pub fn fd_fdstat_get(&mut self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let st = fdstat(self.fds.get(fd)?);
        write_bytes(mem, out, &st.encode())
    }

    /// `fd_fdstat_set_flags`: only `APPEND` and `NONBLOCK` change, on files only (EBADF
    /// otherwise); the sync flags are EINVAL, as wasmtime-wasi answers.
    pub fn fd_fdstat_set_flags(&mut self, fd: u32, flags: u32) -> Result<(), Errno> {
        let f = self.fds.file_mut(fd)?;
        let flags = u16::try_from(flags).map_err(|_| Errno::Inval)?;
        if flags & (fdflags::DSYNC | fdflags::SYNC | fdflags::RSYNC) != 0 || flags > 0x1f {
            return Err(Errno::Inval);
        }
        f.append = flags & fdflags::APPEND != 0;
        f.nonblock = flags & fdflags::NONBLOCK != 0;
        Ok(())
    }

    /// `fd_fdstat_set_rights`: ENOTSUP for a file or directory, EBADF otherwise. This is
    /// wasmtime-wasi's answer (rights are not capabilities there); the spec would drop rights.
    pub fn fd_fdstat_set_rights(
        &mut self,
        fd: u32,
        _base: u64,
        _inheriting: u64,
    ) -> Result<(), Errno> {
        self.fds.inode(fd)?;
        Err(Errno::NotSup)
    }

    /// `fd_filestat_get`: standard streams are all zeros with type `UNKNOWN`.
    pub fn fd_filestat_get(&mut self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let st = match self.fds.get(fd)?.ino() {
            Some(ino) => self.filestat(ino)?,
            None => Filestat::default(),
        };
        write_bytes(mem, out, &st.encode())
    }

    /// `fd_filestat_set_size`: a file opened for writing only; EINVAL otherwise, as Linux's
    /// `ftruncate` (and so wasmtime-wasi) answers.
    pub fn fd_filestat_set_size(&mut self, fd: u32, size: u64) -> Result<(), Errno> {
        let f = self.fds.file(fd)?;
        if !f.write {
            return Err(Errno::Inval);
        }
        let ino = f.ino;
        let now = self.now_ns();
        Ok(self.fs.set_size(ino, size, now)?)
    }

    /// `fd_filestat_set_times`.
    pub fn fd_filestat_set_times(
        &mut self,
        fd: u32,
        atim: u64,
        mtim: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let flags = u16::try_from(flags).map_err(|_| Errno::Inval)?;
        let (a, m) = times(self.now_ns(), atim, mtim, flags)?;
        let ino = self.fds.inode(fd)?;
        Ok(self.fs.set_times(ino, a, m)?)
    }

    /// `fd_readdir`: `.` and `..` (both with the directory's own inode number, as
    /// wasmtime-wasi gives them), then the entries in the order the directory keeps them;
    /// cookie `n` starts at the `n`th entry. The buffer is filled completely, the last entry
    /// cut at its end, as WASI prescribes. As in wasmtime-wasi, only the bytes written must be
    /// inside memory (a `len` past its end is fine while the entries fit), and nothing is
    /// copied: a call costs its cookie and the bytes it writes, whatever the directory's size.
    pub fn fd_readdir(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        buf: u32,
        len: u32,
        cookie: u64,
        used_out: u32,
    ) -> Result<(), Errno> {
        let ino = self.fds.dir(fd)?;
        let head = [
            (".", ino, filetype::DIRECTORY),
            ("..", ino, filetype::DIRECTORY),
        ];
        let skip = usize::try_from(cookie).unwrap_or(usize::MAX);
        let entries = head.into_iter().skip(skip).chain(
            self.fs
                .entries(ino, skip.saturating_sub(head.len()))?
                .map(|(name, ino, kind)| (name, ino, file_type(kind))),
        );
        let mut used = 0u32;
        'fill: for (k, (name, ino, kind)) in entries.enumerate() {
            let i = skip.saturating_add(k);
            let header = Dirent {
                next: u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1),
                ino,
                namlen: u32::try_from(name.len()).map_err(|_| Errno::Overflow)?,
                filetype: kind,
            };
            for part in [&header.encode()[..], name.as_bytes()] {
                let room = usize::try_from(len - used).unwrap_or(usize::MAX);
                let n = part.len().min(room);
                if n > 0 {
                    let at = buf.checked_add(used).ok_or(Errno::Fault)?;
                    write_bytes(mem, at, &part[..n])?;
                    used += u32::try_from(n).map_err(|_| Errno::Overflow)?;
                }
                if n < part.len() || used == len {
                    break 'fill;
                }
            }
        }
        write_u32(mem, used_out, used)
    }

    fn prestat_name(&self, fd: u32) -> Option<&str> {
        match self.fds.get(fd) {
            Ok(Desc::Dir {
                preopen: Some(name),
                ..
            }) => Some(name),
            _ => None,
        }
    }

    /// `fd_prestat_get`: EBADF for anything but a preopened directory.
    pub fn fd_prestat_get(&mut self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let name = self.prestat_name(fd).ok_or(Errno::BadF)?;
        let name_len = u32::try_from(name.len()).map_err(|_| Errno::Overflow)?;
        write_bytes(mem, out, &Prestat { name_len }.encode())
    }

    /// `fd_prestat_dir_name`: ENOTDIR for anything but a preopened directory (wasmtime-wasi's
    /// answer), ENAMETOOLONG when the buffer is too small.
    pub fn fd_prestat_dir_name(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        buf: u32,
        len: u32,
    ) -> Result<(), Errno> {
        self.fds.get(fd)?;
        let name = self.prestat_name(fd).ok_or(Errno::NotDir)?;
        if (len as usize) < name.len() {
            return Err(Errno::NameTooLong);
        }
        write_bytes(mem, buf, name.as_bytes())
    }
}
