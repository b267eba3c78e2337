//! `bulwark run --dir HOST::GUEST`: host directories shared with a tool by copy.
//!
//! Before the call HOST is opened once, as a directory and without following a link (a HOST that is
//! itself a symbolic link is refused), and [`read_tree`] reads it into a tree through that
//! descriptor: regular files, directories and symbolic links (a socket, FIFO or device anywhere in
//! it is refused, as is a tree over the size or entry caps). A link is never followed: its target
//! is read with `readlinkat` and carried as a link when it stays inside the tree ([`check_link`]:
//! relative, never above the root, `..` only out of a directory of the tree); any other link
//! refuses the call. Every file is opened once, relative to its directory's descriptor, with
//! `O_NOFOLLOW | O_NONBLOCK`, checked with `fstat` on that descriptor to be a regular file, and
//! read with a cap of the size budget left; every directory is opened below HOST's descriptor the
//! way the write-back opens one (below). So an entry swapped for a link, FIFO or device after it
//! was listed cannot block the read or lead out of HOST, and a file that grows while it is read
//! cannot take more than the budget.
//!
//! The tool works on its own copy. After a call that exits with code 0, [`write_back`] makes the
//! host directory match what the tool left: changed and new files are written to a temporary file
//! (`O_CREAT | O_EXCL`) beside their destination and renamed over it (a reader never sees a partial
//! file; a replaced file keeps its permissions), new directories are made, and files and
//! directories the tool removed are removed. A new or changed symbolic link is made with
//! `symlinkat` at a temporary name and renamed over its destination, and a link the tool removed is
//! removed (`unlinkat`: the link, never what it leads to); every link in the answer must stay
//! inside by the same rule as going in, or nothing is written back. It touches only paths that were
//! copied in or that the tool created, all below the shared directory; every path the guest sends
//! back is checked before use. The write-back works through the descriptor of HOST kept from the
//! read ([`HostDir`], which must still be the directory at HOST's path): each directory on the way
//! is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! (component by component with `O_NOFOLLOW` where the kernel has no `openat2`), and every change
//! is `mkdirat`, `unlinkat`, `symlinkat`, `renameat` or `fchmod` on descriptors. A directory, or
//! HOST itself, replaced by a link on the host during the call, even while the write-back runs, is
//! never followed: nothing outside HOST is created, changed or removed. `--isolation wasm` makes
//! its scratch copies ([`materialize`]) and reads them back with the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulwark_proto::tree::{self, Entry, Node, SharedDir};

/// Default cap on the files and directories in all shared directories (`--max-dir-files`).
pub const DEFAULT_MAX_ENTRIES: u32 = 10_000;

/// How a directory is opened: never through a link, never blocking, closed in child processes.
const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
/// How a file to read is opened: the same, and a terminal does not become ours.
const FILE_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
/// How a file to write is created: a new name only, never through a link.
const CREATE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
/// How `openat2` resolves a directory below HOST: never above it, never through any link.
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// One `--dir` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSpec {
    /// The host directory.
    pub host: PathBuf,
    /// Where the tool sees it.
    pub guest: String,
}

/// Parses `HOST::GUEST`, or `HOST` alone (the tool sees it under the same path).
pub fn parse_dir(s: &str) -> Result<DirSpec, String> {
    let (host, guest) = s.split_once("::").unwrap_or((s, s));
    if host.is_empty() || guest.is_empty() {
        return Err(format!(
            "`{s}` is not HOST::GUEST (for example ./data::/data)"
        ));
    }
    if guest.contains('\0') || guest.len() > tree::MAX_PATH {
        return Err(format!("`{guest}` cannot be a guest path"));
    }
    Ok(DirSpec {
        host: PathBuf::from(host),
        guest: guest.to_owned(),
    })
}

/// What the caps still allow while reading trees.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Bytes of file data left.
    pub bytes: u64,
    /// Entries left.
    pub entries: u32,
}

/// A host directory opened for sharing: the descriptor that reading it and writing the tool's
/// changes back both work through, so a path swapped for a link in between leads nowhere else.
#[derive(Debug)]
pub struct HostDir {
    fd: OwnedFd,
    /// The path as given, for messages.
    path: PathBuf,
    /// The path that was opened (the one given without a trailing `/` or `.`).
    opened: CString,
    /// Its device and inode when opened.
    id: (libc::dev_t, libc::ino_t),
}

