//! The `path_*` functions: opening, creating, linking, renaming and removing names in the
//! shared directories. Paths are resolved by `bulwark_memfs` relative to a directory
//! descriptor the tool holds, never above it (EPERM, as wasmtime-wasi answers), following
//! symbolic links inside those bounds.

use alloc::string::String;

use bulwark_memfs::{Errno as FsErrno, Ino, Kind, Resolved};

use crate::fd::{Desc, OpenFile, times};
use crate::mem::{path, write_bytes, write_u32};
use crate::types::{fdflags, lookupflags, oflags, rights};
use crate::{Errno, Host, WasiCtx};

/// The arguments of `path_open` that say what to open and how.
#[derive(Clone, Copy, Debug)]
pub struct OpenRequest {
    /// `lookupflags`.
    pub lookup: u32,
    /// `oflags`.
    pub oflags: u16,
    /// Rights asked for: only `FD_READ` and `FD_WRITE` matter (as in wasmtime-wasi).
    pub base: u64,
    /// `fdflags`.
    pub fdflags: u16,
}

impl<H: Host> WasiCtx<H> {
    /// Resolves `path` under the directory descriptor `dirfd` (no link followed in the last
    /// component) to (parent directory, last name, trailing slash). A path that ends in `.`
    /// or `..` names a directory that exists: `exists` is returned for it.
    fn parent_and_name(
        &self,
        dirfd: u32,
        path: &str,
        exists: Errno,
    ) -> Result<(Ino, String, bool), Errno> {
        let dir = self.fds.dir(dirfd)?;
        let Resolved {
            dir,
            name,
            trailing_slash,
        } = self.fs.resolve(dir, path)?;
        match name {
            Some(name) => Ok((dir, name, trailing_slash)),
            None => Err(exists),
        }
    }

    /// The inode `path` names under `dirfd`, following a last symbolic link if `lookup` asks.
    fn lookup(&self, dirfd: u32, lookup: u32, path: &str) -> Result<Ino, Errno> {
        let dir = self.fds.dir(dirfd)?;
        let follow = lookup & lookupflags::SYMLINK_FOLLOW != 0;
        Ok(self.fs.lookup_with(dir, path, follow)?)
    }

    /// `path_open` on a path already read: returns the new descriptor. Behaves as
    /// wasmtime-wasi over Linux: `CREAT` or `TRUNC` open for writing; a directory opened for
    /// writing is EISDIR; `DIRECTORY` with `CREAT`, `EXCL` or `TRUNC` is EINVAL; the sync
    /// `fdflags` are ENOTSUP; a symbolic link not followed is ELOOP (ENOTDIR with
    /// `DIRECTORY`).
    pub fn open(&mut self, dirfd: u32, path: &str, req: OpenRequest) -> Result<u32, Errno> {
        let dir = match self.fds.get(dirfd)? {
            Desc::Dir { ino, .. } => *ino,
            Desc::File(_) => return Err(Errno::NotDir),
            _ => return Err(Errno::BadF),
        };
        let create = req.oflags & oflags::CREAT != 0;
        let excl = create && req.oflags & oflags::EXCL != 0;
        let trunc = req.oflags & oflags::TRUNC != 0;
        let directory = req.oflags & oflags::DIRECTORY != 0;
        let write = req.base & rights::FD_WRITE != 0 || create || trunc;
        let read = req.base & rights::FD_READ != 0 || !write;
        if req.fdflags & (fdflags::DSYNC | fdflags::RSYNC | fdflags::SYNC) != 0 {
            return Err(Errno::NotSup);
        }
        if directory && (create || req.oflags & oflags::EXCL != 0 || trunc) {
            return Err(Errno::Inval);
        }
        // Before anything is made: a full table must not leave a created file behind.
        if self.fds.is_full() {
            return Err(Errno::MFile);
        }
        // O_CREAT|O_EXCL never follows a last link (it exists: EEXIST).
        let follow =
            (req.lookup & lookupflags::SYMLINK_FOLLOW != 0 || path.ends_with('/')) && !excl;
        let r = self.fs.resolve_with(dir, path, follow)?;
        let existing = match &r.name {
            None => Some(r.dir),
            Some(name) => match self.fs.child(r.dir, name) {
                Ok(ino) => Some(ino),
                Err(FsErrno::NoEnt) => None,
                Err(e) => return Err(e.into()),
            },
        };
        let now = self.now_ns();
        let ino = match (existing, &r.name) {
            (Some(_), _) if excl => return Err(Errno::Exist),
            (Some(ino), _) => ino,
            (None, _) if !create => return Err(Errno::NoEnt),
            (None, _) if r.trailing_slash => return Err(Errno::IsDir),
            (None, Some(name)) => self.fs.create_file(r.dir, name, now)?,
            (None, None) => return Err(Errno::NoEnt),
        };
        let desc = match self.fs.stat(ino)?.kind {
            Kind::Symlink if directory => return Err(Errno::NotDir),
            Kind::Symlink => return Err(Errno::Loop),
            Kind::Dir => {
                if write {
                    return Err(Errno::IsDir);
                }
                Desc::Dir {
                    ino,
                    preopen: None,
                    read,
                }
            }
            Kind::File => {
                if directory || r.trailing_slash {
                    return Err(Errno::NotDir);
                }
                if trunc {
                    self.fs.set_size(ino, 0, now)?;
                }
                Desc::File(OpenFile {
                    ino,
                    pos: 0,
                    append: req.fdflags & fdflags::APPEND != 0,
                    nonblock: req.fdflags & fdflags::NONBLOCK != 0,
                    read,
                    write,
                })
            }
        };
        self.fs.open(ino)?;
        match self.fds.insert(desc) {
            Ok(fd) => Ok(fd),
            Err(e) => {
                self.fs.close(ino);
                Err(e)
            }
        }
    }

