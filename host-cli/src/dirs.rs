//! `bulwark run --dir HOST::GUEST`: host directories shared with a tool by copy.
//!
//! Before the call the host directory is read into a tree (regular files and directories only:
//! a symbolic link, socket, FIFO or device anywhere in it is refused, as is a tree over the
//! size or entry caps). The tool works on its own copy. After a call that exits with code 0,
//! [`write_back`] makes the host directory match what the tool left: changed and new files are
//! written to a temporary file beside their destination and renamed over it (a reader never sees
//! a partial file), new directories are made, and files and directories the tool removed are
//! removed. It touches only paths that were copied in or that the tool created, all below the
//! shared directory; every path the guest sends back is checked before use.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bulwark_proto::tree::{self, Entry, Node, SharedDir};

/// Default cap on the files and directories in all shared directories (`--max-dir-files`).
pub const DEFAULT_MAX_ENTRIES: u32 = 10_000;

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

/// Reads the directory `root` into a tree, charging `budget`.
pub fn read_tree(root: &Path, budget: &mut Budget) -> anyhow::Result<Vec<Entry>> {
    let meta = std::fs::metadata(root)
        .with_context(|| format!("--dir {}: cannot read it", root.display()))?;
    if !meta.is_dir() {
        bail!("--dir {}: not a directory", root.display());
    }
    let mut out = Vec::new();
    walk(root, root, "", budget, &mut out)?;
    Ok(out)
}

fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    budget: &mut Budget,
    out: &mut Vec<Entry>,
) -> anyhow::Result<()> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("--dir {}: cannot list {}", root.display(), dir.display()))?
    {
        let entry = entry
            .with_context(|| format!("--dir {}: cannot list {}", root.display(), dir.display()))?;
        names.push(entry.file_name());
    }
    names.sort();
    for name in names {
        let host_path = dir.join(&name);
        let Some(name) = name.to_str() else {
            bail!(
                "--dir {}: {} has a name that is not UTF-8; rename it or share another directory",
                root.display(),
                host_path.display()
            );
        };
        let path = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        tree::check_path(&path).map_err(|e| {
            anyhow::anyhow!("--dir {}: {}: {e}", root.display(), host_path.display())
        })?;
        budget.entries = budget.entries.checked_sub(1).with_context(|| {
            format!(
                "--dir {}: more files and directories than the limit (--max-dir-files)",
                root.display()
            )
        })?;
        let meta = std::fs::symlink_metadata(&host_path).with_context(|| {
            format!(
                "--dir {}: cannot read {}",
                root.display(),
                host_path.display()
            )
        })?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            bail!(
                "--dir {}: {} is a symbolic link; shared directories may hold only files and directories",
                root.display(),
                host_path.display()
            );
        } else if kind.is_dir() {
            out.push(Entry {
                path: path.clone(),
                node: Node::Dir,
            });
            walk(root, &host_path, &path, budget, out)?;
        } else if kind.is_file() {
            budget.bytes = budget.bytes.checked_sub(meta.len()).with_context(|| {
                format!(
                    "--dir {}: its files are larger than the limit (--max-dir-size); {} alone is {} bytes",
                    root.display(),
                    host_path.display(),
                    meta.len()
                )
            })?;
            let bytes = std::fs::read(&host_path).with_context(|| {
                format!(
                    "--dir {}: cannot read {}",
                    root.display(),
                    host_path.display()
                )
            })?;
            out.push(Entry {
                path,
                node: Node::File(bytes),
            });
        } else {
            bail!(
                "--dir {}: {} is not a regular file or directory (a socket, FIFO or device); it cannot be shared",
                root.display(),
                host_path.display()
            );
        }
    }
    Ok(())
}

/// Reads every `--dir` into the trees a request carries.
pub fn read_all(specs: &[DirSpec], mut budget: Budget) -> anyhow::Result<Vec<SharedDir>> {
    specs
        .iter()
        .map(|spec| {
            Ok(SharedDir {
                guest_path: spec.guest.clone(),
                entries: read_tree(&spec.host, &mut budget)?,
            })
        })
        .collect()
}

