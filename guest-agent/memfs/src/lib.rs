//! The guest's in-memory file system: what a tool sees in the directories shared with it
//! (`bulwark run --dir`).
//!
//! Plain data, `no_std` + `alloc`, with no Wasm in it, so it is unit-tested on the host. The
//! guest's WASI layer maps descriptors and guest memory onto it. Inodes live in one map; a
//! directory maps names to inode numbers. An inode lives while a directory entry or an open
//! descriptor holds it, so a file unlinked while open can still be read, as on POSIX.
//!
//! Every path comes from an untrusted tool. Resolution starts at a directory the tool holds
//! and never goes above it: `..` past it, or an absolute path, is [`Errno::Perm`]. Symbolic
//! links are followed inside the same bounds (an absolute target, or one that climbs above the
//! starting directory, is [`Errno::Perm`] too; more than [`MAX_SYMLINK_HOPS`] links in one
//! lookup is [`Errno::Loop`]). Total file bytes and the number of inodes are capped
//! ([`Limits`]): going past either is [`Errno::NoSpc`], never an allocation failure of the
//! guest.
//!
//! A directory lists its entries in the order they were added (the order the host sent them,
//! then creation order), as a real file system's `readdir` does, not sorted by name.

#![no_std]
extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use bulwark_proto::tree::{self, Entry, Node};

/// Inode number.
pub type Ino = u64;

/// Why a file-system operation failed. The WASI layer (`bulwark-wasi`) maps each one to its
/// WASI error number; the numbers are defined there only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Errno {
    /// Bad descriptor or inode.
    #[error("bad inode")]
    BadF,
    /// The name exists.
    #[error("the name exists")]
    Exist,
    /// The file would exceed the largest size.
    #[error("file too large")]
    FBig,
    /// Invalid argument (such as moving a directory into itself).
    #[error("invalid argument")]
    Inval,
    /// Is a directory.
    #[error("is a directory")]
    IsDir,
    /// Too many symbolic links in one lookup.
    #[error("too many symbolic links")]
    Loop,
    /// A name or path is too long.
    #[error("name too long")]
    NameTooLong,
    /// No such file or directory.
    #[error("no such file or directory")]
    NoEnt,
    /// The byte or inode limit is reached.
    #[error("no space left (shared-directory limits)")]
    NoSpc,
    /// Not a directory.
    #[error("not a directory")]
    NotDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// Not supported.
    #[error("not supported")]
    NotSup,
    /// Not permitted; also a path that leads outside the directory it is relative to (what
    /// wasmtime's WASI answers there too).
    #[error("not permitted")]
    Perm,
    /// The path is not UTF-8.
    #[error("illegal byte sequence")]
    IlSeq,
}

/// Most symbolic links one lookup follows before it is [`Errno::Loop`] (Linux's limit).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// The size a directory reports, as Linux file systems such as ext4 do for a small one.
pub const DIR_SIZE: u64 = 4096;

/// Result of file-system operations.
pub type Result<T> = core::result::Result<T, Errno>;

/// Caps on what tools may store.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes of file data, all files together.
    pub max_bytes: u64,
    /// Most inodes (files, directories and symbolic links, roots included). A link's target
    /// is at most `tree::MAX_PATH` bytes, so this caps link targets too.
    pub max_inodes: usize,
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
}

/// An inode's attributes, as Linux reports them: a directory's size is [`DIR_SIZE`] and its
/// link count is 2 plus its subdirectories; a file's link count is its number of names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Inode number.
    pub ino: Ino,
    /// Directory, file or symbolic link.
    pub kind: Kind,
    /// Hard links: names of a file or link; 2 plus subdirectories for a directory.
    pub nlink: u64,
    /// Bytes (files), [`DIR_SIZE`] (directories), the target's length (symbolic links).
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch.
    pub atime_ns: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

/// One name in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name.
    pub name: String,
    /// Its inode.
    pub ino: Ino,
    /// What it is.
    pub kind: Kind,
}

/// Where a path leads: the directory holding its last component, and that component.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The directory the last component is in (or the directory named, when `name` is None).
    pub dir: Ino,
    /// The last component; None when the path ends in `.` or `..` (it names `dir` itself).
    /// When symbolic links were followed it is the last component of the last target.
    pub name: Option<String>,
    /// The path ended with `/`, so it must name a directory.
    pub trailing_slash: bool,
}