impl HostDir {
    /// Opens the directory `path`; a symbolic link there is refused, not followed.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        // `dir/` and `dir/.` would follow a link at `dir`; the components alone do not.
        let clean: PathBuf = path.components().collect();
        let opened = CString::new(clean.as_os_str().as_bytes())
            .with_context(|| format!("--dir {}: the path holds a NUL byte", path.display()))?;
        let fd = match sys::open(&opened, DIR_FLAGS) {
            Ok(fd) => fd,
            Err(e) => {
                return Err(match std::fs::symlink_metadata(&clean) {
                    Ok(m) if m.file_type().is_symlink() => anyhow::anyhow!(
                        "--dir {}: is a symbolic link; share the directory it leads to by its own path",
                        path.display()
                    ),
                    Ok(m) if !m.is_dir() => {
                        anyhow::anyhow!("--dir {}: not a directory", path.display())
                    }
                    _ => anyhow::Error::new(e)
                        .context(format!("--dir {}: cannot read it", path.display())),
                });
            }
        };
        let st = sys::fstat(fd.as_fd())
            .with_context(|| format!("--dir {}: cannot read it", path.display()))?;
        if !st.is_dir() {
            bail!("--dir {}: not a directory", path.display());
        }
        Ok(Self {
            fd,
            path: path.to_owned(),
            opened,
            id: (st.dev, st.ino),
        })
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses to write back unless the directory still exists and its path still names it
    /// (it was not removed, moved away or replaced by a link during the call).
    fn check_still_shared(&self) -> anyhow::Result<()> {
        let st = sys::fstat(self.fd.as_fd())
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let now = sys::lstat(&self.opened).ok();
        if st.nlink == 0 || now.is_none_or(|now| (now.dev, now.ino) != self.id) {
            bail!(
                "{} is no longer the directory that was shared (removed, moved or replaced on the host during the call); nothing was written back",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// Points in the walk where a test can change the tree under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// A regular file was listed and `lstat`ed; it is about to be opened.
    Listed,
    /// It was opened and `fstat`ed; it is about to be read.
    Opened,
}

/// What a test runs at each [`Stage`], with the file's name.
#[cfg(test)]
type Hook = Box<dyn FnMut(Stage, &CStr)>;

#[cfg(test)]
thread_local! {
    /// Called at each [`Stage`] (tests only).
    static HOOK: std::cell::RefCell<Option<Hook>> =
        const { std::cell::RefCell::new(None) };
    /// Makes [`open_dir_beneath`] act as if the kernel had no `openat2` (tests only).
    static NO_OPENAT2: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn test_hook(stage: Stage, name: &CStr) {
    HOOK.with(|hook| {
        if let Some(f) = hook.borrow_mut().as_mut() {
            f(stage, name);
        }
    });
}

#[cfg(not(test))]
fn test_hook(_: Stage, _: &CStr) {}

/// Reads the directory `root` into a tree, charging `budget`. A symbolic link is carried as a
/// link (never followed) when its target stays inside the tree ([`check_link`]); any other is
/// refused.
pub fn read_tree(root: &HostDir, budget: &mut Budget) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(root, None, "", budget, &mut out)?;
    if let Some((path, target, why)) = escaping_link(&out) {
        bail!(
            "--dir {}: {} is a symbolic link to `{target}`, {why}; a shared directory may hold only links that stay inside it",
            root.path.display(),
            root.path.join(path).display()
        );
    }
    Ok(out)
}

/// Reads a scratch copy that a tool worked on (`--isolation wasm`) into a tree, charging
/// `budget`, without judging its links: the write-back checks them exactly as it checks the
/// guest's answer, so the error names the path the tool knows, not the scratch copy's.
pub fn read_scratch(root: &HostDir, budget: &mut Budget) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(root, None, "", budget, &mut out)?;
    Ok(out)
}

/// What the walk found at a name, before it is added to the tree.
enum Child {
    /// A directory, read after the others.
    Dir,
    /// A regular file's bytes.
    File(Vec<u8>),
    /// A symbolic link's target (checked once the whole tree is known).
    Link(String),
}

/// Reads the directory `prefix` below `root` (open as `dir`; `None` for `root` itself) into
/// `out`. Its files and links are read and its subdirectories noted first; then `dir` is closed
/// and each subdirectory is opened again from `root` (never through a link, never above `root`)
/// and read in turn, so a deep tree does not hold a descriptor for every level.
fn walk(
    root: &HostDir,
    dir: Option<OwnedFd>,
    prefix: &str,
    budget: &mut Budget,
    out: &mut Vec<Entry>,
) -> anyhow::Result<()> {
    let at = dir.as_ref().map_or(root.fd.as_fd(), AsFd::as_fd);
    let names = list(at).with_context(|| {
        format!(
            "--dir {}: cannot list {}",
            root.path.display(),
            root.path.join(prefix).display()
        )
    })?;
    let mut children: Vec<(String, Child)> = Vec::with_capacity(names.len());
    for name in names {
        let host_path = root
            .path
            .join(prefix)
            .join(OsStr::from_bytes(name.as_bytes()));
        let changed = || changed_error(root, &host_path);
        let special = || special_error(root, &host_path);
        let cannot_read = || {
            format!(
                "--dir {}: cannot read {}",
                root.path.display(),
                host_path.display()
            )
        };
        let Ok(name_str) = name.to_str() else {
            bail!(
                "--dir {}: {} has a name that is not UTF-8; rename it or share another directory",
                root.path.display(),
                host_path.display()
            );
        };
        let path = if prefix.is_empty() {
            name_str.to_owned()
        } else {
            format!("{prefix}/{name_str}")
        };
        tree::check_path(&path).map_err(|e| {
            anyhow::anyhow!(
                "--dir {}: {}: {e}",
                root.path.display(),
                host_path.display()
            )
        })?;
        budget.entries = budget.entries.checked_sub(1).with_context(|| {
            format!(
                "--dir {}: more files and directories than the limit (--max-dir-files)",
                root.path.display()
            )
        })?;
        let st = sys::lstat_at(at, &name).with_context(cannot_read)?;
        if st.is_link() {
            let target = match sys::readlinkat(at, &name) {
                Ok(target) => target,
                // No longer a link since it was listed.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                    return Err(changed());
                }
                Err(e) => return Err(e).with_context(cannot_read),
            };
            let Ok(target) = String::from_utf8(target) else {
                bail!(
                    "--dir {}: {} is a symbolic link whose target is not UTF-8; it cannot be shared",
                    root.path.display(),
                    host_path.display()
                );
            };
            children.push((path, Child::Link(target)));
        } else if st.is_dir() {
            children.push((path, Child::Dir));
        } else if st.is_file() {
            test_hook(Stage::Listed, &name);
            match read_file_at(at, &name, budget.bytes).with_context(cannot_read)? {
                FileRead::Bytes(bytes) => {
                    budget.bytes = budget
                        .bytes
                        .checked_sub(bytes.len() as u64)
                        .context("a file was read past the size budget")?;
                    children.push((path, Child::File(bytes)));
                }
                FileRead::TooBig { size, grew } => bail!(
                    "--dir {}: its files are larger than the limit (--max-dir-size); {} alone is {}{size} bytes",
                    root.path.display(),
                    host_path.display(),
                    if grew { "at least " } else { "" },
                ),
                // Swapped for a link since it was listed: not followed.
                FileRead::Link => return Err(changed()),
                FileRead::NotRegular => return Err(special()),
            }
        } else {
            return Err(special());
        }
    }
    drop(dir);
    for (path, child) in children {
        let node = match child {
            Child::File(bytes) => Node::File(bytes),
            Child::Link(target) => Node::Symlink(target),
            Child::Dir => {
                let sub = open_dir_beneath(root.fd.as_fd(), &path).map_err(|e| {
                    let host_path = root.path.join(&path);
                    match e.raw_os_error() {
                        // Gone, or no longer a directory (a link now?) since it was listed.
                        Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV | libc::ENOENT) => {
                            changed_error(root, &host_path)
                        }
                        _ => anyhow::Error::new(e).context(format!(
                            "--dir {}: cannot read {}",
                            root.path.display(),
                            host_path.display()
                        )),
                    }
                })?;
                out.push(Entry {
                    path: path.clone(),
                    node: Node::Dir,
                });
                walk(root, Some(sub), &path, budget, out)?;
                continue;
            }
        };
        out.push(Entry { path, node });
    }
    Ok(())
}