    /// `path_open`: stores the new descriptor at `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn path_open(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        lookup: u32,
        path_ptr: u32,
        path_len: u32,
        oflags: u32,
        base: u64,
        _inheriting: u64,
        fdflags: u32,
        out: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, path_ptr, path_len)?;
        let req = OpenRequest {
            lookup,
            oflags: u16::try_from(oflags).map_err(|_| Errno::Inval)?,
            base,
            fdflags: u16::try_from(fdflags).map_err(|_| Errno::Inval)?,
        };
        let fd = self.open(dirfd, &p, req)?;
        if let Err(e) = write_u32(mem, out, fd) {
            let _ = self.fd_close(fd);
            return Err(e);
        }
        Ok(())
    }

    /// `path_create_directory`.
    pub fn path_create_directory(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        p: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let (dir, name, _) = self.parent_and_name(dirfd, &p, Errno::Exist)?;
        let now = self.now_ns();
        self.fs.mkdir(dir, &name, now)?;
        Ok(())
    }

    /// `path_remove_directory`: a link to a directory is ENOTDIR; `.` is EINVAL.
    pub fn path_remove_directory(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        p: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let (dir, name, _) = self.parent_and_name(dirfd, &p, Errno::Inval)?;
        let now = self.now_ns();
        Ok(self.fs.rmdir(dir, &name, now)?)
    }

    /// `path_unlink_file`: a directory is EISDIR; a file or link named with a trailing slash
    /// is ENOTDIR.
    pub fn path_unlink_file(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        p: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let (dir, name, trailing_slash) = self.parent_and_name(dirfd, &p, Errno::IsDir)?;
        let kind = self.fs.stat(self.fs.child(dir, &name)?)?.kind;
        if trailing_slash && kind != Kind::Dir {
            return Err(Errno::NotDir);
        }
        let now = self.now_ns();
        Ok(self.fs.unlink(dir, &name, now)?)
    }

    /// `path_rename`: a trailing slash on either side requires a directory (ENOTDIR).
    #[allow(clippy::too_many_arguments)]
    pub fn path_rename(
        &mut self,
        mem: &mut [u8],
        from_fd: u32,
        from_ptr: u32,
        from_len: u32,
        to_fd: u32,
        to_ptr: u32,
        to_len: u32,
    ) -> Result<(), Errno> {
        let from = path(mem, from_ptr, from_len)?;
        let to = path(mem, to_ptr, to_len)?;
        let (from_dir, from_name, from_slash) =
            self.parent_and_name(from_fd, &from, Errno::Busy)?;
        let (to_dir, to_name, to_slash) = self.parent_and_name(to_fd, &to, Errno::Busy)?;
        let ino = self.fs.child(from_dir, &from_name)?;
        if (from_slash || to_slash) && self.fs.stat(ino)?.kind != Kind::Dir {
            return Err(Errno::NotDir);
        }
        let now = self.now_ns();
        Ok(self
            .fs
            .rename(from_dir, &from_name, to_dir, &to_name, now)?)
    }

    /// `path_link`: `SYMLINK_FOLLOW` is EINVAL, as wasmtime-wasi answers (the spec would
    /// follow a link); the link itself is linked. A directory is EPERM; a trailing slash on
    /// a file is ENOTDIR (source) or ENOENT (new name), as Linux answers.
    #[allow(clippy::too_many_arguments)]
    pub fn path_link(
        &mut self,
        mem: &mut [u8],
        from_fd: u32,
        lookup: u32,
        from_ptr: u32,
        from_len: u32,
        to_fd: u32,
        to_ptr: u32,
        to_len: u32,
    ) -> Result<(), Errno> {
        let from = path(mem, from_ptr, from_len)?;
        let to = path(mem, to_ptr, to_len)?;
        self.fds.dir(from_fd)?;
        self.fds.dir(to_fd)?;
        if lookup & lookupflags::SYMLINK_FOLLOW != 0 {
            return Err(Errno::Inval);
        }
        let (from_dir, from_name, from_slash) =
            self.parent_and_name(from_fd, &from, Errno::Perm)?;
        let ino = self.fs.child(from_dir, &from_name)?;
        let kind = self.fs.stat(ino)?.kind;
        if kind == Kind::Dir {
            return Err(Errno::Perm);
        }
        if from_slash {
            return Err(Errno::NotDir);
        }
        let (to_dir, to_name, to_slash) = self.parent_and_name(to_fd, &to, Errno::Exist)?;
        if self.fs.child(to_dir, &to_name).is_ok() {
            return Err(Errno::Exist);
        }
        if to_slash {
            return Err(Errno::NoEnt);
        }
        Ok(self.fs.link(ino, to_dir, &to_name)?)
    }

    /// `path_filestat_get`.
    pub fn path_filestat_get(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        lookup: u32,
        p: u32,
        len: u32,
        out: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let ino = self.lookup(dirfd, lookup, &p)?;
        write_bytes(mem, out, &self.filestat(ino)?.encode())
    }

    /// `path_filestat_set_times`.
    #[allow(clippy::too_many_arguments)]
    pub fn path_filestat_set_times(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        lookup: u32,
        p: u32,
        len: u32,
        atim: u64,
        mtim: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let flags = u16::try_from(flags).map_err(|_| Errno::Inval)?;
        let (a, m) = times(self.now_ns(), atim, mtim, flags)?;
        let ino = self.lookup(dirfd, lookup, &p)?;
        Ok(self.fs.set_times(ino, a, m)?)
    }

    /// `path_symlink`: an absolute target is EPERM (as wasmtime-wasi's cap-std answers, so a
    /// link can never point outside); an existing name is EEXIST; a new name with a trailing
    /// slash is ENOENT (Linux).
    pub fn path_symlink(
        &mut self,
        mem: &mut [u8],
        target_ptr: u32,
        target_len: u32,
        dirfd: u32,
        p: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let target = path(mem, target_ptr, target_len)?;
        let p = path(mem, p, len)?;
        self.fds.dir(dirfd)?;
        if target.starts_with('/') {
            return Err(Errno::Perm);
        }
        let (dir, name, trailing_slash) = self.parent_and_name(dirfd, &p, Errno::Exist)?;
        if self.fs.child(dir, &name).is_ok() {
            return Err(Errno::Exist);
        }
        if trailing_slash {
            return Err(Errno::NoEnt);
        }
        let now = self.now_ns();
        self.fs.symlink(dir, &name, &target, now)?;
        Ok(())
    }

    /// `path_readlink`: the target, cut to the buffer (no error when it is cut, as
    /// wasmtime-wasi does); EINVAL for something that is not a link.
    #[allow(clippy::too_many_arguments)]
    pub fn path_readlink(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        p: u32,
        len: u32,
        buf: u32,
        buf_len: u32,
        used: u32,
    ) -> Result<(), Errno> {
        let p = path(mem, p, len)?;
        let ino = self.lookup(dirfd, 0, &p)?;
        let target = self.fs.readlink(ino)?;
        let n = target.len().min(buf_len as usize);
        write_bytes(mem, buf, &target.as_bytes()[..n])?;
        write_u32(mem, used, u32::try_from(n).map_err(|_| Errno::Overflow)?)
    }
}
