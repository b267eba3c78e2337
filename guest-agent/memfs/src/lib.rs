//! The guest's in-memory file system: what a tool sees in the directories shared with it
//! (`bulwark run --dir`).
//!
//! Plain data, `no_std` + `alloc`, with no Wasm in it, so it is unit-tested on the host. The
//! guest's WASI layer maps descriptors and guest memory onto it. Inodes live in one map; a
//! directory maps names to inode numbers. An inode lives while a directory entry or an open
//! descriptor holds it, so a file unlinked while open can still be read, as on POSIX.
//!
//! Every path comes from an untrusted tool. Resolution starts at a directory the tool holds
//! and never goes above it: `..` past it, or an absolute path, is [`Errno::Perm`]. There are
//! no symbolic links. Total file bytes and the number of inodes are capped ([`Limits`]): going
//! past either is [`Errno::NoSpc`], never an allocation failure of the guest.

#![no_std]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use bulwark_proto::tree::{self, Entry, Node};

/// Inode number.
pub type Ino = u64;

/// WASI preview 1 error numbers this file system returns (`wasi_snapshot_preview1` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Errno {
    /// Bad descriptor or inode.
    BadF = 8,
    /// The name exists.
    Exist = 20,
    /// The file would exceed the largest size.
    FBig = 22,
    /// Invalid argument (such as moving a directory into itself).
    Inval = 28,
    /// Is a directory.
    IsDir = 31,
    /// A name or path is too long.
    NameTooLong = 37,
    /// No such file or directory.
    NoEnt = 44,
    /// The byte or inode limit is reached.
    NoSpc = 51,
    /// Not a directory.
    NotDir = 54,
    /// The directory is not empty.
    NotEmpty = 55,
    /// Not supported.
    NotSup = 58,
    /// Not permitted; also a path that leads outside the directory it is relative to (what
    /// wasmtime's WASI answers there too).
    Perm = 63,
    /// The path is not UTF-8.
    IlSeq = 25,
}

impl Errno {
    /// The WASI error number.
    pub fn code(self) -> u16 {
        self as u16
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> Self {
        i32::from(e.code())
    }
}

/// Result of file-system operations.
pub type Result<T> = core::result::Result<T, Errno>;

/// Caps on what tools may store.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most bytes of file data, all files together.
    pub max_bytes: u64,
    /// Most inodes (files and directories, roots included).
    pub max_inodes: usize,
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// An inode's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Inode number.
    pub ino: Ino,
    /// Directory or file.
    pub kind: Kind,
    /// Directory entries that name it.
    pub nlink: u64,
    /// Bytes (files), or number of entries (directories).
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch.
    pub atime_ns: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

/// One name in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (`.` and `..` included).
    pub name: String,
    /// Its inode.
    pub ino: Ino,
    /// What it is.
    pub kind: Kind,
}

/// Where a path leads: the directory holding its last component, and that component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved<'p> {
    /// The directory the last component is in (or the directory named, when `name` is None).
    pub dir: Ino,
    /// The last component; None when the path ends in `.` or `..` (it names `dir` itself).
    pub name: Option<&'p str>,
    /// The path ended with `/`, so it must name a directory.
    pub trailing_slash: bool,
}

enum Data {
    Dir {
        entries: BTreeMap<String, Ino>,
        parent: Ino,
    },
    File {
        bytes: Vec<u8>,
        /// (root, path) this file was loaded from, while its bytes are untouched.
        origin: Option<(usize, String)>,
    },
}

struct Inode {
    data: Data,
    nlink: u64,
    open: u64,
    atime_ns: u64,
    mtime_ns: u64,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.data {
            Data::Dir { .. } => Kind::Dir,
            Data::File { .. } => Kind::File,
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

/// The in-memory file system.
pub struct Fs {
    inodes: BTreeMap<Ino, Inode>,
    next_ino: Ino,
    bytes: u64,
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
            limits,
            roots: Vec::new(),
        }
    }

    /// Bytes of file data stored now.
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