/// Longest link target carried, in bytes (Linux's `PATH_MAX` less its NUL).
const MAX_TARGET: usize = 4095;

/// The directories of a tree, as a trie: (directory, name) -> subdirectory, the root being 0.
struct DirIndex<'a> {
    children: HashMap<(usize, &'a str), usize>,
}

impl<'a> DirIndex<'a> {
    /// Indexes the directories of `entries` (checked paths, parents listed first).
    fn new(entries: &'a [Entry]) -> Self {
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut children = HashMap::new();
        for entry in entries {
            if !matches!(entry.node, Node::Dir) {
                continue;
            }
            let path = entry.path.as_str();
            let (parent, name) = match path.rsplit_once('/') {
                Some((parent, name)) => (ids.get(parent).copied(), name),
                None => (Some(0), path),
            };
            if let Some(parent) = parent {
                let id = children.len() + 1;
                children.insert((parent, name), id);
                ids.insert(path, id);
            }
        }
        Self { children }
    }

    /// The subdirectory `name` of the directory `dir`, if the tree holds one.
    fn child(&self, dir: usize, name: &str) -> Option<usize> {
        self.children.get(&(dir, name)).copied()
    }
}

/// Checks that the symbolic link at `path` (a checked path) with `target` stays inside the
/// tree whose directories `dirs` indexes: the target is relative, and resolving it from the
/// link's directory, one component at a time, never goes above the tree's root. A `..` may only
/// step out of a directory of the tree (the link's own directories, or one the target named
/// that the tree holds as a directory): after a name that is a link, a file or nothing, where
/// `..` leads is not known from the tree (through another link it could be above the root), so
/// it is refused. Descending through other links is fine, since each of them is checked by the
/// same rule. A target that names nothing (a dangling link) passes. The work is linear in the
/// lengths of `path` and `target`.
fn check_link(path: &str, target: &str, dirs: &DirIndex<'_>) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("an empty target");
    }
    if target.len() > MAX_TARGET {
        return Err("a target longer than a link can hold");
    }
    if target.contains('\0') {
        return Err("a target holding a NUL byte");
    }
    if target.starts_with('/') {
        return Err("an absolute path (it would name the host's own files)");
    }
    // Where resolution is, from the root down: a directory of the tree, or `None` below a name
    // that is not one.
    let mut here: Vec<Option<usize>> = vec![Some(0)];
    let step = |here: &mut Vec<Option<usize>>, name: &str| {
        let next = here
            .last()
            .copied()
            .flatten()
            .and_then(|d| dirs.child(d, name));
        here.push(next);
    };
    for name in tree::parent(path).into_iter().flat_map(|p| p.split('/')) {
        step(&mut here, name);
    }
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => match here.last() {
                _ if here.len() == 1 => return Err("which leads above the shared directory"),
                Some(Some(_)) => {
                    here.pop();
                }
                _ => {
                    return Err(
                        "which goes through `..` after a name that is not a directory of the shared tree",
                    );
                }
            },
            name => step(&mut here, name),
        }
    }
    Ok(())
}

