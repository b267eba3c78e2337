//! The server's module store: uploaded modules, kept by SHA-256 in a private directory under the
//! compile cache (`<cache>/modules/<hex>.wasm`), and compiled for the guest when they arrive.
//!
//! The store is bounded (`bulwark serve --max-store`): what it holds, modules and their guest
//! artifacts in the compile cache together, stays under the cap by forgetting the modules used
//! least recently. A call already running keeps its open files; a later call naming a
//! forgotten digest is answered 404 and must upload the module again.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bulwark_engine::Metering;

use crate::cache::{self, Cache};
use crate::cancel::Cancel;
use crate::cli::Target;
use crate::compile::{MAX_MODULE_SIZE, ModuleFile, hex, sha256};

/// How long compiling an upload may take.
const UPLOAD_COMPILE_TIMEOUT: Duration = Duration::from_secs(120);

/// Uploaded modules by digest.
pub struct Store {
    dir: PathBuf,
    /// The compile cache's artifacts, where the modules' compiled forms are.
    artifacts: PathBuf,
    /// Most bytes the store holds, artifacts included.
    max_bytes: u64,
    index: Mutex<Index>,
}

/// What the store holds, for its bound.
#[derive(Default)]
struct Index {
    /// Each module: its bytes (module and artifacts) and when it was last stored or used.
    modules: HashMap<[u8; 32], Held>,
    /// Modules forgotten to stay under the bound.
    evicted: u64,
}

#[derive(Clone, Copy)]
struct Held {
    bytes: u64,
    used: SystemTime,
}

/// The disk space a file takes (an artifact is sparse: its length overstates it).
fn disk_bytes(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

/// The store's figures, for `GET /v1/health`.
#[derive(Clone, Copy, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StoreStatus {
    /// Modules held.
    pub modules: usize,
    /// Bytes of disk held, modules and their compiled forms.
    pub bytes: u64,
    /// The bound (`--max-store`).
    pub max_bytes: u64,
    /// Modules forgotten to stay under it, least recently used first.
    pub evicted: u64,
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The module is not one the guest can run (not Wasm, does not validate or compile).
    #[error("{0}")]
    Module(String),
    /// The store or the cache failed.
    #[error("{0}")]
    Bulwark(String),
}

/// A module's SHA-256 in lowercase hex, checked: 64 hex digits, nothing else.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        if !pair.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