/// Creates `entries` under the existing, empty directory `root` (for `--isolation wasm`, which
/// shares a scratch copy with the tool).
pub fn materialize(root: &Path, entries: &[Entry]) -> anyhow::Result<()> {
    for entry in entries {
        tree::check_path(&entry.path).map_err(|e| anyhow::anyhow!("{}: {e}", entry.path))?;
        let path = root.join(&entry.path);
        match &entry.node {
            Node::Dir => std::fs::create_dir(&path),
            Node::File(bytes) => std::fs::write(&path, bytes),
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
    /// Files written (new or changed).
    pub files_written: usize,
    /// Directories made.
    pub dirs_created: usize,
    /// Files and directories removed.
    pub removed: usize,
}

/// Checks a tree that came back from the tool: plain relative paths, each once, parents
/// before children and being directories, `Unchanged` only for a file that was sent.
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
    Ok(seen)
}

/// Refuses to work on `path` unless every directory from `root` down to its parent is a real
/// directory (not a link that could lead outside), so nothing outside `root` is touched.
fn check_inside(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    let mut at = root.to_path_buf();
    if let Some(parent) = tree::parent(relative) {
        for component in parent.split('/') {
            at.push(component);
            let meta = std::fs::symlink_metadata(&at)
                .with_context(|| format!("cannot read {}", at.display()))?;
            if !meta.is_dir() {
                bail!(
                    "{} is no longer a directory (changed on the host during the call?); not writing below it",
                    at.display()
                );
            }
        }
    }
    Ok(root.join(relative))
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, keeping the
/// permissions of a file it replaces.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a file to write has no directory")?;
    let name = path.file_name().context("a file to write has no name")?;
    let tmp = dir.join(format!(
        ".{}.bulwark-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let old_mode = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions().mode());
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some(mode) = old_mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Makes the host directory `root` hold `after` where it held `before` (see the module docs).
pub fn write_back(root: &Path, before: &[Entry], after: &[Entry]) -> anyhow::Result<Changes> {
    let before: BTreeMap<&str, &Node> = before.iter().map(|e| (e.path.as_str(), &e.node)).collect();
    let after_map = check_answer(&before, after)?;
    let mut changes = Changes::default();
    let is_dir = |n: &Node| matches!(n, Node::Dir);

    // Removals first, deepest first, so directories are empty when their turn comes and a name
    // that changed kind is free again.
    let mut gone: Vec<(&str, bool)> = before
        .iter()
        .filter(|(path, node)| match after_map.get(*path) {
            None => true,
            Some(new) => is_dir(new) != is_dir(node),
        })
        .map(|(path, node)| (*path, is_dir(node)))
        .collect();
    gone.sort_by_key(|(path, _)| std::cmp::Reverse(path.matches('/').count()));
    let gone_set: BTreeSet<&str> = gone.iter().map(|(p, _)| *p).collect();
    for (path, dir) in &gone {
        let host = check_inside(root, path)?;
        let meta = match std::fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", host.display())),
        };
        if meta.file_type().is_symlink() || meta.is_dir() != *dir {
            bail!(
                "{} changed on the host during the call; not removing it",
                host.display()
            );
        }
        if *dir {
            std::fs::remove_dir(&host).with_context(|| {
                format!(
                    "cannot remove the directory {} (the tool removed it; did something on the host add files to it?)",
                    host.display()
                )
            })?;
        } else {
            std::fs::remove_file(&host)
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
                let host = check_inside(root, path)?;
                std::fs::create_dir(&host)
                    .with_context(|| format!("cannot create the directory {}", host.display()))?;
                changes.dirs_created += 1;
            }
            Node::File(bytes) if !matches!(old, Some(Node::File(b)) if b == bytes) => {
                let host = check_inside(root, path)?;
                if let Ok(meta) = std::fs::symlink_metadata(&host)
                    && !meta.is_file()
                {
                    bail!(
                        "{} changed on the host during the call; not replacing it",
                        host.display()
                    );
                }
                replace_file(&host, bytes)?;
                changes.files_written += 1;
            }
            _ => {}
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests;
