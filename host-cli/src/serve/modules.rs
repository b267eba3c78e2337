//! The server's module store: uploaded modules, kept by SHA-256 in a private directory under the
//! compile cache (`<cache>/modules/<hex>.wasm`), and compiled for the guest when they arrive.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    /// Opens (creating) the store beside the compile cache's artifacts.
    pub fn open() -> anyhow::Result<Self> {
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
        Ok(Self { dir })
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
            Ok(_) => Ok((digest, fresh)),
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
    fn write(&self, path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
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