impl Store {
    /// Opens (creating) the store beside the compile cache's artifacts, bounded to `max_bytes`
    /// (modules and their artifacts).
    pub fn open(max_bytes: u64) -> anyhow::Result<Self> {
        // Opening the cache checks that its root is ours and private.
        Cache::open()?;
        let dir = cache::dir().join("modules");
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create {}", dir.display()));
            }
        }
        let meta = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?;
        cache::check_private(&dir, &meta)?;
        let store = Self {
            artifacts: cache::dir().join("artifacts"),
            dir,
            max_bytes,
            index: Mutex::default(),
        };
        store.load_index()?;
        // A bound lowered since the last start applies now.
        store.evict(None);
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads what the store holds: each `<hex>.wasm` with its artifacts, used as last modified.
    fn load_index(&self) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?;
        // The artifacts' disk use by module, from one listing of the cache.
        let mut compiled: HashMap<[u8; 32], u64> = HashMap::new();
        if let Ok(artifacts) = std::fs::read_dir(&self.artifacts) {
            for entry in artifacts.flatten() {
                let name = entry.file_name();
                let digest = name
                    .to_str()
                    .and_then(|n| n.get(..64))
                    .and_then(parse_digest);
                if let (Some(digest), Ok(meta)) = (digest, entry.metadata())
                    && meta.is_file()
                {
                    *compiled.entry(digest).or_default() += disk_bytes(&meta);
                }
            }
        }
        let mut index = self.lock();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".wasm"))
                .and_then(parse_digest)
            else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let held = Held {
                bytes: disk_bytes(&meta) + compiled.get(&digest).copied().unwrap_or(0),
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            };
            index.modules.insert(digest, held);
        }
        Ok(())
    }

    /// The compiled forms of `digest` in the compile cache (every engine variant).
    fn artifacts_of(&self, digest: &[u8; 32]) -> Vec<PathBuf> {
        let prefix = format!("{}-", hex(digest));
        std::fs::read_dir(&self.artifacts)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with(&prefix))
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn artifact_bytes(&self, digest: &[u8; 32]) -> u64 {
        self.artifacts_of(digest)
            .iter()
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .filter(std::fs::Metadata::is_file)
            .map(|m| disk_bytes(&m))
            .sum()
    }

    /// Notes that a call uses `digest` (it is forgotten last among the modules held).
    pub fn touch(&self, digest: &[u8; 32]) {
        if let Some(held) = self.lock().modules.get_mut(digest) {
            held.used = SystemTime::now();
        }
    }

    /// Forgets the least recently used modules (never `keep`) until the store is within its
    /// bound: each one's file and its compiled forms are removed.
    fn evict(&self, keep: Option<&[u8; 32]>) {
        let doomed: Vec<[u8; 32]> = {
            let mut index = self.lock();
            let mut total: u64 = index.modules.values().map(|h| h.bytes).sum();
            let mut order: Vec<([u8; 32], Held)> = index
                .modules
                .iter()
                .filter(|(d, _)| Some(*d) != keep)
                .map(|(d, h)| (*d, *h))
                .collect();
            order.sort_by_key(|(_, h)| h.used);
            let mut doomed = Vec::new();
            for (digest, held) in order {
                if total <= self.max_bytes {
                    break;
                }
                total = total.saturating_sub(held.bytes);
                index.modules.remove(&digest);
                index.evicted += 1;
                doomed.push(digest);
            }
            doomed
        };
        for digest in doomed {
            let _ = std::fs::remove_file(self.path(&digest));
            for artifact in self.artifacts_of(&digest) {
                let _ = std::fs::remove_file(artifact);
            }
        }
    }

    /// The store's figures now.
    pub fn status(&self) -> StoreStatus {
        let index = self.lock();
        StoreStatus {
            modules: index.modules.len(),
            bytes: index.modules.values().map(|h| h.bytes).sum(),
            max_bytes: self.max_bytes,
            evicted: index.evicted,
        }
    }

    /// Where the module with `digest` is kept.
    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.wasm", hex(digest)))
    }

    /// Whether the store holds the module with `digest`.
    pub fn has(&self, digest: &[u8; 32]) -> bool {
        std::fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// Stores `bytes` (binary Wasm or text) and compiles it for the guest (unmetered; a call
    /// with fuel compiles its own variant once), so its first call does not wait for that.
    /// Returns its SHA-256 and whether it was new.
    pub fn put(&self, bytes: &[u8], cancel: &Cancel) -> Result<([u8; 32], bool), StoreError> {
        if bytes.len() as u64 > MAX_MODULE_SIZE {
            return Err(StoreError::Module(format!(
                "the module is over the {} MiB limit",
                MAX_MODULE_SIZE >> 20
            )));
        }
        // Its compiled form is several times its size: one that could not fit is refused.
        if bytes.len() as u64 > self.max_bytes / 2 {
            return Err(StoreError::Module(format!(
                "the module ({} bytes) does not fit the server's module store ({} bytes, \
                 --max-store), compiled form included",
                bytes.len(),
                self.max_bytes
            )));
        }
        let digest = sha256(bytes);
        let path = self.path(&digest);
        let fresh = !self.has(&digest);
        if fresh {
            self.write(&path, bytes)
                .map_err(|e| StoreError::Bulwark(format!("{e:#}")))?;
        }
        let module = ModuleFile::open(&path).map_err(|e| StoreError::Bulwark(format!("{e:#}")))?;
        let cache = Cache::open().map_err(|e| StoreError::Bulwark(format!("{e:#}")))?;
        let compiled = cache.artifact(
            &module,
            Some(bytes),
            &hex(&digest),
            Target::Guest,
            Metering::None,
            cache::Stop {
                deadline: Instant::now() + UPLOAD_COMPILE_TIMEOUT,
                cancel,
            },
        );
        match compiled {
            Ok(_) => {
                // A module already held is only marked used: its size is known (a run of an
                // inline module comes here every time, and listing the cache is not free).
                let known = self.lock().modules.get_mut(&digest).map(|held| {
                    held.used = SystemTime::now();
                });
                if known.is_none() {
                    let module = std::fs::symlink_metadata(&path).map_or(0, |m| disk_bytes(&m));
                    let held = Held {
                        bytes: module + self.artifact_bytes(&digest),
                        used: SystemTime::now(),
                    };
                    self.lock().modules.insert(digest, held);
                    self.evict(Some(&digest));
                }
                Ok((digest, fresh))
            }
            Err(e) => {
                // A module that cannot run is not kept (one whose compile was only stopped or
                // timed out stays: another request may be using it).
                if fresh && matches!(e, cache::Error::Module(_)) {
                    let _ = std::fs::remove_file(&path);
                }
                Err(match e {
                    cache::Error::Module(msg) => StoreError::Module(msg),
                    cache::Error::TimedOut { .. } => StoreError::Module(format!(
                        "compiling the module took over {} s",
                        UPLOAD_COMPILE_TIMEOUT.as_secs()
                    )),
                    cache::Error::Interrupted => {
                        StoreError::Bulwark("the server is shutting down".into())
                    }
                    cache::Error::Bulwark(e) => StoreError::Bulwark(format!("{e:#}")),
                })
            }
        }
    }

    /// Writes `bytes` to `path` through a new temporary file renamed into place, so a reader
    /// never sees a partial module.
    fn write(&self, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!(
            ".upload-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot store the module as {}", path.display()))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_64_lowercase_hex_digits_are_a_digest() {
        let good = "ab".repeat(32);
        assert_eq!(parse_digest(&good), Some([0xab; 32]));
        for bad in [
            String::new(),
            "ab".repeat(31),
            "AB".repeat(32),
            format!("{}g0", "ab".repeat(31)),
            format!("../{}", "a".repeat(61)),
            format!("{}+1", "a".repeat(62)),
            "é".repeat(32),
        ] {
            assert_eq!(parse_digest(&bad), None, "{bad}");
        }
    }
}
