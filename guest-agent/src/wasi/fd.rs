//! Descriptors and the `fd_*` functions: standard input and output, the preopened shared
//! directories, and the files and directories a tool opens in them.

use alloc::collections::BTreeMap;
use alloc::string::String;

use bulwark_memfs::{Ino, Kind};
use wasmtime::{Caller, Linker};

use super::mem::{iovecs, slice, slice_mut, write_bytes, write_u32, write_u64};
use super::{Ctx, MODULE, errno, result, with_mem};

/// Most descriptors a tool may hold at once.
pub const MAX_FDS: usize = 1024;

/// WASI rights bits used here.
pub mod rights {
    /// `fd_datasync`.
    pub const FD_DATASYNC: u64 = 1 << 0;
    /// `fd_read`.
    pub const FD_READ: u64 = 1 << 1;
    /// `fd_write`.
    pub const FD_WRITE: u64 = 1 << 6;
    /// `fd_allocate`.
    pub const FD_ALLOCATE: u64 = 1 << 8;
    /// `fd_filestat_set_size`.
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    /// Every right WASI preview 1 defines.
    pub const ALL: u64 = (1 << 30) - 1;
    /// Rights that make a file descriptor writable.
    pub const WRITING: u64 = FD_WRITE | FD_DATASYNC | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
}

/// WASI `filetype` values.
pub mod filetype {
    /// A character device (standard input and output).
    pub const CHARACTER_DEVICE: u8 = 2;
    /// A directory.
    pub const DIRECTORY: u8 = 3;
    /// A regular file.
    pub const REGULAR_FILE: u8 = 4;
}

/// `fdflags::append`.
const FDFLAGS_APPEND: u16 = 1;

/// A file opened by the tool.
pub struct OpenFile {
    /// Its inode.
    pub ino: Ino,
    /// Offset of the next read or write.
    pub pos: u64,
    /// Writes go to the end.
    pub append: bool,
    /// Opened for reading.
    pub read: bool,
    /// Opened for writing.
    pub write: bool,
}

/// What a descriptor refers to.
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
    },
    /// A regular file.
    File(OpenFile),
}

/// A descriptor: what it refers to and its rights.
pub struct Fd {
    /// What it refers to.
    pub desc: Desc,
    /// Rights on this descriptor.
    pub base: u64,
    /// Rights descriptors opened through this one may get.
    pub inheriting: u64,
}

impl Fd {
    /// The inode behind a file or directory descriptor.
    pub fn ino(&self) -> Option<Ino> {
        match &self.desc {
            Desc::Dir { ino, .. } => Some(*ino),
            Desc::File(f) => Some(f.ino),
            _ => None,
        }
    }
}

/// The descriptor table.
pub struct Fds {
    table: BTreeMap<u32, Fd>,
}

impl Fds {
    /// A table with standard input, output and error at 0, 1 and 2.
    pub fn new() -> Self {
        let mut table = BTreeMap::new();
        let stdio = [
            (Desc::Stdin, rights::FD_READ),
            (Desc::Stdout, rights::FD_WRITE),
            (Desc::Stderr, rights::FD_WRITE),
        ];
        for (n, (desc, base)) in (0u32..).zip(stdio) {
            table.insert(
                n,
                Fd {
                    desc,
                    base,
                    inheriting: 0,
                },
            );
        }
        Self { table }
    }

    /// The descriptor `fd`, or EBADF.
    pub fn get(&self, fd: u32) -> Result<&Fd, i32> {
        self.table.get(&fd).ok_or(errno::BADF)
    }

    /// The descriptor `fd`, mutably, or EBADF.
    pub fn get_mut(&mut self, fd: u32) -> Result<&mut Fd, i32> {
        self.table.get_mut(&fd).ok_or(errno::BADF)
    }

    /// The directory inode behind `fd`: ENOTDIR for a file, EBADF for anything else.
    pub fn dir(&self, fd: u32) -> Result<Ino, i32> {
        match &self.get(fd)?.desc {
            Desc::Dir { ino, .. } => Ok(*ino),
            Desc::File(_) => Err(errno::NOTDIR),
            _ => Err(errno::BADF),
        }
    }

    /// Puts `fd` at the lowest free number; EMFILE when the table is full.
    pub fn insert(&mut self, fd: Fd) -> Result<u32, i32> {
        if self.table.len() >= MAX_FDS {
            return Err(errno::MFILE);
        }
        let mut n = 0u32;
        for &used in self.table.keys() {
            if used != n {
                break;
            }
            n += 1;
        }
        self.table.insert(n, fd);
        Ok(n)
    }

