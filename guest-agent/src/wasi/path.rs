//! The `path_*` functions: opening, creating, renaming and removing names in the shared
//! directories. Paths are resolved by `bulwark_memfs` relative to a directory descriptor the
//! tool holds, never above it; there are no symbolic links.

use alloc::string::String;

use bulwark_memfs::{Errno, Ino, Kind};
use wasmtime::{Caller, Linker};

use super::fd::{self, Desc, Fd, OpenFile, rights};
use super::mem::{path, write_bytes, write_u32};
use super::{Ctx, MODULE, errno, with_mem};

/// `oflags` bits.
mod oflags {
    pub const CREAT: u32 = 1;
    pub const DIRECTORY: u32 = 2;
    pub const EXCL: u32 = 4;
    pub const TRUNC: u32 = 8;
}

/// `fdflags::append`.
const FDFLAGS_APPEND: u32 = 1;

/// The arguments of `path_open` that say what to open and how.
struct OpenRequest {
    oflags: u32,
    base: u64,
    inheriting: u64,
    fdflags: u32,
}

/// Resolves `path` under the directory descriptor `dirfd` to an existing inode.
fn lookup(ctx: &Ctx, dirfd: u32, path: &str) -> Result<Ino, i32> {
    let dir = ctx.fds.dir(dirfd)?;
    ctx.fs.lookup(dir, path).map_err(i32::from)
}

/// Resolves `path` under `dirfd` to (parent directory, new or existing last name). A path that
/// ends in `.` or `..` names a directory that exists: `exists` is returned for it.
fn parent_and_name(
    ctx: &Ctx,
    dirfd: u32,
    path: &str,
    exists: i32,
) -> Result<(Ino, String, bool), i32> {
    let dir = ctx.fds.dir(dirfd)?;
    let r = ctx.fs.resolve(dir, path)?;
    match r.name {
        Some(name) => Ok((r.dir, name.into(), r.trailing_slash)),
        None => Err(exists),
    }
}

fn path_open(ctx: &mut Ctx, dirfd: u32, path: &str, req: &OpenRequest) -> Result<u32, i32> {
    let dir = ctx.fds.dir(dirfd)?;
    let inheritable = ctx.fds.get(dirfd)?.inheriting;
    let r = ctx.fs.resolve(dir, path)?;
    let existing = match r.name {
        None => Some(r.dir),
        Some(name) => match ctx.fs.child(r.dir, name) {
            Ok(ino) => Some(ino),
            Err(Errno::NoEnt) => None,
            Err(e) => return Err(e.into()),
        },
    };
    let wants_write = req.base & rights::WRITING != 0 || req.fdflags & FDFLAGS_APPEND != 0;
    let now = ctx.now_ns();
    let ino = match existing {
        Some(_) if req.oflags & oflags::CREAT != 0 && req.oflags & oflags::EXCL != 0 => {
            return Err(errno::EXIST);
        }
        Some(ino) => ino,
        None if req.oflags & oflags::CREAT == 0 => return Err(errno::NOENT),
        None if r.trailing_slash || req.oflags & oflags::DIRECTORY != 0 => {
            return Err(errno::ISDIR);
        }
        None => {
            let name = r.name.ok_or(errno::NOENT)?;
            ctx.fs.create_file(r.dir, name, now)?
        }
    };
    let base = req.base & inheritable;
    let inheriting = req.inheriting & inheritable;
    let desc = match ctx.fs.stat(ino)?.kind {
        Kind::Dir => {
            if wants_write || req.oflags & oflags::TRUNC != 0 {
                return Err(errno::ISDIR);
            }
            Desc::Dir { ino, preopen: None }
        }
        Kind::File => {
            if req.oflags & oflags::DIRECTORY != 0 || r.trailing_slash {
                return Err(errno::NOTDIR);
            }
            let write = base & rights::WRITING != 0 || req.fdflags & FDFLAGS_APPEND != 0;
            if req.oflags & oflags::TRUNC != 0 {
                if !write {
                    return Err(errno::NOTCAPABLE);
                }
                ctx.fs.set_size(ino, 0, now)?;
            }
            Desc::File(OpenFile {
                ino,
                pos: 0,
                append: req.fdflags & FDFLAGS_APPEND != 0,
                read: base & rights::FD_READ != 0,
                write,
            })
        }
    };
    ctx.fs.open(ino)?;
    match ctx.fds.insert(Fd {
        desc,
        base,
        inheriting,
    }) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            ctx.fs.close(ino);
            Err(e)
        }
    }
}

fn create_directory(ctx: &mut Ctx, dirfd: u32, path: &str) -> Result<(), i32> {
    let (dir, name, _) = parent_and_name(ctx, dirfd, path, errno::EXIST)?;
    let now = ctx.now_ns();
    ctx.fs.mkdir(dir, &name, now).map(|_| ()).map_err(i32::from)
}

fn remove_directory(ctx: &mut Ctx, dirfd: u32, path: &str) -> Result<(), i32> {
    let (dir, name, _) = parent_and_name(ctx, dirfd, path, errno::INVAL)?;
    let now = ctx.now_ns();
    ctx.fs.rmdir(dir, &name, now).map_err(i32::from)
}