    fn entries(&self, dir: Ino) -> Result<&BTreeMap<String, Ino>> {
        match &self.node(dir)?.data {
            Data::Dir { entries, .. } => Ok(entries),
            Data::File { .. } => Err(Errno::NotDir),
        }
    }

    fn entries_mut(&mut self, dir: Ino) -> Result<&mut BTreeMap<String, Ino>> {
        match &mut self.node_mut(dir)?.data {
            Data::Dir { entries, .. } => Ok(entries),
            Data::File { .. } => Err(Errno::NotDir),
        }
    }

    fn alloc(&mut self, data: Data, now_ns: u64) -> Result<Ino> {
        if self.inodes.len() >= self.limits.max_inodes {
            return Err(Errno::NoSpc);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(
            ino,
            Inode {
                data,
                nlink: 0,
                open: 0,
                atime_ns: now_ns,
                mtime_ns: now_ns,
            },
        );
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
        if let Some(Inode {
            data: Data::File { bytes, .. },
            ..
        }) = self.inodes.remove(&ino)
        {
            self.bytes -= bytes.len() as u64;
        }
    }

    /// Makes a new empty directory that is the root of a shared tree; returns its inode. Its
    /// index among the roots (0, 1, ...) identifies it in [`Fs::load`] and [`Fs::export`].
    pub fn add_root(&mut self, now_ns: u64) -> Result<Ino> {
        let ino = self.next_ino;
        self.alloc(
            Data::Dir {
                entries: BTreeMap::new(),
                parent: ino,
            },
            now_ns,
        )?;
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

    /// Splits `path` relative to the directory `base` into the directory holding its last
    /// component and that component. Every directory on the way must exist. `..` may not go
    /// above `base`; absolute paths are refused.
    pub fn resolve<'p>(&self, base: Ino, path: &'p str) -> Result<Resolved<'p>> {
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
        self.entries(base)?;
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let mut stack = alloc::vec![base];
        let mut name = None;
        for (i, component) in components.iter().enumerate() {
            let last = i + 1 == components.len();
            let top = *stack.last().ok_or(Errno::Perm)?;
            match *component {
                "." => {}
                ".." => {
                    if stack.len() == 1 {
                        return Err(Errno::Perm);
                    }
                    stack.pop();
                }
                c if c.len() > tree::MAX_NAME => return Err(Errno::NameTooLong),
                c if last => name = Some(c),
                c => {
                    let child = *self.entries(top)?.get(c).ok_or(Errno::NoEnt)?;
                    match self.node(child)?.kind() {
                        Kind::Dir => stack.push(child),
                        Kind::File => return Err(Errno::NotDir),
                    }
                }
            }
        }
        Ok(Resolved {
            dir: *stack.last().ok_or(Errno::Perm)?,
            name,
            trailing_slash: path.ends_with('/'),
        })
    }