/// A directory's names, kept in the order they were added.
struct Dir {
    /// Name to (position, inode).
    names: BTreeMap<String, (u64, Ino)>,
    /// Position to (name, inode): the listing order, walked without a lookup per entry.
    order: BTreeMap<u64, (String, Ino)>,
    /// Position the next name gets.
    next: u64,
    /// The directory holding this one (itself for a root).
    parent: Ino,
    /// Length of its path from its root (0 for a root): every name's path stays within
    /// `tree::MAX_PATH`, so the tree the host gets back has no path it would refuse and
    /// exporting it cannot blow up (a deep tree of long names would otherwise make paths of
    /// megabytes each).
    path_len: usize,
}

impl Dir {
    fn new(parent: Ino, path_len: usize) -> Self {
        Self {
            names: BTreeMap::new(),
            order: BTreeMap::new(),
            next: 0,
            parent,
            path_len,
        }
    }

    /// Length of the path of its entry `name` from its root.
    fn child_path_len(&self, name: &str) -> usize {
        if self.path_len == 0 {
            name.len()
        } else {
            self.path_len.saturating_add(1).saturating_add(name.len())
        }
    }

    fn get(&self, name: &str) -> Option<Ino> {
        self.names.get(name).map(|&(_, ino)| ino)
    }

    fn insert(&mut self, name: &str, ino: Ino) {
        self.remove(name);
        let at = self.next;
        self.next = self.next.saturating_add(1);
        self.names.insert(name.to_string(), (at, ino));
        self.order.insert(at, (name.to_string(), ino));
    }

    fn remove(&mut self, name: &str) -> Option<Ino> {
        let (at, ino) = self.names.remove(name)?;
        self.order.remove(&at);
        Some(ino)
    }

    fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Names and inodes in listing order.
    fn iter(&self) -> impl DoubleEndedIterator<Item = (&String, Ino)> {
        self.order.values().map(|(name, ino)| (name, *ino))
    }
}

enum Data {
    Dir(Dir),
    File {
        bytes: Vec<u8>,
        /// (root, path) this file was loaded from, while its bytes are untouched.
        origin: Option<(usize, String)>,
    },
    Symlink {
        target: String,
    },
}

struct Inode {
    data: Data,
    nlink: u64,
    open: u64,
    atime_ns: u64,
    mtime_ns: u64,
}

/// A length as u64 (usize is at most 64 bits on every target this builds for).
fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl Inode {
    /// Bytes of data it holds: a file's bytes, a link's target.
    fn size(&self) -> u64 {
        match &self.data {
            Data::File { bytes, .. } => len64(bytes.len()),
            Data::Symlink { target } => len64(target.len()),
            Data::Dir(_) => 0,
        }
    }

    /// What it counts against [`Limits::max_bytes`]: its data once per name, since each name
    /// goes back to the host as its own copy (and once while only a descriptor holds it).
    fn charge(&self) -> u64 {
        self.size().saturating_mul(self.nlink.max(1))
    }

    fn kind(&self) -> Kind {
        match self.data {
            Data::Dir(_) => Kind::Dir,
            Data::File { .. } => Kind::File,
            Data::Symlink { .. } => Kind::Symlink,
        }
    }
}

/// Checks a name a new entry gets: one path component, not `.` or `..`.
fn check_name(name: &str) -> Result<()> {
    if name.len() > tree::MAX_NAME {
        return Err(Errno::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Errno::Inval);
    }
    Ok(())
}

/// Checks a path argument: not empty, not too long, relative, no NUL.
fn check_path_arg(path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(Errno::NoEnt);
    }
    if path.len() > tree::MAX_PATH {
        return Err(Errno::NameTooLong);
    }
    if path.starts_with('/') {
        return Err(Errno::Perm);
    }
    if path.bytes().any(|b| b == 0) {
        return Err(Errno::Inval);
    }
    Ok(())
}