/// The first symbolic link in `entries` (a tree of checked paths, parents first) whose target
/// does not stay inside the tree ([`check_link`]): its path, target and why.
fn escaping_link(entries: &[Entry]) -> Option<(&str, &str, &'static str)> {
    let dirs = DirIndex::new(entries);
    entries.iter().find_map(|e| match &e.node {
        Node::Symlink(target) => check_link(&e.path, target, &dirs)
            .err()
            .map(|why| (e.path.as_str(), target.as_str(), why)),
        _ => None,
    })
}

/// The error for `host_path`, below `root`, that changed kind or vanished while it was read.
fn changed_error(root: &HostDir, host_path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "--dir {}: {} changed while it was being read; share it when nothing else is changing it",
        root.path.display(),
        host_path.display()
    )
}

/// The error for `host_path`, below `root`, that is a socket, FIFO or device.
fn special_error(root: &HostDir, host_path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "--dir {}: {} is not a regular file or directory (a socket, FIFO or device); it cannot be shared",
        root.path.display(),
        host_path.display()
    )
}

/// The names in the directory `dir` (without `.` and `..`), in the order the kernel lists them:
/// the guest lists a directory in the order its entries came, so a tool that walks a tree
/// sees it in the same order in the VM as with `--isolation wasm` (where wasmtime-wasi reads a
/// copy of it made in this order).
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed directory entry");
    sys::rewind(dir)?;
    let mut buf = vec![0u8; 32 << 10];
    let mut names = Vec::new();
    loop {
        let n = sys::getdents(dir, &mut buf)?;
        if n == 0 {
            break;
        }
        let mut records = buf.get(..n).ok_or_else(bad)?;
        while !records.is_empty() {
            // struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let reclen = match records.get(16..18) {
                Some(&[a, b]) => usize::from(u16::from_ne_bytes([a, b])),
                _ => return Err(bad()),
            };
            let (record, rest) = records.split_at_checked(reclen).ok_or_else(bad)?;
            let name = record.get(19..).ok_or_else(bad)?;
            let name = CStr::from_bytes_until_nul(name).map_err(|_| bad())?;
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
            records = rest;
        }
    }
    Ok(names)
}

/// What [`read_file_at`] found.
#[derive(Debug, PartialEq, Eq)]
enum FileRead {
    /// A regular file's bytes, no more than the limit.
    Bytes(Vec<u8>),
    /// A symbolic link (not opened).
    Link,
    /// Not a regular file (a FIFO, socket, device or directory); nothing was read.
    NotRegular,
    /// A regular file over the limit: `size` bytes by `fstat`, or at least `size` when it grew
    /// past the limit while it was read.
    TooBig {
        /// Its size, or how much of it the read saw.
        size: u64,
        /// Whether it grew while it was read.
        grew: bool,
    },
}

/// Opens `name` in `dir` once (`O_NOFOLLOW | O_NONBLOCK`, so neither a link nor a FIFO or
/// device can make it follow or block), requires the descriptor to be a regular file, and reads
/// at most `limit` bytes from it.
fn read_file_at(dir: BorrowedFd<'_>, name: &CStr, limit: u64) -> io::Result<FileRead> {
    let fd = match sys::openat(dir, name, FILE_FLAGS, 0) {
        Ok(fd) => fd,
        Err(e) => {
            return match e.raw_os_error() {
                Some(libc::ELOOP) => Ok(FileRead::Link),
                // A socket, or a device without a driver.
                Some(libc::ENXIO | libc::ENODEV) => Ok(FileRead::NotRegular),
                _ => Err(e),
            };
        }
    };
    let st = sys::fstat(fd.as_fd())?;
    if !st.is_file() {
        return Ok(FileRead::NotRegular);
    }
    if st.size > limit {
        return Ok(FileRead::TooBig {
            size: st.size,
            grew: false,
        });
    }
    test_hook(Stage::Opened, name);
    let file = File::from(fd);
    let mut bytes = Vec::with_capacity(usize::try_from(st.size).unwrap_or(0));
    (&file).take(limit).read_to_end(&mut bytes)?;
    if bytes.len() as u64 == limit && (&file).read(&mut [0u8])? > 0 {
        return Ok(FileRead::TooBig {
            size: limit.saturating_add(1),
            grew: true,
        });
    }
    Ok(FileRead::Bytes(bytes))
}

/// The `--dir` directories of a call, opened and read.
#[derive(Debug)]
pub struct Shared {
    /// Their contents, for the request.
    pub trees: Vec<SharedDir>,
    /// The directories themselves, in the same order, for [`write_back`].
    pub hosts: Vec<HostDir>,
}

/// Opens and reads every `--dir` into the trees a request carries.
pub fn read_all(specs: &[DirSpec], mut budget: Budget) -> anyhow::Result<Shared> {
    let mut shared = Shared {
        trees: Vec::new(),
        hosts: Vec::new(),
    };
    for spec in specs {
        let host = HostDir::open(&spec.host)?;
        shared.trees.push(SharedDir {
            guest_path: spec.guest.clone(),
            entries: read_tree(&host, &mut budget)?,
        });
        shared.hosts.push(host);
    }
    Ok(shared)
}