    /// Takes `fd` out of the table.
    pub fn remove(&mut self, fd: u32) -> Result<Fd, i32> {
        self.table.remove(&fd).ok_or(errno::BADF)
    }
}

/// The open file behind `fd`: EBADF for anything else, as wasmtime's WASI does.
fn file(ctx: &mut Ctx, fd: u32) -> Result<&mut OpenFile, i32> {
    match &mut ctx.fds.get_mut(fd)?.desc {
        Desc::File(f) => Ok(f),
        _ => Err(errno::BADF),
    }
}

/// A writable open file behind `fd`.
fn writable(ctx: &mut Ctx, fd: u32) -> Result<&mut OpenFile, i32> {
    let f = file(ctx, fd)?;
    if !f.write {
        return Err(errno::BADF);
    }
    Ok(f)
}

/// What a read or write goes to, copied out of the descriptor table.
#[derive(Clone, Copy)]
enum Stream {
    Stdin,
    Stdout,
    Stderr,
    File,
    Other,
}

fn stream(ctx: &Ctx, fd: u32) -> Result<Stream, i32> {
    Ok(match ctx.fds.get(fd)?.desc {
        Desc::Stdin => Stream::Stdin,
        Desc::Stdout => Stream::Stdout,
        Desc::Stderr => Stream::Stderr,
        Desc::File(_) => Stream::File,
        Desc::Dir { .. } => Stream::Other,
    })
}

/// `fd_read` (`offset` None) and `fd_pread`: returns the bytes read.
fn fd_read(
    d: &mut [u8],
    ctx: &mut Ctx,
    fd: u32,
    iovs: u32,
    count: u32,
    offset: Option<u64>,
) -> Result<u32, i32> {
    let list = iovecs(d, iovs, count)?;
    let mut total = 0u32;
    match stream(ctx, fd)? {
        Stream::Stdin => {
            if offset.is_some() {
                return Err(errno::SPIPE);
            }
            for (ptr, len) in list {
                let rest = ctx.stdin.get(ctx.stdin_pos..).unwrap_or(&[]);
                let n = rest.len().min(len as usize);
                write_bytes(d, ptr, &rest[..n])?;
                ctx.stdin_pos += n;
                total = total.saturating_add(n as u32);
            }
        }
        Stream::File => {
            let f = file(ctx, fd)?;
            if !f.read {
                return Err(errno::BADF);
            }
            let ino = f.ino;
            let mut pos = offset.unwrap_or(f.pos);
            for (ptr, len) in list {
                let n = ctx.fs.read(ino, pos, slice_mut(d, ptr, len)?)?;
                pos = pos.saturating_add(n as u64);
                total = total.saturating_add(n as u32);
                if n < len as usize {
                    break;
                }
            }
            if offset.is_none() {
                file(ctx, fd)?.pos = pos;
            }
        }
        Stream::Stdout | Stream::Stderr | Stream::Other => return Err(errno::BADF),
    }
    Ok(total)
}

/// `fd_write` (`offset` None) and `fd_pwrite`: returns the bytes written. Output past the
/// `--max-output` cap is accepted and dropped (the response says so).
fn fd_write(
    d: &mut [u8],
    ctx: &mut Ctx,
    fd: u32,
    iovs: u32,
    count: u32,
    offset: Option<u64>,
) -> Result<u32, i32> {
    let list = iovecs(d, iovs, count)?;
    let mut total = 0u32;
    match stream(ctx, fd)? {
        Stream::Stdout | Stream::Stderr if offset.is_some() => return Err(errno::SPIPE),
        s @ (Stream::Stdout | Stream::Stderr) => {
            let out = if matches!(s, Stream::Stdout) {
                &mut ctx.stdout
            } else {
                &mut ctx.stderr
            };
            for (ptr, len) in list {
                out.push(slice(d, ptr, len)?);
                total = total.checked_add(len).ok_or(errno::OVERFLOW)?;
            }
        }
        Stream::File => {
            let now = ctx.now_ns();
            let f = writable(ctx, fd)?;
            let (ino, append, at) = (f.ino, f.append, f.pos);
            let mut pos = match offset {
                Some(at) => at,
                None if append => ctx.fs.stat(ino)?.size,
                None => at,
            };
            for (ptr, len) in list {
                let n = ctx.fs.write(ino, pos, slice(d, ptr, len)?, now)?;
                pos = pos.saturating_add(n as u64);
                total = total.checked_add(len).ok_or(errno::OVERFLOW)?;
            }
            if offset.is_none() {
                file(ctx, fd)?.pos = pos;
            }
        }
        Stream::Stdin | Stream::Other => return Err(errno::BADF),
    }
    Ok(total)
}