/// The in-memory file system.
pub struct Fs {
    inodes: BTreeMap<Ino, Inode>,
    next_ino: Ino,
    /// Bytes charged: see [`Inode::charge`].
    bytes: u64,
    /// Names in all directories: hard links add names but no inode, so they are capped here
    /// (by [`Limits::max_inodes`] too).
    names: usize,
    limits: Limits,
    roots: Vec<Ino>,
}

impl Fs {
    /// An empty file system with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            inodes: BTreeMap::new(),
            next_ino: 1,
            bytes: 0,
            names: 0,
            limits,
            roots: Vec::new(),
        }
    }

    /// Bytes charged now against [`Limits::max_bytes`]: file bytes and link targets, once per
    /// name.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Inodes alive now.
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    fn node(&self, ino: Ino) -> Result<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::BadF)
    }

    fn node_mut(&mut self, ino: Ino) -> Result<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::BadF)
    }

    fn dir(&self, dir: Ino) -> Result<&Dir> {
        match &self.node(dir)?.data {
            Data::Dir(d) => Ok(d),
            _ => Err(Errno::NotDir),
        }
    }

    fn dir_mut(&mut self, dir: Ino) -> Result<&mut Dir> {
        match &mut self.node_mut(dir)?.data {
            Data::Dir(d) => Ok(d),
            _ => Err(Errno::NotDir),
        }
    }

    /// `self.bytes` plus `extra`, or NoSpc past the byte limit.
    fn charged_with(&self, extra: u64) -> Result<u64> {
        self.bytes
            .checked_add(extra)
            .filter(|&total| total <= self.limits.max_bytes)
            .ok_or(Errno::NoSpc)
    }

    fn alloc(&mut self, data: Data, now_ns: u64) -> Result<Ino> {
        if self.inodes.len() >= self.limits.max_inodes {
            return Err(Errno::NoSpc);
        }
        let node = Inode {
            data,
            nlink: 0,
            open: 0,
            atime_ns: now_ns,
            mtime_ns: now_ns,
        };
        let total = self.charged_with(node.charge())?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.checked_add(1).ok_or(Errno::NoSpc)?;
        self.inodes.insert(ino, node);
        self.bytes = total;
        Ok(ino)
    }

    /// Frees `ino` if nothing names it and no descriptor holds it.
    fn collect(&mut self, ino: Ino) {
        let Some(node) = self.inodes.get(&ino) else {
            return;
        };
        if node.nlink > 0 || node.open > 0 || self.roots.contains(&ino) {
            return;
        }
        if let Some(node) = self.inodes.remove(&ino) {
            self.bytes = self.bytes.saturating_sub(node.charge());
        }
    }

    /// Makes a new empty directory that is the root of a shared tree; returns its inode. Its
    /// index among the roots (0, 1, ...) identifies it in [`Fs::load`] and [`Fs::export`].
    pub fn add_root(&mut self, now_ns: u64) -> Result<Ino> {
        let ino = self.next_ino;
        self.alloc(Data::Dir(Dir::new(ino, 0)), now_ns)?;
        self.node_mut(ino)?.nlink = 1;
        self.roots.push(ino);
        Ok(ino)
    }

    /// Notes that a descriptor holds `ino`.
    pub fn open(&mut self, ino: Ino) -> Result<()> {
        self.node_mut(ino)?.open += 1;
        Ok(())
    }

    /// Notes that a descriptor no longer holds `ino`; frees it if it was its last holder.
    pub fn close(&mut self, ino: Ino) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.open = node.open.saturating_sub(1);
        }
        self.collect(ino);
    }

    /// [`Fs::resolve_with`] without following a symbolic link in the last component.
    pub fn resolve(&self, base: Ino, path: &str) -> Result<Resolved> {
        self.resolve_with(base, path, false)
    }

    /// Splits `path` relative to the directory `base` into the directory holding its last
    /// component and that component. Every directory on the way must exist; symbolic links on
    /// the way are followed, and the last component too when `follow` is set. `..` may not go
    /// above `base`, and absolute paths or link targets are refused ([`Errno::Perm`]).
    pub fn resolve_with(&self, base: Ino, path: &str, follow: bool) -> Result<Resolved> {
        check_path_arg(path)?;
        self.dir(base)?;
        let trailing_slash = path.ends_with('/');
        // Components still to walk, the next one last.
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(String::from)
            .collect();
        let mut stack = alloc::vec![base];
        let mut name = None;
        let mut hops = 0usize;
        while let Some(component) = pending.pop() {
            let last = pending.is_empty();
            let top = *stack.last().ok_or(Errno::Perm)?;
            name = None;
            match component.as_str() {
                "." => {}
                ".." => {
                    if stack.len() == 1 {
                        return Err(Errno::Perm);
                    }
                    stack.pop();
                }
                c if c.len() > tree::MAX_NAME => return Err(Errno::NameTooLong),
                c => {
                    let Some(child) = self.dir(top)?.get(c) else {
                        if last {
                            name = Some(component);
                            continue;
                        }
                        return Err(Errno::NoEnt);
                    };
                    match &self.node(child)?.data {
                        Data::Symlink { target } if !last || follow => {
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return Err(Errno::Loop);
                            }
                            if target.starts_with('/') {
                                return Err(Errno::Perm);
                            }
                            if target.is_empty() {
                                return Err(Errno::NoEnt);
                            }
                            pending.extend(
                                target
                                    .split('/')
                                    .filter(|c| !c.is_empty())
                                    .rev()
                                    .map(String::from),
                            );
                        }
                        _ if last => name = Some(component),
                        Data::Dir(_) => stack.push(child),
                        _ => return Err(Errno::NotDir),
                    }
                }
            }
        }
        Ok(Resolved {
            dir: *stack.last().ok_or(Errno::Perm)?,
            name,
            trailing_slash,
        })
    }

    /// The inode named `name` in `dir`.
    pub fn child(&self, dir: Ino, name: &str) -> Result<Ino> {
        self.dir(dir)?.get(name).ok_or(Errno::NoEnt)
    }

    /// The inode `path` (relative to `base`) names, following symbolic links all the way.
    pub fn lookup(&self, base: Ino, path: &str) -> Result<Ino> {
        self.lookup_with(base, path, true)
    }

    /// The inode `path` (relative to `base`) names; a symbolic link in the last component is
    /// followed when `follow` is set or the path ends with `/` (as on Linux).
    pub fn lookup_with(&self, base: Ino, path: &str, follow: bool) -> Result<Ino> {
        let r = self.resolve_with(base, path, follow || path.ends_with('/'))?;
        let ino = match &r.name {
            None => r.dir,
            Some(name) => self.child(r.dir, name)?,
        };
        if r.trailing_slash && self.node(ino)?.kind() != Kind::Dir {
            return Err(Errno::NotDir);
        }
        Ok(ino)
    }

    /// Adds the name `name` in `dir` for `ino` (checked by [`Fs::check_new_name`]); a second
    /// name of a file or link is charged its bytes again.
    fn link_into(&mut self, dir: Ino, name: &str, ino: Ino) -> Result<()> {
        let node = self.node(ino)?;
        let extra = if node.nlink > 0 { node.size() } else { 0 };
        let total = self.charged_with(extra)?;
        let mtime = node.mtime_ns;
        self.dir_mut(dir)?.insert(name, ino);
        let node = self.node_mut(ino)?;
        node.nlink = node.nlink.saturating_add(1);
        self.node_mut(dir)?.mtime_ns = mtime;
        self.bytes = total;
        self.names = self.names.saturating_add(1);
        Ok(())
    }

    /// Whether a name can be added in `dir`: ENOENT if `dir` was removed (as Linux answers
    /// there), ENAMETOOLONG if the name's path from its root would pass `tree::MAX_PATH`,
    /// ENOSPC when there are [`Limits::max_inodes`] names already.
    fn check_room(&self, dir: Ino, name: &str) -> Result<()> {
        let d = self.dir(dir)?;
        if self.node(dir)?.nlink == 0 {
            return Err(Errno::NoEnt);
        }
        if d.child_path_len(name) > tree::MAX_PATH {
            return Err(Errno::NameTooLong);
        }
        if self.names >= self.limits.max_inodes {
            return Err(Errno::NoSpc);
        }
        Ok(())
    }

    fn check_new_name(&self, dir: Ino, name: &str) -> Result<()> {
        check_name(name)?;
        if self.dir(dir)?.get(name).is_some() {
            return Err(Errno::Exist);
        }
        self.check_room(dir, name)
    }

    /// Creates an empty file `name` in `dir`.
    pub fn create_file(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<Ino> {
        self.check_new_name(dir, name)?;
        let ino = self.alloc(
            Data::File {
                bytes: Vec::new(),
                origin: None,
            },
            now_ns,
        )?;
        self.link_into(dir, name, ino)?;
        Ok(ino)
    }

    /// Creates an empty directory `name` in `dir`.
    pub fn mkdir(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<Ino> {
        self.check_new_name(dir, name)?;
        let path_len = self.dir(dir)?.child_path_len(name);
        let ino = self.alloc(Data::Dir(Dir::new(dir, path_len)), now_ns)?;
        self.link_into(dir, name, ino)?;
        Ok(ino)
    }

    /// Creates a symbolic link `name` in `dir` that points at `target` (stored as given: it
    /// is only checked when a lookup follows it).
    pub fn symlink(&mut self, dir: Ino, name: &str, target: &str, now_ns: u64) -> Result<Ino> {
        if target.len() > tree::MAX_PATH {
            return Err(Errno::NameTooLong);
        }
        if target.bytes().any(|b| b == 0) {
            return Err(Errno::Inval);
        }
        self.check_new_name(dir, name)?;
        let ino = self.alloc(
            Data::Symlink {
                target: target.to_string(),
            },
            now_ns,
        )?;
        self.link_into(dir, name, ino)?;
        Ok(ino)
    }

    /// The target of the symbolic link `ino`; [`Errno::Inval`] for anything else.
    pub fn readlink(&self, ino: Ino) -> Result<&str> {
        match &self.node(ino)?.data {
            Data::Symlink { target } => Ok(target),
            _ => Err(Errno::Inval),
        }
    }

    /// Adds another name for the file or symbolic link `ino` (a hard link). Directories
    /// cannot be linked.
    pub fn link(&mut self, ino: Ino, dir: Ino, name: &str) -> Result<()> {
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(Errno::Perm);
        }
        self.check_new_name(dir, name)?;
        self.link_into(dir, name, ino)
    }

    fn drop_entry(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<()> {
        let ino = self.dir_mut(dir)?.remove(name).ok_or(Errno::NoEnt)?;
        self.names = self.names.saturating_sub(1);
        self.node_mut(dir)?.mtime_ns = now_ns;
        let node = self.node_mut(ino)?;
        let before = node.charge();
        node.nlink = node.nlink.saturating_sub(1);
        let after = node.charge();
        self.bytes = self.bytes.saturating_sub(before.saturating_sub(after));
        self.collect(ino);
        Ok(())
    }

    /// Removes the file or symbolic link name `name` from `dir`.
    pub fn unlink(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<()> {
        let ino = self.child(dir, name)?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(Errno::IsDir);
        }
        self.drop_entry(dir, name, now_ns)
    }

    /// Removes the empty directory `name` from `dir`.
    pub fn rmdir(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<()> {
        let ino = self.child(dir, name)?;
        if !self.dir(ino)?.is_empty() {
            return Err(Errno::NotEmpty);
        }
        self.drop_entry(dir, name, now_ns)
    }

    /// Whether `dir` is `ancestor` or lies below it.
    fn is_within(&self, mut dir: Ino, ancestor: Ino) -> Result<bool> {
        // Each step goes one level up; a tree deeper than the inode count cannot exist.
        for _ in 0..=self.inodes.len() {
            if dir == ancestor {
                return Ok(true);
            }
            let parent = self.dir(dir)?.parent;
            if parent == dir {
                return Ok(false);
            }
            dir = parent;
        }
        Ok(false)
    }

    /// Moves `from_dir/from` to `to_dir/to`, replacing a file there, or an empty directory
    /// when a directory moves, as POSIX `rename` does. The moved name goes to the end of its
    /// new directory's listing.
    pub fn rename(
        &mut self,
        from_dir: Ino,
        from: &str,
        to_dir: Ino,
        to: &str,
        now_ns: u64,
    ) -> Result<()> {
        check_name(to)?;
        let ino = self.child(from_dir, from)?;
        let kind = self.node(ino)?.kind();
        self.dir(to_dir)?;
        if kind == Kind::Dir && self.is_within(to_dir, ino)? {
            return Err(Errno::Inval);
        }
        if self.node(to_dir)?.nlink == 0 {
            return Err(Errno::NoEnt);
        }
        let new_len = self.dir(to_dir)?.child_path_len(to);
        let moved_dirs = if kind == Kind::Dir {
            let (longest, dirs) = self.subtree(ino)?;
            if new_len.saturating_add(longest) > tree::MAX_PATH {
                return Err(Errno::NameTooLong);
            }
            dirs
        } else {
            if new_len > tree::MAX_PATH {
                return Err(Errno::NameTooLong);
            }
            Vec::new()
        };
        if let Ok(existing) = self.child(to_dir, to) {
            if existing == ino {
                return Ok(());
            }
            match (kind, self.node(existing)?.kind()) {
                (Kind::File | Kind::Symlink, Kind::Dir) => return Err(Errno::IsDir),
                (Kind::Dir, Kind::File | Kind::Symlink) => return Err(Errno::NotDir),
                (Kind::Dir, Kind::Dir) if !self.dir(existing)?.is_empty() => {
                    return Err(Errno::NotEmpty);
                }
                _ => {}
            }
            self.drop_entry(to_dir, to, now_ns)?;
        }
        self.dir_mut(from_dir)?.remove(from);
        self.dir_mut(to_dir)?.insert(to, ino);
        self.node_mut(from_dir)?.mtime_ns = now_ns;
        self.node_mut(to_dir)?.mtime_ns = now_ns;
        if let Data::Dir(d) = &mut self.node_mut(ino)?.data {
            d.parent = to_dir;
        }
        let old_len = self.dir(ino).map_or(0, |d| d.path_len);
        for d in moved_dirs {
            if let Data::Dir(dir) = &mut self.node_mut(d)?.data {
                dir.path_len = dir.path_len.saturating_sub(old_len).saturating_add(new_len);
            }
        }
        Ok(())
    }

    /// The directories of the subtree under the directory `top` (itself first), and the
    /// longest path of an entry in it relative to `top`'s own path (`/name` counts 1 + name).
    /// Iterative: a deep tree cannot overflow the stack.
    fn subtree(&self, top: Ino) -> Result<(usize, Vec<Ino>)> {
        let base = self.dir(top)?.path_len;
        let mut dirs = alloc::vec![top];
        let mut at = 0;
        let mut longest = 0;
        while let Some(&d) = dirs.get(at) {
            at += 1;
            let dir = self.dir(d)?;
            let rel = dir.path_len.saturating_sub(base);
            for (name, child) in dir.iter() {
                longest = longest.max(rel.saturating_add(1).saturating_add(name.len()));
                if self.node(child)?.kind() == Kind::Dir {
                    dirs.push(child);
                }
            }
        }
        Ok((longest, dirs))
    }

    fn file(&self, ino: Ino) -> Result<&Vec<u8>> {
        match &self.node(ino)?.data {
            Data::File { bytes, .. } => Ok(bytes),
            Data::Dir(_) => Err(Errno::IsDir),
            Data::Symlink { .. } => Err(Errno::Inval),
        }
    }

    /// Reads from the file `ino` at `offset` into `buf`; returns the bytes read (0 at the end).
    pub fn read(&self, ino: Ino, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let bytes = self.file(ino)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    /// The file `ino`'s bytes from `offset`, at most `max` of them.
    pub fn read_slice(&self, ino: Ino, offset: u64, max: usize) -> Result<&[u8]> {
        let bytes = self.file(ino)?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(max).min(bytes.len());
        Ok(&bytes[start..end])
    }

    /// Mutable bytes of the file `ino`, after growing or shrinking it to `size` within the
    /// byte limit (charged once per name); the file counts as changed. On an error nothing
    /// changed. Memory follows the size: growth at most doubles the capacity, and a file cut
    /// to less than half its capacity gives the rest back, so a tool cannot keep the memory of
    /// many files each grown to the limit and cut again.
    fn resize(&mut self, ino: Ino, size: u64, now_ns: u64) -> Result<&mut Vec<u8>> {
        let new_len = usize::try_from(size).map_err(|_| Errno::FBig)?;
        let old_len = self.file(ino)?.len();
        let names = self.node(ino)?.nlink.max(1);
        let old_charge = len64(old_len).saturating_mul(names);
        let new_charge = size.checked_mul(names).ok_or(Errno::NoSpc)?;
        let total = self
            .bytes
            .saturating_sub(old_charge)
            .checked_add(new_charge)
            .ok_or(Errno::NoSpc)?;
        if new_charge > old_charge && total > self.limits.max_bytes {
            return Err(Errno::NoSpc);
        }
        let node = self.node_mut(ino)?;
        let Data::File { bytes, origin } = &mut node.data else {
            return Err(Errno::IsDir);
        };
        if new_len > bytes.capacity() {
            let want = new_len.max(old_len.saturating_mul(2));
            bytes
                .try_reserve_exact(want - old_len)
                .map_err(|_| Errno::NoSpc)?;
        }
        bytes.resize(new_len, 0);
        if bytes.capacity() / 2 > new_len {
            bytes.shrink_to(new_len);
        }
        *origin = None;
        node.mtime_ns = now_ns;
        self.bytes = total;
        match &mut self.node_mut(ino)?.data {
            Data::File { bytes, .. } => Ok(bytes),
            _ => Err(Errno::IsDir),
        }
    }

    /// Writes `data` into the file `ino` at `offset`, growing it (with zeros in any gap).
    /// Writing nothing changes nothing (it does not extend the file to `offset`, as on Linux).
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8], now_ns: u64) -> Result<usize> {
        let len = len64(self.file(ino)?.len());
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset.checked_add(len64(data.len())).ok_or(Errno::FBig)?;
        let start = usize::try_from(offset).map_err(|_| Errno::FBig)?;
        let bytes = self.resize(ino, len.max(end), now_ns)?;
        let dst = bytes
            .get_mut(start..)
            .and_then(|rest| rest.get_mut(..data.len()))
            .ok_or(Errno::FBig)?;
        dst.copy_from_slice(data);
        Ok(data.len())
    }

    /// Sets the file `ino`'s size, cutting or zero-extending it.
    pub fn set_size(&mut self, ino: Ino, size: u64, now_ns: u64) -> Result<()> {
        self.resize(ino, size, now_ns).map(|_| ())
    }

    /// Sets access and modification times (None leaves one as it is).
    pub fn set_times(
        &mut self,
        ino: Ino,
        atime_ns: Option<u64>,
        mtime_ns: Option<u64>,
    ) -> Result<()> {
        let node = self.node_mut(ino)?;
        if let Some(t) = atime_ns {
            node.atime_ns = t;
        }
        if let Some(t) = mtime_ns {
            node.mtime_ns = t;
        }
        Ok(())
    }

    /// The attributes of `ino`.
    pub fn stat(&self, ino: Ino) -> Result<Stat> {
        let node = self.node(ino)?;
        let (size, nlink) = match &node.data {
            Data::File { bytes, .. } => (bytes.len() as u64, node.nlink),
            Data::Symlink { target } => (target.len() as u64, node.nlink),
            Data::Dir(d) => {
                let mut subdirs = 0u64;
                for (_, child) in d.iter() {
                    if self.node(child)?.kind() == Kind::Dir {
                        subdirs += 1;
                    }
                }
                (DIR_SIZE, 2 + subdirs)
            }
        };
        Ok(Stat {
            ino,
            kind: node.kind(),
            nlink,
            size,
            atime_ns: node.atime_ns,
            mtime_ns: node.mtime_ns,
        })
    }

    /// The directory `dir`'s parent (itself for a root).
    pub fn parent(&self, dir: Ino) -> Result<Ino> {
        Ok(self.dir(dir)?.parent)
    }

    /// The directory `dir`'s entries in the order they were added (`.` and `..` are not
    /// listed).
    pub fn list(&self, dir: Ino) -> Result<Vec<DirEntry>> {
        let d = self.dir(dir)?;
        let mut out = Vec::new();
        for (name, ino) in d.iter() {
            out.push(DirEntry {
                name: name.clone(),
                ino,
                kind: self.node(ino)?.kind(),
            });
        }
        Ok(out)
    }

    /// The directory `dir`'s entries in the order they were added, from the `skip`th on,
    /// borrowed (what [`Fs::list`] copies): name, inode, kind. Skipping costs a step per
    /// entry skipped and no lookup.
    pub fn entries(
        &self,
        dir: Ino,
        skip: usize,
    ) -> Result<impl Iterator<Item = (&str, Ino, Kind)> + '_> {
        let d = self.dir(dir)?;
        Ok(d.iter().skip(skip).filter_map(|(name, ino)| {
            let kind = self.inodes.get(&ino)?.kind();
            Some((name.as_str(), ino, kind))
        }))
    }

    /// Fills the root with index `root` (from [`Fs::add_root`]) with a tree sent by the host.
    /// Paths must be plain relative paths with parents listed first; directories list their
    /// entries in the order sent. Files remember where they came from so [`Fs::export`] sends
    /// unchanged ones back as [`Node::Unchanged`].
    pub fn load(&mut self, root: usize, entries: Vec<Entry>, now_ns: u64) -> Result<()> {
        let root_ino = *self.roots.get(root).ok_or(Errno::BadF)?;
        for entry in entries {
            tree::check_path(&entry.path).map_err(|_| Errno::Inval)?;
            let (dir, name) = match entry.path.rsplit_once('/') {
                Some((parent, name)) => (self.lookup_with(root_ino, parent, false)?, name),
                None => (root_ino, entry.path.as_str()),
            };
            if self.node(dir)?.kind() != Kind::Dir {
                return Err(Errno::NotDir);
            }
            match entry.node {
                Node::Dir => {
                    self.mkdir(dir, name, now_ns)?;
                }
                Node::File(bytes) => {
                    let total = self.charged_with(len64(bytes.len()))?;
                    let ino = self.create_file(dir, name, now_ns)?;
                    self.bytes = total;
                    if let Data::File { bytes: b, origin } = &mut self.node_mut(ino)?.data {
                        *b = bytes;
                        *origin = Some((root, entry.path));
                    }
                }
                Node::Symlink(target) => {
                    self.symlink(dir, name, &target, now_ns)?;
                }
                Node::Unchanged => return Err(Errno::Inval),
            }
        }
        Ok(())
    }

    /// Takes the tree under the root with index `root`, parents first, leaving its files
    /// empty (the call is over: export every root, then drop the file system). A file whose
    /// bytes are still those loaded for the same path is [`Node::Unchanged`]; other files carry
    /// their bytes (copied for each name of a hard-linked file but its last, which takes
    /// them); symbolic links are [`Node::Symlink`] with their target. Every path is within
    /// `tree::MAX_PATH` and the walk is iterative, so a deep tree costs neither stack nor
    /// more memory than its entries.
    pub fn export(&mut self, root: usize) -> Result<Vec<Entry>> {
        let root_ino = *self.roots.get(root).ok_or(Errno::BadF)?;
        let mut out = Vec::new();
        let mut pending: Vec<(String, Ino)> = Vec::new();
        for (name, ino) in self.dir(root_ino)?.iter().rev() {
            pending.push((name.clone(), ino));
        }
        while let Some((path, ino)) = pending.pop() {
            let node = self.node_mut(ino)?;
            if node.kind() == Kind::File {
                // This name is done: the bytes move out with the file's last name (names in
                // other roots count, so export every root before using the tree again).
                node.nlink = node.nlink.saturating_sub(1);
            }
            let shared = node.nlink > 0;
            match &mut node.data {
                Data::Dir(d) => {
                    for (name, child) in d.iter().rev() {
                        pending.push((alloc::format!("{path}/{name}"), child));
                    }
                    out.push(Entry {
                        path,
                        node: Node::Dir,
                    });
                }
                Data::Symlink { target } => {
                    let node = Node::Symlink(target.clone());
                    out.push(Entry { path, node });
                }
                Data::File { bytes, origin } => {
                    let unchanged = matches!(origin, Some((r, p)) if *r == root && *p == path);
                    let node = if unchanged {
                        Node::Unchanged
                    } else if shared {
                        // Another name still needs these bytes.
                        Node::File(bytes.clone())
                    } else {
                        Node::File(core::mem::take(bytes))
                    };
                    out.push(Entry { path, node });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