/// Creates `entries` under the existing, empty directory `root` (for `--isolation wasm`, which
/// shares a scratch copy with the tool).
pub fn materialize(root: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    let host = HostDir::open(root)?;
    for entry in entries {
        tree::check_path(&entry.path).map_err(|e| anyhow::anyhow!("{}: {e}", entry.path))?;
    }
    if let Some((path, target, why)) = escaping_link(entries) {
        bail!("{path}: a symbolic link to `{target}`, {why}");
    }
    let top = host.fd.as_fd();
    for entry in entries {
        let path = root.join(&entry.path);
        let parent = open_parent(top, &entry.path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let dir = parent.dir(top);
        match &entry.node {
            Node::Dir => sys::mkdirat(dir, &parent.name, 0o777),
            Node::File(bytes) => sys::openat(dir, &parent.name, CREATE_FLAGS, 0o666)
                .and_then(|fd| File::from(fd).write_all(bytes)),
            Node::Symlink(target) => {
                c_name(target).and_then(|target| sys::symlinkat(&target, dir, &parent.name))
            }
            Node::Unchanged => bail!(
                "{}: a tree to copy cannot hold unchanged entries",
                entry.path
            ),
        }
        .with_context(|| format!("cannot create {}", path.display()))?;
    }
    Ok(())
}

/// What [`write_back`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Files and symbolic links written (new or changed).
    pub files_written: usize,
    /// Directories made.
    pub dirs_created: usize,
    /// Files, directories and symbolic links removed.
    pub removed: usize,
}

/// Checks that the trees that came back from the tool fit `budget`, as the tool's directories
/// had to: at most `budget.entries` entries and `budget.bytes` bytes of file data and link
/// targets, all directories together. An agent that says more is lying: its answer is refused.
pub fn check_answer_size(after: &[Vec<Entry>], budget: Budget) -> anyhow::Result<()> {
    let entries = after.iter().map(Vec::len).sum::<usize>();
    let bytes = after
        .iter()
        .flatten()
        .map(|e| match &e.node {
            Node::File(data) => data.len() as u64,
            Node::Symlink(target) => target.len() as u64,
            Node::Dir | Node::Unchanged => 0,
        })
        .fold(0u64, u64::saturating_add);
    if entries as u64 > u64::from(budget.entries) {
        bail!(
            "the tool's answer lists {entries} entries, over the {} its directories may hold",
            budget.entries
        );
    }
    if bytes > budget.bytes {
        bail!(
            "the tool's answer holds {bytes} bytes, over the {} its directories may hold",
            budget.bytes
        );
    }
    Ok(())
}

/// Checks a tree that came back from the tool: plain relative paths, each once, parents
/// before children and being directories, `Unchanged` only for a file that was sent, and every
/// symbolic link staying inside the tree ([`check_link`], which every link is checked against,
/// not only new ones: a directory replaced by a link can change where an old link leads).
fn check_answer<'a>(
    before: &BTreeMap<&str, &Node>,
    after: &'a [Entry],
) -> anyhow::Result<BTreeMap<&'a str, &'a Node>> {
    let mut seen: BTreeMap<&str, &Node> = BTreeMap::new();
    for entry in after {
        let path = entry.path.as_str();
        tree::check_path(path)
            .map_err(|e| anyhow::anyhow!("the tool's answer names `{path}`: {e}"))?;
        if let Some(parent) = tree::parent(path)
            && !matches!(seen.get(parent), Some(Node::Dir))
        {
            bail!("the tool's answer lists `{path}` without its directory first");
        }
        if matches!(entry.node, Node::Unchanged) && !matches!(before.get(path), Some(Node::File(_)))
        {
            bail!("the tool's answer calls `{path}` unchanged, but no such file was sent");
        }
        if seen.insert(path, &entry.node).is_some() {
            bail!("the tool's answer lists `{path}` twice");
        }
    }
    if let Some((path, target, why)) = escaping_link(after) {
        bail!(
            "the tool left a symbolic link `{path}` -> `{target}`, {why}; only links that stay inside a shared directory are written back"
        );
    }
    Ok(seen)
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in a name"))
}

/// Opens the directory `relative` (a checked path) below `root` without following any link and
/// without leaving `root`.
fn open_dir_beneath(root: BorrowedFd<'_>, relative: &str) -> io::Result<OwnedFd> {
    #[cfg(test)]
    if NO_OPENAT2.with(std::cell::Cell::get) {
        return open_dir_by_components(root, relative);
    }
    match sys::openat2(root, &c_name(relative)?, DIR_FLAGS, RESOLVE) {
        // No openat2 (before Linux 5.6), a filter that forbids it, or a rename racing the
        // lookup: the walk below is as strict, one component at a time.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EPERM | libc::EAGAIN)
            ) =>
        {
            open_dir_by_components(root, relative)
        }
        result => result,
    }
}

/// [`open_dir_beneath`] without `openat2`: a checked path has no `.`, `..` or empty component,
/// and each component is opened with `O_NOFOLLOW | O_DIRECTORY`, so a link fails the walk.
fn open_dir_by_components(root: BorrowedFd<'_>, relative: &str) -> io::Result<OwnedFd> {
    let mut components = relative.split('/');
    let first = components.next().unwrap_or(relative);
    let mut fd = sys::openat(root, &c_name(first)?, DIR_FLAGS, 0)?;
    for component in components {
        fd = sys::openat(fd.as_fd(), &c_name(component)?, DIR_FLAGS, 0)?;
    }
    Ok(fd)
}