fn fd_seek(ctx: &mut Ctx, fd: u32, offset: i64, whence: u32) -> Result<u64, i32> {
    if matches!(
        ctx.fds.get(fd)?.desc,
        Desc::Stdin | Desc::Stdout | Desc::Stderr
    ) {
        return Err(errno::SPIPE);
    }
    let ino = file(ctx, fd)?.ino;
    let size = ctx.fs.stat(ino)?.size;
    let f = file(ctx, fd)?;
    let base = match whence {
        0 => 0,
        1 => f.pos,
        2 => size,
        _ => return Err(errno::INVAL),
    };
    let pos = base.checked_add_signed(offset).ok_or(errno::INVAL)?;
    if i64::try_from(pos).is_err() {
        return Err(errno::INVAL);
    }
    f.pos = pos;
    Ok(pos)
}

/// Closes `fd`, letting go of its inode.
pub fn close(ctx: &mut Ctx, fd: u32) -> Result<(), i32> {
    let entry = ctx.fds.remove(fd)?;
    if let Some(ino) = entry.ino() {
        ctx.fs.close(ino);
    }
    Ok(())
}

fn fd_renumber(ctx: &mut Ctx, from: u32, to: u32) -> Result<(), i32> {
    ctx.fds.get(from)?;
    ctx.fds.get(to)?;
    if from == to {
        return Ok(());
    }
    close(ctx, to)?;
    let entry = ctx.fds.remove(from)?;
    ctx.fds.table.insert(to, entry);
    Ok(())
}

/// The 24-byte `fdstat` of a descriptor.
fn fdstat(ctx: &Ctx, fd: u32) -> Result<[u8; 24], i32> {
    let entry = ctx.fds.get(fd)?;
    let mut s = [0u8; 24];
    let (kind, flags) = match &entry.desc {
        Desc::Stdin | Desc::Stdout | Desc::Stderr => (filetype::CHARACTER_DEVICE, 0),
        Desc::Dir { .. } => (filetype::DIRECTORY, 0),
        Desc::File(f) => (
            filetype::REGULAR_FILE,
            if f.append { FDFLAGS_APPEND } else { 0 },
        ),
    };
    s[0] = kind;
    s[2..4].copy_from_slice(&flags.to_le_bytes());
    s[8..16].copy_from_slice(&entry.base.to_le_bytes());
    s[16..24].copy_from_slice(&entry.inheriting.to_le_bytes());
    Ok(s)
}

/// The 64-byte `filestat` of an inode.
pub fn filestat(ctx: &Ctx, ino: Ino) -> Result<[u8; 64], i32> {
    let st = ctx.fs.stat(ino)?;
    let mut s = [0u8; 64];
    s[0..8].copy_from_slice(&1u64.to_le_bytes());
    s[8..16].copy_from_slice(&st.ino.to_le_bytes());
    s[16] = match st.kind {
        Kind::Dir => filetype::DIRECTORY,
        Kind::File => filetype::REGULAR_FILE,
    };
    s[24..32].copy_from_slice(&st.nlink.to_le_bytes());
    s[32..40].copy_from_slice(&st.size.to_le_bytes());
    s[40..48].copy_from_slice(&st.atime_ns.to_le_bytes());
    s[48..56].copy_from_slice(&st.mtime_ns.to_le_bytes());
    s[56..64].copy_from_slice(&st.mtime_ns.to_le_bytes());
    Ok(s)
}

/// Applies `fstflags` (`atim` 1, `atim_now` 2, `mtim` 4, `mtim_now` 8) to an inode.
pub fn set_times(ctx: &mut Ctx, ino: Ino, atim: u64, mtim: u64, flags: u32) -> Result<(), i32> {
    if (flags & 3 == 3) || (flags & 12 == 12) || flags > 15 {
        return Err(errno::INVAL);
    }
    let now = ctx.now_ns();
    let pick = |set: u32, set_now: u32, value: u64| {
        if flags & set != 0 {
            Some(value)
        } else if flags & set_now != 0 {
            Some(now)
        } else {
            None
        }
    };
    ctx.fs
        .set_times(ino, pick(1, 2, atim), pick(4, 8, mtim))
        .map_err(i32::from)
}