fn unlink_file(ctx: &mut Ctx, dirfd: u32, path: &str) -> Result<(), i32> {
    let (dir, name, trailing_slash) = parent_and_name(ctx, dirfd, path, errno::ISDIR)?;
    if trailing_slash && ctx.fs.stat(ctx.fs.child(dir, &name)?)?.kind == Kind::File {
        return Err(errno::NOTDIR);
    }
    let now = ctx.now_ns();
    ctx.fs.unlink(dir, &name, now).map_err(i32::from)
}

fn rename(ctx: &mut Ctx, from_fd: u32, from: &str, to_fd: u32, to: &str) -> Result<(), i32> {
    let (from_dir, from_name, from_slash) = parent_and_name(ctx, from_fd, from, errno::BUSY)?;
    let (to_dir, to_name, to_slash) = parent_and_name(ctx, to_fd, to, errno::BUSY)?;
    let ino = ctx.fs.child(from_dir, &from_name)?;
    if (from_slash || to_slash) && ctx.fs.stat(ino)?.kind == Kind::File {
        return Err(errno::NOTDIR);
    }
    let now = ctx.now_ns();
    ctx.fs
        .rename(from_dir, &from_name, to_dir, &to_name, now)
        .map_err(i32::from)
}

fn link(ctx: &mut Ctx, from_fd: u32, from: &str, to_fd: u32, to: &str) -> Result<(), i32> {
    let ino = lookup(ctx, from_fd, from)?;
    let (to_dir, to_name, _) = parent_and_name(ctx, to_fd, to, errno::EXIST)?;
    ctx.fs.link(ino, to_dir, &to_name).map_err(i32::from)
}

/// Adds the `path_*` functions to `linker`.
pub fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "path_open",
        |mut c: Caller<'_, Ctx>,
         dirfd: u32,
         _lookupflags: u32,
         p: u32,
         len: u32,
         oflags: u32,
         base: u64,
         inheriting: u64,
         fdflags: u32,
         out: u32| {
            with_mem(&mut c, |d, ctx| {
                let path = path(d, p, len)?;
                let req = OpenRequest {
                    oflags,
                    base,
                    inheriting,
                    fdflags,
                };
                let fd = path_open(ctx, dirfd, &path, &req)?;
                if let Err(e) = write_u32(d, out, fd) {
                    let _ = fd::close(ctx, fd);
                    return Err(e);
                }
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |mut c: Caller<'_, Ctx>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |d, ctx| {
                create_directory(ctx, dirfd, &path(d, p, len)?)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_remove_directory",
        |mut c: Caller<'_, Ctx>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |d, ctx| {
                remove_directory(ctx, dirfd, &path(d, p, len)?)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_unlink_file",
        |mut c: Caller<'_, Ctx>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |d, ctx| unlink_file(ctx, dirfd, &path(d, p, len)?))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_rename",
        |mut c: Caller<'_, Ctx>, fd1: u32, p1: u32, l1: u32, fd2: u32, p2: u32, l2: u32| {
            with_mem(&mut c, |d, ctx| {
                rename(ctx, fd1, &path(d, p1, l1)?, fd2, &path(d, p2, l2)?)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_link",
        |mut c: Caller<'_, Ctx>,
         fd1: u32,
         _flags: u32,
         p1: u32,
         l1: u32,
         fd2: u32,
         p2: u32,
         l2: u32| {
            with_mem(&mut c, |d, ctx| {
                link(ctx, fd1, &path(d, p1, l1)?, fd2, &path(d, p2, l2)?)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |mut c: Caller<'_, Ctx>, dirfd: u32, _flags: u32, p: u32, len: u32, out: u32| {
            with_mem(&mut c, |d, ctx| {
                let ino = lookup(ctx, dirfd, &path(d, p, len)?)?;
                write_bytes(d, out, &fd::filestat(ctx, ino)?)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_set_times",
        |mut c: Caller<'_, Ctx>,
         dirfd: u32,
         _flags: u32,
         p: u32,
         len: u32,
         atim: u64,
         mtim: u64,
         fst: u32| {
            with_mem(&mut c, |d, ctx| {
                let ino = lookup(ctx, dirfd, &path(d, p, len)?)?;
                fd::set_times(ctx, ino, atim, mtim, fst)
            })
        },
    )?;
    // The shared directories hold no symbolic links (the host refuses to copy them in), and a
    // tool cannot make one.
    linker.func_wrap(
        MODULE,
        "path_symlink",
        |mut c: Caller<'_, Ctx>, p1: u32, l1: u32, dirfd: u32, p2: u32, l2: u32| {
            with_mem(&mut c, |d, ctx| {
                path(d, p1, l1)?;
                let (dir, name, _) = parent_and_name(ctx, dirfd, &path(d, p2, l2)?, errno::EXIST)?;
                if ctx.fs.child(dir, &name).is_ok() {
                    return Err(errno::EXIST);
                }
                Err(errno::NOTSUP)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_readlink",
        |mut c: Caller<'_, Ctx>,
         dirfd: u32,
         p: u32,
         len: u32,
         _buf: u32,
         _buf_len: u32,
         _used: u32| {
            with_mem(&mut c, |d, ctx| {
                lookup(ctx, dirfd, &path(d, p, len)?)?;
                // It exists, and nothing here is a symbolic link.
                Err(errno::INVAL)
            })
        },
    )?;
    Ok(())
}