/// The directory holding an entry, and the entry's name in it.
struct Parent {
    /// `None` for HOST itself.
    fd: Option<OwnedFd>,
    name: CString,
}

impl Parent {
    fn dir<'a>(&'a self, root: BorrowedFd<'a>) -> BorrowedFd<'a> {
        self.fd.as_ref().map_or(root, AsFd::as_fd)
    }
}

/// Opens the directory holding `path` (a checked path) below `root`, as [`open_dir_beneath`].
fn open_parent(root: BorrowedFd<'_>, path: &str) -> io::Result<Parent> {
    Ok(match path.rsplit_once('/') {
        Some((parent, name)) => Parent {
            fd: Some(open_dir_beneath(root, parent)?),
            name: c_name(name)?,
        },
        None => Parent {
            fd: None,
            name: c_name(path)?,
        },
    })
}

/// Why the directory holding `path` could not be opened, in words.
fn parent_error(root: &HostDir, path: &str, e: io::Error) -> anyhow::Error {
    let parent = root.path.join(tree::parent(path).unwrap_or(""));
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV) => anyhow::anyhow!(
            "{} or a directory above it below {} is no longer a directory (replaced by a link or file on the host during the call?); not writing below it",
            parent.display(),
            root.path.display()
        ),
        _ => anyhow::Error::new(e).context(format!("cannot open {}", parent.display())),
    }
}