/// Fills `buf` with directory entries from `cookie` on, the last one cut at the end of the
/// buffer as WASI prescribes; returns the bytes used.
fn fd_readdir(
    d: &mut [u8],
    ctx: &Ctx,
    fd: u32,
    buf: u32,
    len: u32,
    cookie: u64,
) -> Result<u32, i32> {
    let ino = match &ctx.fds.get(fd)?.desc {
        Desc::Dir { ino, .. } => *ino,
        Desc::File(_) => return Err(errno::NOTDIR),
        _ => return Err(errno::BADF),
    };
    let out = slice_mut(d, buf, len)?;
    let mut used = 0usize;
    let list = ctx.fs.list(ino)?;
    let skip = usize::try_from(cookie).unwrap_or(usize::MAX);
    for (i, entry) in list.iter().enumerate().skip(skip) {
        let mut header = [0u8; 24];
        header[0..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        header[8..16].copy_from_slice(&entry.ino.to_le_bytes());
        header[16..20].copy_from_slice(&(entry.name.len() as u32).to_le_bytes());
        header[20] = match entry.kind {
            Kind::Dir => filetype::DIRECTORY,
            Kind::File => filetype::REGULAR_FILE,
        };
        for part in [&header[..], entry.name.as_bytes()] {
            let room = out.len() - used;
            let n = part.len().min(room);
            out[used..used + n].copy_from_slice(&part[..n]);
            used += n;
            if n < part.len() {
                return u32::try_from(used).map_err(|_| errno::FAULT);
            }
        }
    }
    u32::try_from(used).map_err(|_| errno::FAULT)
}

fn prestat_name(ctx: &Ctx, fd: u32) -> Result<&str, i32> {
    match &ctx.fds.get(fd)?.desc {
        Desc::Dir {
            preopen: Some(name),
            ..
        } => Ok(name),
        _ => Err(errno::BADF),
    }
}

fn fd_allocate(ctx: &mut Ctx, fd: u32, offset: u64, len: u64) -> Result<(), i32> {
    let ino = writable(ctx, fd)?.ino;
    let end = offset.checked_add(len).ok_or(errno::FBIG)?;
    let now = ctx.now_ns();
    if ctx.fs.stat(ino)?.size < end {
        ctx.fs.set_size(ino, end, now)?;
    }
    Ok(())
}

fn fd_set_size(ctx: &mut Ctx, fd: u32, size: u64) -> Result<(), i32> {
    let ino = writable(ctx, fd)?.ino;
    let now = ctx.now_ns();
    ctx.fs.set_size(ino, size, now).map_err(i32::from)
}

fn fd_set_flags(ctx: &mut Ctx, fd: u32, flags: u32) -> Result<(), i32> {
    match &mut ctx.fds.get_mut(fd)?.desc {
        Desc::File(f) => {
            f.append = flags & u32::from(FDFLAGS_APPEND) != 0;
            Ok(())
        }
        Desc::Dir { .. } => Err(errno::BADF),
        _ => Err(errno::NOTSUP),
    }
}

fn fd_set_rights(ctx: &mut Ctx, fd: u32, base: u64, inheriting: u64) -> Result<(), i32> {
    let entry = ctx.fds.get_mut(fd)?;
    if base & !entry.base != 0 || inheriting & !entry.inheriting != 0 {
        return Err(errno::NOTCAPABLE);
    }
    entry.base = base;
    entry.inheriting = inheriting;
    if let Desc::File(f) = &mut entry.desc {
        f.read &= base & rights::FD_READ != 0;
        f.write &= base & rights::WRITING != 0;
    }
    Ok(())
}

/// An inode behind `fd` for stat-like calls; standard streams have none.
fn inode(ctx: &Ctx, fd: u32) -> Result<Option<Ino>, i32> {
    Ok(ctx.fds.get(fd)?.ino())
}

/// `fd_read`, `fd_write` and their positioned forms.
type Transfer = fn(&mut [u8], &mut Ctx, u32, u32, u32, Option<u64>) -> Result<u32, i32>;

/// Runs a read or write and stores the byte count at `out`.
fn transfer(
    c: &mut Caller<'_, Ctx>,
    f: Transfer,
    fd: u32,
    iovs: u32,
    count: u32,
    offset: Option<u64>,
    out: u32,
) -> i32 {
    with_mem(c, |d, ctx| {
        let n = f(d, ctx, fd, iovs, count, offset)?;
        write_u32(d, out, n)
    })
}

/// Adds the `fd_*` functions to `linker`.
pub fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, out: u32| {
            transfer(&mut c, fd_write, fd, iovs, count, None, out)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pwrite",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, at: u64, out: u32| {
            transfer(&mut c, fd_write, fd, iovs, count, Some(at), out)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, out: u32| {
            transfer(&mut c, fd_read, fd, iovs, count, None, out)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pread",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, at: u64, out: u32| {
            transfer(&mut c, fd_read, fd, iovs, count, Some(at), out)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |mut c: Caller<'_, Ctx>, fd: u32, offset: i64, whence: u32, new: u32| {
            with_mem(&mut c, |d, ctx| {
                let pos = fd_seek(ctx, fd, offset, whence)?;
                write_u64(d, new, pos)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_tell",
        |mut c: Caller<'_, Ctx>, fd: u32, out: u32| {
            with_mem(&mut c, |d, ctx| {
                let pos = fd_seek(ctx, fd, 0, 1)?;
                write_u64(d, out, pos)
            })
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |mut c: Caller<'_, Ctx>, fd: u32| {
        result(close(c.data_mut(), fd))
    })?;
    linker.func_wrap(
        MODULE,
        "fd_renumber",
        |mut c: Caller<'_, Ctx>, from: u32, to: u32| result(fd_renumber(c.data_mut(), from, to)),
    )?;
    for name in ["fd_sync", "fd_datasync"] {
        linker.func_wrap(MODULE, name, |c: Caller<'_, Ctx>, fd: u32| {
            // Nothing is ever written anywhere but memory: syncing is done at once.
            result(c.data().fds.get(fd).map(|_| ()))
        })?;
    }
    linker.func_wrap(
        MODULE,
        "fd_advise",
        |c: Caller<'_, Ctx>, fd: u32, _offset: u64, _len: u64, advice: u32| {
            if advice > 5 {
                return errno::INVAL;
            }
            result(c.data().fds.get(fd).map(|_| ()))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_allocate",
        |mut c: Caller<'_, Ctx>, fd: u32, offset: u64, len: u64| {
            result(fd_allocate(c.data_mut(), fd, offset, len))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: Caller<'_, Ctx>, fd: u32, out: u32| {
            with_mem(&mut c, |d, ctx| write_bytes(d, out, &fdstat(ctx, fd)?))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |mut c: Caller<'_, Ctx>, fd: u32, flags: u32| result(fd_set_flags(c.data_mut(), fd, flags)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_rights",
        |mut c: Caller<'_, Ctx>, fd: u32, base: u64, inheriting: u64| {
            result(fd_set_rights(c.data_mut(), fd, base, inheriting))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_get",
        |mut c: Caller<'_, Ctx>, fd: u32, out: u32| {
            with_mem(&mut c, |d, ctx| {
                let stat = match inode(ctx, fd)? {
                    Some(ino) => filestat(ctx, ino)?,
                    None => {
                        let mut s = [0u8; 64];
                        s[16] = filetype::CHARACTER_DEVICE;
                        s
                    }
                };
                write_bytes(d, out, &stat)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_size",
        |mut c: Caller<'_, Ctx>, fd: u32, size: u64| result(fd_set_size(c.data_mut(), fd, size)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_times",
        |mut c: Caller<'_, Ctx>, fd: u32, atim: u64, mtim: u64, flags: u32| {
            let ctx = c.data_mut();
            result(match inode(ctx, fd) {
                Ok(Some(ino)) => set_times(ctx, ino, atim, mtim, flags),
                Ok(None) => Err(errno::BADF),
                Err(e) => Err(e),
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |mut c: Caller<'_, Ctx>, fd: u32, buf: u32, len: u32, cookie: u64, used: u32| {
            with_mem(&mut c, |d, ctx| {
                let n = fd_readdir(d, ctx, fd, buf, len, cookie)?;
                write_u32(d, used, n)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |mut c: Caller<'_, Ctx>, fd: u32, out: u32| {
            with_mem(&mut c, |d, ctx| {
                let len = u32::try_from(prestat_name(ctx, fd)?.len()).map_err(|_| errno::FAULT)?;
                // prestat: tag 0 (a directory), then the name's length at offset 4.
                let mut s = [0u8; 8];
                s[4..8].copy_from_slice(&len.to_le_bytes());
                write_bytes(d, out, &s)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |mut c: Caller<'_, Ctx>, fd: u32, buf: u32, len: u32| {
            with_mem(&mut c, |d, ctx| {
                let name = prestat_name(ctx, fd)?;
                if (len as usize) < name.len() {
                    return Err(errno::NAMETOOLONG);
                }
                write_bytes(d, buf, name.as_bytes())
            })
        },
    )?;
    Ok(())
}
