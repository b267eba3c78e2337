//! Directory trees that cross between the host and the guest agent: the contents of a
//! `--dir` going in, and what the tool left there coming back.
//!
//! A tree is a flat list of entries whose paths are relative to the shared directory, with `/`
//! between components, parents listed before their children. Every path is hostile to whoever
//! receives it: [`check_path`] is the one rule both sides apply before using one.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest single path component (file name), in bytes.
pub const MAX_NAME: usize = 255;

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file and all of its bytes.
    File(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A symbolic link and its target, as the link stores it. Its target is checked by whoever
    /// makes the link real: the guest's file system resolves it only inside the shared
    /// directory, and the host writes back only a link whose target stays inside.
    Symlink(String),
    /// A regular file whose bytes are exactly those the host sent for this same path (only in
    /// answers, so unchanged files do not travel back).
    Unchanged,
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the shared directory's root.
    pub path: String,
    /// What is there.
    pub node: Node,
}

/// A host directory shared with a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDir {
    /// Where the tool sees it (the preopen's name, such as `/data` or `.`).
    pub guest_path: String,
    /// Its contents.
    pub entries: Vec<Entry>,
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Empty, or a component is empty (`a//b`, leading or trailing `/`).
    Empty,
    /// A component is `.` or `..`.
    Dots,
    /// Contains a NUL byte.
    Nul,
    /// Longer than [`MAX_PATH`], or a component longer than [`MAX_NAME`].
    TooLong,
}

impl core::fmt::Display for PathError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Empty => "a path or one of its components is empty",
            Self::Dots => "a path component is `.` or `..`",
            Self::Nul => "a path contains a NUL byte",
            Self::TooLong => "a path or file name is too long",
        })
    }
}

/// Checks that `path` is a plain relative path: non-empty components separated by single `/`,
/// none of them `.` or `..`, no NUL, within the length limits. Such a path cannot leave the
/// directory it is relative to.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if path.bytes().any(|b| b == 0) {
        return Err(PathError::Nul);
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathError::Empty),
            "." | ".." => return Err(PathError::Dots),
            c if c.len() > MAX_NAME => return Err(PathError::TooLong),
            _ => {}
        }
    }
    Ok(())
}

/// The parent of a checked path (`None` for a path with one component).
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_pass() {
        for ok in ["a", "a/b", "dir/file.txt", "...", ".hidden", "a b/c"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_path(""), Err(PathError::Empty));
        assert_eq!(check_path("/etc/passwd"), Err(PathError::Empty));
        assert_eq!(check_path("a//b"), Err(PathError::Empty));
        assert_eq!(check_path("a/"), Err(PathError::Empty));
        assert_eq!(check_path(".."), Err(PathError::Dots));
        assert_eq!(check_path("a/../../x"), Err(PathError::Dots));
        assert_eq!(check_path("./a"), Err(PathError::Dots));
        assert_eq!(check_path("a\0b"), Err(PathError::Nul));
        let long_name = "x".repeat(MAX_NAME + 1);
        assert_eq!(check_path(&long_name), Err(PathError::TooLong));
        let long_path = "ab/".repeat(MAX_PATH / 3 + 1) + "c";
        assert_eq!(check_path(&long_path), Err(PathError::TooLong));
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), None);
    }
}