/// Writes `bytes` to `name` in `dir` through a new temporary file beside it and a rename, with
/// the permissions `mode` (those of the file it replaces) when given.
fn replace_file(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: Option<u32>,
    bytes: &[u8],
) -> io::Result<()> {
    let (tmp, mut file) = create_temp(dir, name)?;
    let mut write = || -> io::Result<()> {
        file.write_all(bytes)?;
        if let Some(mode) = mode {
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.sync_all()?;
        sys::renameat(dir, &tmp, name)
    };
    let result = write();
    if result.is_err() {
        let _ = sys::unlinkat(dir, &tmp, false);
    }
    result
}

/// Creates a new, empty temporary file in `dir` for replacing `name` (`O_EXCL`: never an
/// existing file or link).
fn create_temp(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<(CString, File)> {
    with_temp_name(name, |tmp| {
        sys::openat(dir, tmp, CREATE_FLAGS, 0o666).map(File::from)
    })
}

/// Calls `create` with temporary names for replacing `name` until one is free (`create` fails
/// with `AlreadyExists` for a taken one): that name and what `create` made.
fn with_temp_name<T>(
    name: &CStr,
    mut create: impl FnMut(&CStr) -> io::Result<T>,
) -> io::Result<(CString, T)> {
    // A name stays within NAME_MAX with the suffix.
    let name = name.to_string_lossy();
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let stem = name.get(..end).unwrap_or("");
    for attempt in 0..100u32 {
        let tmp = c_name(&format!(
            ".{stem}.bulwark-{}-{attempt}.tmp",
            std::process::id()
        ))?;
        match create(&tmp) {
            Ok(made) => return Ok((tmp, made)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "every temporary name tried is taken",
    ))
}

/// Makes `name` in `dir` a symbolic link holding `target`: a new link at a temporary name beside
/// it, renamed over whatever file or link is there (a reader sees the old entry or the new
/// link, never neither).
fn replace_link(dir: BorrowedFd<'_>, name: &CStr, target: &str) -> io::Result<()> {
    let target = c_name(target)?;
    let (tmp, ()) = with_temp_name(name, |tmp| sys::symlinkat(&target, dir, tmp))?;
    let result = sys::renameat(dir, &tmp, name);
    if result.is_err() {
        let _ = sys::unlinkat(dir, &tmp, false);
    }
    result
}

/// Whether what is at a path now (`st`, not followed) is what the call saw there (`old`: a link
/// for a link, otherwise a regular file), so the write-back may replace it.
fn replaceable(st: &sys::Stat, old: Option<&&Node>) -> bool {
    match old {
        Some(Node::Symlink(_)) => st.is_link(),
        _ => st.is_file(),
    }
}

/// What is at `name` in `dir` now (not followed; `None`: nothing), refusing anything the
/// write-back may not replace ([`replaceable`]); `host` is its path, for messages.
fn current(
    dir: BorrowedFd<'_>,
    name: &CStr,
    old: Option<&&Node>,
    host: &Path,
) -> anyhow::Result<Option<sys::Stat>> {
    match sys::lstat_at(dir, name) {
        Ok(st) if replaceable(&st, old) => Ok(Some(st)),
        Ok(_) => bail!(
            "{} changed on the host during the call; not replacing it",
            host.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", host.display())),
    }
}

/// Checks a tree that came back for a directory made in memory (`CallSpec::files`) by the rules
/// a write-back applies ([`check_answer`]): plain relative paths, each once, parents first,
/// `Unchanged` only for a file that was sent, links that stay inside. Whoever gets the tree
/// may write it out by its paths.
pub fn check_tree(before: &[Entry], after: &[Entry]) -> anyhow::Result<()> {
    let before: BTreeMap<&str, &Node> = before.iter().map(|e| (e.path.as_str(), &e.node)).collect();
    check_answer(&before, after).map(drop)
}

/// Makes the host directory `root` hold `after` where it held `before` (see the module docs).
pub fn write_back(root: &HostDir, before: &[Entry], after: &[Entry]) -> anyhow::Result<Changes> {
    let before: BTreeMap<&str, &Node> = before.iter().map(|e| (e.path.as_str(), &e.node)).collect();
    let after_map = check_answer(&before, after)?;
    root.check_still_shared()?;
    let top = root.fd.as_fd();
    let mut changes = Changes::default();
    let is_dir = |n: &Node| matches!(n, Node::Dir);

    // Removals first, deepest first, so directories are empty when their turn comes and a name
    // that changed kind is free again.
    let mut gone: Vec<(&str, &Node)> = before
        .iter()
        .filter(|(path, node)| match after_map.get(*path) {
            None => true,
            Some(new) => is_dir(new) != is_dir(node),
        })
        .map(|(path, node)| (*path, *node))
        .collect();
    gone.sort_by_key(|(path, _)| std::cmp::Reverse(path.matches('/').count()));
    let gone_set: BTreeSet<&str> = gone.iter().map(|(p, _)| *p).collect();
    for (path, node) in &gone {
        let dir = &is_dir(node);
        let host = root.path.join(path);
        let parent = match open_parent(top, path) {
            Ok(p) => p,
            // Its directory is gone already, and it with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(parent_error(root, path, e)),
        };
        let at = parent.dir(top);
        let st = match sys::lstat_at(at, &parent.name) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", host.display())),
        };
        if st.is_link() != matches!(node, Node::Symlink(_)) || st.is_dir() != *dir {
            bail!(
                "{} changed on the host during the call; not removing it",
                host.display()
            );
        }
        // unlinkat removes the name itself: a link put there since is removed, not followed.
        if *dir {
            sys::unlinkat(at, &parent.name, true).with_context(|| {
                format!(
                    "cannot remove the directory {} (the tool removed it; did something on the host add files to it?)",
                    host.display()
                )
            })?;
        } else {
            sys::unlinkat(at, &parent.name, false)
                .with_context(|| format!("cannot remove {}", host.display()))?;
        }
        changes.removed += 1;
    }

    // Then directories and files, parents first (the answer's order).
    for entry in after {
        let path = entry.path.as_str();
        // A name removed above (it changed kind) is new again.
        let old = if gone_set.contains(path) {
            None
        } else {
            before.get(path)
        };
        match &entry.node {
            Node::Dir if old.is_none() => {
                let host = root.path.join(path);
                let parent = open_parent(top, path).map_err(|e| parent_error(root, path, e))?;
                sys::mkdirat(parent.dir(top), &parent.name, 0o777)
                    .with_context(|| format!("cannot create the directory {}", host.display()))?;
                changes.dirs_created += 1;
            }
            Node::File(bytes) if !matches!(old, Some(Node::File(b)) if b == bytes) => {
                let host = root.path.join(path);
                let parent = open_parent(top, path).map_err(|e| parent_error(root, path, e))?;
                let at = parent.dir(top);
                let mode = current(at, &parent.name, old, &host)?
                    .filter(sys::Stat::is_file)
                    .map(|st| st.mode & 0o7777);
                replace_file(at, &parent.name, mode, bytes)
                    .with_context(|| format!("cannot write {}", host.display()))?;
                changes.files_written += 1;
            }
            Node::Symlink(target) if !matches!(old, Some(Node::Symlink(t)) if t == target) => {
                let host = root.path.join(path);
                let parent = open_parent(top, path).map_err(|e| parent_error(root, path, e))?;
                let at = parent.dir(top);
                current(at, &parent.name, old, &host)?;
                replace_link(at, &parent.name, target).with_context(|| {
                    format!("cannot create the symbolic link {}", host.display())
                })?;
                changes.files_written += 1;
            }
            _ => {}
        }
    }
    Ok(changes)
}

/// Small safe wrappers over the system calls above; each takes descriptors it only borrows and
/// C strings that outlive the call.
mod sys {
    use std::ffi::CStr;
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use libc::c_int;

    /// The parts of a `struct stat` used here.
    #[derive(Clone, Copy, Debug)]
    pub struct Stat {
        pub mode: libc::mode_t,
        pub size: u64,
        pub dev: libc::dev_t,
        pub ino: libc::ino_t,
        pub nlink: libc::nlink_t,
    }

    impl Stat {
        fn new(st: &libc::stat) -> Self {
            Self {
                mode: st.st_mode,
                size: u64::try_from(st.st_size).unwrap_or(0),
                dev: st.st_dev,
                ino: st.st_ino,
                nlink: st.st_nlink,
            }
        }

        fn kind(&self) -> libc::mode_t {
            self.mode & libc::S_IFMT
        }

        pub fn is_dir(&self) -> bool {
            self.kind() == libc::S_IFDIR
        }

        pub fn is_file(&self) -> bool {
            self.kind() == libc::S_IFREG
        }

        pub fn is_link(&self) -> bool {
            self.kind() == libc::S_IFLNK
        }
    }

    /// Runs `call` until it is not interrupted; -1 is an error in `errno`.
    fn retry(mut call: impl FnMut() -> libc::c_long) -> io::Result<libc::c_long> {
        loop {
            let r = call();
            if r != -1 {
                return Ok(r);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// A descriptor the kernel just returned.
    fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = c_int::try_from(fd)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a descriptor out of range"))?;
        // SAFETY: `fd` is a new descriptor the kernel just returned to this call; nothing else
        // owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn open(path: &CStr, flags: c_int) -> io::Result<OwnedFd> {
        owned(retry(|| {
            // SAFETY: `path` is NUL-terminated and outlives the call; no mode is read without
            // O_CREAT.
            unsafe { libc::open(path.as_ptr(), flags) }.into()
        })?)
    }

    pub fn openat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        flags: c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        owned(retry(|| {
            // SAFETY: `dir` is an open descriptor and `name` is NUL-terminated; both outlive the
            // call. The mode is passed as the unsigned int the variadic argument expects.
            unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    flags,
                    libc::c_uint::from(mode),
                )
            }
            .into()
        })?)
    }

    /// `struct open_how` of linux/openat2.h.
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }

    pub fn openat2(
        dir: BorrowedFd<'_>,
        path: &CStr,
        flags: c_int,
        resolve: u64,
    ) -> io::Result<OwnedFd> {
        let how = OpenHow {
            flags: u64::try_from(flags)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad open flags"))?,
            mode: 0,
            resolve,
        };
        owned(retry(|| {
            // SAFETY: `dir` is an open descriptor, `path` is NUL-terminated and `how` is an
            // open_how of the size passed; all outlive the call, which only reads them.
            unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir.as_raw_fd(),
                    path.as_ptr(),
                    &raw const how,
                    size_of::<OpenHow>(),
                )
            }
        })?)
    }

    pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `fd` is open and `st` is writable memory for one `struct stat`.
        retry(|| unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) }.into())?;
        // SAFETY: fstat succeeded, so it filled `st`.
        Ok(Stat::new(unsafe { st.assume_init_ref() }))
    }

    /// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: a link is described, not followed.
    pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        retry(|| {
            // SAFETY: `dir` is open, `name` is NUL-terminated and `st` is writable memory for
            // one `struct stat`.
            unsafe {
                libc::fstatat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    st.as_mut_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            }
            .into()
        })?;
        // SAFETY: fstatat succeeded, so it filled `st`.
        Ok(Stat::new(unsafe { st.assume_init_ref() }))
    }

    /// `lstat(path)`: a link is described, not followed.
    pub fn lstat(path: &CStr) -> io::Result<Stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `path` is NUL-terminated and `st` is writable memory for one `struct stat`.
        retry(|| unsafe { libc::lstat(path.as_ptr(), st.as_mut_ptr()) }.into())?;
        // SAFETY: lstat succeeded, so it filled `st`.
        Ok(Stat::new(unsafe { st.assume_init_ref() }))
    }

    pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: `dir` is open and `name` is NUL-terminated; both outlive the call.
        retry(|| unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }.into())?;
        Ok(())
    }

    /// Removes the name `name` in `dir` (an empty directory when `is_dir`); never follows a link.
    pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `dir` is open and `name` is NUL-terminated; both outlive the call.
        retry(|| unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }.into())?;
        Ok(())
    }

    /// Renames `from` to `to`, both in `dir`; a link at `to` is replaced, not followed.
    pub fn renameat(dir: BorrowedFd<'_>, from: &CStr, to: &CStr) -> io::Result<()> {
        retry(|| {
            // SAFETY: `dir` is open and both names are NUL-terminated; all outlive the call.
            unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) }
                .into()
        })?;
        Ok(())
    }

    /// The target of the link `name` in `dir` (`EINVAL`: it is not a link), at most
    /// `super::MAX_TARGET` bytes (a longer one is `ENAMETOOLONG`).
    pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; super::MAX_TARGET + 1];
        let n = retry(|| {
            // SAFETY: `dir` is open, `name` is NUL-terminated and `buf` is writable for
            // `buf.len()` bytes, the most the kernel writes; all outlive the call.
            unsafe {
                libc::readlinkat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
            .try_into()
            .unwrap_or(-1)
        })?;
        let n = usize::try_from(n)
            .map_err(|_| io::Error::other("readlinkat returned a negative length"))?;
        if n > super::MAX_TARGET {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Creates the link `name` in `dir` holding `target`; fails if `name` exists (`EEXIST`).
    pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        retry(|| {
            // SAFETY: `dir` is open and both strings are NUL-terminated; all outlive the call.
            unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }.into()
        })?;
        Ok(())
    }

    /// Moves the directory `dir` back to its first entry.
    pub fn rewind(dir: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: `dir` is open; lseek only moves its offset.
        retry(|| unsafe { libc::lseek(dir.as_raw_fd(), 0, libc::SEEK_SET) })?;
        Ok(())
    }

    /// The next `struct linux_dirent64` records of `dir` into `buf`: how many bytes (0 at the end).
    pub fn getdents(dir: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let n = retry(|| {
            // SAFETY: `dir` is open and `buf` is writable for `buf.len()` bytes, the most the
            // kernel writes.
            unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    dir.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            }
        })?;
        usize::try_from(n).map_err(|_| io::Error::other("getdents64 returned a negative count"))
    }
}

#[cfg(test)]
mod tests;