    /// The inode named `name` in `dir`.
    pub fn child(&self, dir: Ino, name: &str) -> Result<Ino> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::NoEnt)
    }

    /// The inode `path` (relative to `base`) names.
    pub fn lookup(&self, base: Ino, path: &str) -> Result<Ino> {
        let r = self.resolve(base, path)?;
        let ino = match r.name {
            None => r.dir,
            Some(name) => self.child(r.dir, name)?,
        };
        if r.trailing_slash && self.node(ino)?.kind() != Kind::Dir {
            return Err(Errno::NotDir);
        }
        Ok(ino)
    }

    fn link_into(&mut self, dir: Ino, name: &str, ino: Ino) -> Result<()> {
        self.entries_mut(dir)?.insert(name.to_string(), ino);
        self.node_mut(ino)?.nlink += 1;
        self.node_mut(dir)?.mtime_ns = self.node(ino)?.mtime_ns;
        Ok(())
    }

    fn check_new_name(&self, dir: Ino, name: &str) -> Result<()> {
        check_name(name)?;
        if self.entries(dir)?.contains_key(name) {
            return Err(Errno::Exist);
        }
        Ok(())
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
        let ino = self.alloc(
            Data::Dir {
                entries: BTreeMap::new(),
                parent: dir,
            },
            now_ns,
        )?;
        self.link_into(dir, name, ino)?;
        Ok(ino)
    }

    /// Adds another name for the file `ino` (a hard link). Directories cannot be linked.
    pub fn link(&mut self, ino: Ino, dir: Ino, name: &str) -> Result<()> {
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(Errno::Perm);
        }
        self.check_new_name(dir, name)?;
        self.link_into(dir, name, ino)
    }

    fn drop_entry(&mut self, dir: Ino, name: &str, now_ns: u64) -> Result<()> {
        let ino = self.entries_mut(dir)?.remove(name).ok_or(Errno::NoEnt)?;
        self.node_mut(dir)?.mtime_ns = now_ns;
        let node = self.node_mut(ino)?;
        node.nlink = node.nlink.saturating_sub(1);
        self.collect(ino);
        Ok(())
    }

    /// Removes the file name `name` from `dir`.
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
        if !self.entries(ino)?.is_empty() {
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
            let parent = match self.node(dir)?.data {
                Data::Dir { parent, .. } => parent,
                Data::File { .. } => return Err(Errno::NotDir),
            };
            if parent == dir {
                return Ok(false);
            }
            dir = parent;
        }
        Ok(false)
    }

    /// Moves `from_dir/from` to `to_dir/to`, replacing a file there, or an empty directory
    /// when a directory moves, as POSIX `rename` does.
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
        self.entries(to_dir)?;
        if kind == Kind::Dir && self.is_within(to_dir, ino)? {
            return Err(Errno::Inval);
        }
        if let Ok(existing) = self.child(to_dir, to) {
            if existing == ino {
                return Ok(());
            }
            match (kind, self.node(existing)?.kind()) {
                (Kind::File, Kind::Dir) => return Err(Errno::IsDir),
                (Kind::Dir, Kind::File) => return Err(Errno::NotDir),
                (Kind::Dir, Kind::Dir) if !self.entries(existing)?.is_empty() => {
                    return Err(Errno::NotEmpty);
                }
                _ => {}
            }
            self.drop_entry(to_dir, to, now_ns)?;
        }
        self.entries_mut(from_dir)?.remove(from);
        self.entries_mut(to_dir)?.insert(to.to_string(), ino);
        self.node_mut(from_dir)?.mtime_ns = now_ns;
        self.node_mut(to_dir)?.mtime_ns = now_ns;
        if let Data::Dir { parent, .. } = &mut self.node_mut(ino)?.data {
            *parent = to_dir;
        }
        Ok(())
    }

    fn file(&self, ino: Ino) -> Result<&Vec<u8>> {
        match &self.node(ino)?.data {
            Data::File { bytes, .. } => Ok(bytes),
            Data::Dir { .. } => Err(Errno::IsDir),
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
    /// byte limit; the file counts as changed. On an error nothing changed.
    fn resize(&mut self, ino: Ino, size: u64, now_ns: u64) -> Result<&mut Vec<u8>> {
        let new_len = usize::try_from(size).map_err(|_| Errno::FBig)?;
        let old_len = self.file(ino)?.len();
        let total = (self.bytes - old_len as u64)
            .checked_add(size)
            .ok_or(Errno::NoSpc)?;
        if size > old_len as u64 && total > self.limits.max_bytes {
            return Err(Errno::NoSpc);
        }
        let node = self.node_mut(ino)?;
        let Data::File { bytes, origin } = &mut node.data else {
            return Err(Errno::IsDir);
        };
        if new_len > bytes.len() {
            bytes
                .try_reserve(new_len - bytes.len())
                .map_err(|_| Errno::NoSpc)?;
        }
        bytes.resize(new_len, 0);
        *origin = None;
        node.mtime_ns = now_ns;
        self.bytes = total;
        match &mut self.node_mut(ino)?.data {
            Data::File { bytes, .. } => Ok(bytes),
            Data::Dir { .. } => Err(Errno::IsDir),
        }
    }

    /// Writes `data` into the file `ino` at `offset`, growing it (with zeros in any gap).
    pub fn write(&mut self, ino: Ino, offset: u64, data: &[u8], now_ns: u64) -> Result<usize> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::FBig)?;
        let len = self.file(ino)?.len() as u64;
        let start = usize::try_from(offset).map_err(|_| Errno::FBig)?;
        let bytes = self.resize(ino, len.max(end), now_ns)?;
        bytes[start..start + data.len()].copy_from_slice(data);
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
        let size = match &node.data {
            Data::File { bytes, .. } => bytes.len() as u64,
            Data::Dir { entries, .. } => entries.len() as u64,
        };
        Ok(Stat {
            ino,
            kind: node.kind(),
            nlink: node.nlink,
            size,
            atime_ns: node.atime_ns,
            mtime_ns: node.mtime_ns,
        })
    }

    /// The directory `dir`'s entries: `.`, `..`, then the names in byte order.
    pub fn list(&self, dir: Ino) -> Result<Vec<DirEntry>> {
        let Data::Dir { entries, parent } = &self.node(dir)?.data else {
            return Err(Errno::NotDir);
        };
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push(DirEntry {
            name: ".".into(),
            ino: dir,
            kind: Kind::Dir,
        });
        out.push(DirEntry {
            name: "..".into(),
            ino: *parent,
            kind: Kind::Dir,
        });
        for (name, &ino) in entries {
            out.push(DirEntry {
                name: name.clone(),
                ino,
                kind: self.node(ino)?.kind(),
            });
        }
        Ok(out)
    }

    /// Fills the root with index `root` (from [`Fs::add_root`]) with a tree sent by the host.
    /// Paths must be plain relative paths with parents listed first; files remember where they
    /// came from so [`Fs::export`] sends unchanged ones back as [`Node::Unchanged`].
    pub fn load(&mut self, root: usize, entries: Vec<Entry>, now_ns: u64) -> Result<()> {
        let root_ino = *self.roots.get(root).ok_or(Errno::BadF)?;
        for entry in entries {
            tree::check_path(&entry.path).map_err(|_| Errno::Inval)?;
            let (dir, name) = match entry.path.rsplit_once('/') {
                Some((parent, name)) => (self.lookup(root_ino, parent)?, name),
                None => (root_ino, entry.path.as_str()),
            };
            match entry.node {
                Node::Dir => {
                    self.mkdir(dir, name, now_ns)?;
                }
                Node::File(bytes) => {
                    let len = bytes.len() as u64;
                    if self.bytes + len > self.limits.max_bytes {
                        return Err(Errno::NoSpc);
                    }
                    let ino = self.create_file(dir, name, now_ns)?;
                    self.bytes += len;
                    if let Data::File { bytes: b, origin } = &mut self.node_mut(ino)?.data {
                        *b = bytes;
                        *origin = Some((root, entry.path));
                    }
                }
                Node::Symlink(_) | Node::Unchanged => return Err(Errno::Inval),
            }
        }
        Ok(())
    }

    /// Takes the tree under the root with index `root`, parents first, leaving its files
    /// empty (the call is over). A file whose bytes are still those loaded for the same path is
    /// [`Node::Unchanged`]; other files carry their bytes.
    pub fn export(&mut self, root: usize) -> Result<Vec<Entry>> {
        let root_ino = *self.roots.get(root).ok_or(Errno::BadF)?;
        let mut out = Vec::new();
        let mut pending: Vec<(String, Ino)> = Vec::new();
        for (name, &ino) in self.entries(root_ino)?.iter().rev() {
            pending.push((name.clone(), ino));
        }
        while let Some((path, ino)) = pending.pop() {
            let node = self.node_mut(ino)?;
            let shared = node.nlink > 1;
            match &mut node.data {
                Data::Dir { entries, .. } => {
                    for (name, &child) in entries.iter().rev() {
                        pending.push((alloc::format!("{path}/{name}"), child));
                    }
                    out.push(Entry {
                        path,
                        node: Node::Dir,
                    });
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
