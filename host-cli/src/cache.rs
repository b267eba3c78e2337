//! The compile cache: artifacts on disk keyed by (module SHA-256, engine settings, wasmtime
//! version, target), compiled by a separate, resource-limited compile worker so a compiler
//! crash or runaway cannot take the CLI with it.
//!
//! **Nothing in the cache is trusted because of where it sits.** An entry is one file: a magic
//! string and an HMAC-SHA256 tag, a hole up to [`ARTIFACT_OFFSET`], then the artifact (2 MiB
//! aligned, so the VMM can map it into the guest as it lies in the file, in 2 MiB pages). The
//! tag is keyed by a secret per-user key file in the cache directory (32 random bytes, mode 0600, made on first use) and covers the entry's
//! cache key (module digest, engine key, target) and the artifact bytes, so an entry is used only
//! if it is exactly what the compiler produced for this module, engine and target: a swapped,
//! truncated, flipped or planted entry fails the check. Such an entry (or one that cannot be
//! read, or is not a regular file) is deleted and the module compiled again, never executed;
//! a broken entry heals itself on the next call.
//!
//! Tag and artifact live in one file written under a new random name (`O_EXCL`) and renamed into
//! place, so a reader sees a whole old entry or a whole new one, never a new artifact with an old
//! tag. A call gets the entry as an open, read-only, verified file ([`Entry`]): the VM maps the
//! artifact from that same descriptor, so what was checked is what the guest runs. The cache directory and its `artifacts` directory are created 0700, and a cache directory
//! owned by another user or writable by group or others is refused. Entries and the key are
//! opened once, without following a symbolic link, and read up to a size cap.
//!
//! The compile worker is `bulwark compile - -o -`: the module goes in on standard input and the
//! artifact comes out on standard output; it opens no path. It runs under an address-space limit
//! that follows the module's size ([`compile_memory`]) and is killed when the call's deadline
//! passes, or after [`COMPILE_TIMEOUT`], whichever comes first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_engine::Metering;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cancel::Cancel;
use crate::cli::Target;
use crate::compile::{
    ModuleFile, ReadError, create_temp, fill_random, open_regular_nofollow,
    read_regular_file_nofollow, sha256_hex,
};
use crate::memo::{Identity, Memo};

/// Wall-clock limit of one compilation, whatever the call's own deadline.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);

/// Address space the compile worker gets whatever the module's size. Measured with
/// `ulimit -v` bisection (8 MiB steps) on wasmtime 48 / Cranelift: a 520-byte .wat needs 24 MiB,
/// the 114-190 KB Rust tools (echo-args, compute, fs-tool, json-rank) 28-37 MiB; this leaves
/// room for other allocators and hosts.
pub const COMPILE_MEMORY_BASE: u64 = 256 << 20;

/// Address space the compile worker gets per byte of module, on top of
/// [`COMPILE_MEMORY_BASE`]. Measured: 10,000 tiny exported functions (190 KB binary) need
/// 142 MiB (~650 bytes per module byte); one function of 400,000 instructions (870 KB) needs
/// 1,134 MiB (~1,300 per byte), the worst seen. 2,048 is ~1.6 times that.
pub const COMPILE_MEMORY_PER_BYTE: u64 = 2048;

/// Most address space the compile worker ever gets (reached by modules of about 3.9 MiB).
pub const COMPILE_MEMORY_MAX: u64 = 8 << 30;

/// Largest artifact accepted from the compiler or read from the cache.
pub const MAX_ARTIFACT_SIZE: u64 = 1 << 30;

/// The compile worker's address-space limit for a module of `module_len` bytes.
pub fn compile_memory(module_len: usize) -> u64 {
    (module_len as u64)
        .saturating_mul(COMPILE_MEMORY_PER_BYTE)
        .saturating_add(COMPILE_MEMORY_BASE)
        .min(COMPILE_MEMORY_MAX)
}

/// First bytes of every cache entry (the format's version is in it). Version 2: the artifact
/// starts at [`ARTIFACT_OFFSET`]; version 3: that offset is 2 MiB.
const MAGIC: &[u8; 8] = b"BWKCWv3\n";
/// Length of the HMAC-SHA256 tag after [`MAGIC`].
const TAG_LEN: usize = 32;
/// Bytes of magic and tag at the start of an entry.
const HEADER_LEN: usize = MAGIC.len() + TAG_LEN;
/// Where the artifact starts in an entry: 2 MiB in (a hole before it takes no disk space), so it
/// can be mapped in place with the file's large page-cache folios mapped whole: the guest then
/// takes one page fault per 2 MiB of artifact it touches, not one per 4 KiB (a CPython call:
/// 135 faults instead of ~4,100, and 40 ms less).
pub const ARTIFACT_OFFSET: u64 = ARTIFACT_OFFSET_BYTES as u64;
/// [`ARTIFACT_OFFSET`] as a length.
const ARTIFACT_OFFSET_BYTES: usize = 2 << 20;
/// Bytes read at a time while an entry's tag is checked.
const VERIFY_CHUNK: usize = 1 << 20;
/// What the tag covers first, so it can never be confused with another use of the key.
const TAG_DOMAIN: &[u8] = b"bulwark compile cache entry v1\0";
/// The secret key file, in the cache directory (not in `artifacts/`).
const KEY_FILE: &str = "cache-key";
/// Bytes of secret key.
const KEY_LEN: usize = 32;
/// Most bytes of the compile worker's standard error kept for a message.
const MAX_WORKER_STDERR: u64 = 64 << 10;

type HmacSha256 = Hmac<Sha256>;

/// The cache directory: `$BULWARK_CACHE_DIR`, else `$XDG_CACHE_HOME/bulwark`, else
/// `~/.cache/bulwark`.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BULWARK_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("bulwark")
}

/// [`engine_key_for`] of the default, unmetered variant (what `bulwark doctor` shows).
pub fn engine_key(target: Target) -> String {
    engine_key_for(target, Metering::None)
}

/// Digest of everything besides the module that decides the artifact's bytes: wasmtime's
/// version, the target and the engine settings, which differ with `metering`.
pub fn engine_key_for(target: Target, metering: Metering) -> String {
    let id = match target {
        Target::Guest => format!(
            "{} {} {}",
            bulwark_engine::WASMTIME_VERSION,
            bulwark_engine::TARGET,
            metering.settings_id()
        ),
        // Compiled for this machine's CPU: an artifact carried to another machine is refused
        // when loaded, and the error says to clear the cache.
        Target::Host => format!(
            "{} host {}-{} {} {}",
            bulwark_engine::WASMTIME_VERSION,
            std::env::consts::ARCH,
            std::env::consts::OS,
            metering.settings_id(),
            bulwark_engine::HOST_SETTINGS_ID
        ),
    };
    sha256_hex(id.as_bytes())[..16].to_owned()
}

/// File name of the entry for a module with SHA-256 `digest`, compiled for `target` and
/// `metering`.
fn entry_name(digest: &str, target: Target, metering: Metering) -> String {
    let suffix = match target {
        Target::Guest => "",
        Target::Host => "-host",
    };
    format!(
        "{digest}-{}{suffix}.cwasm",
        engine_key_for(target, metering)
    )
}

/// What an entry's tag vouches for besides the artifact: module digest, engine key (which
/// covers the metering variant) and target.
fn cache_key(digest: &str, target: Target, metering: Metering) -> String {
    format!(
        "{digest} {} {}",
        engine_key_for(target, metering),
        target.name()
    )
}

/// Why [`Cache::artifact`] returned no artifact.
#[derive(Debug)]
pub enum Error {
    /// The module does not compile, or the compiler died on it: the whole message, naming the
    /// module.
    Module(String),
    /// The deadline passed while compiling: the call's own (`call_deadline`), or
    /// [`COMPILE_TIMEOUT`]. The compiler was killed and nothing was cached.
    TimedOut {
        /// Whether it was the call's deadline (else [`COMPILE_TIMEOUT`]).
        call_deadline: bool,
    },
    /// Ctrl-C, SIGTERM or SIGHUP arrived while compiling; the compiler was killed.
    Interrupted,
    /// The cache directory or the compiler process could not be used.
    Bulwark(anyhow::Error),
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Self::Bulwark(e)
    }
}

/// A verified artifact: `len` bytes at `offset` of `file`, opened read-only (or, when the
/// cache could not take a new entry, a private unlinked copy).
#[derive(Debug)]
pub struct Entry {
    /// The open entry file.
    pub file: File,
    /// Where the artifact starts in it (page aligned).
    pub offset: u64,
    /// The artifact's length.
    pub len: u64,
}

impl Entry {
    /// Reads the artifact's bytes (for the in-process run, which deserializes a copy).
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        let len = usize::try_from(self.len).map_err(std::io::Error::other)?;
        let mut bytes = vec![0; len];
        self.file.read_exact_at(&mut bytes, self.offset)?;
        Ok(bytes)
    }
}

/// When a compilation stops: at `deadline` (or after [`COMPILE_TIMEOUT`]), or when `cancel` is.
#[derive(Clone, Copy)]
pub struct Stop<'a> {
    /// The call's deadline.
    pub deadline: Instant,
    /// The call's cancel token.
    pub cancel: &'a Cancel,
}

impl Cache {
    /// Returns the artifact for `module` (whose SHA-256 is `digest`; `bytes` if it was read
    /// already) and `target` and `metering`: the cached one if its tag checks out, else one
    /// compiled now, by a compile worker that is killed as `stop` says, and then cached. The
    /// bool says whether it was compiled now.
    pub fn artifact(
        &self,
        module: &ModuleFile,
        bytes: Option<&[u8]>,
        digest: &str,
        target: Target,
        metering: Metering,
        stop: Stop<'_>,
    ) -> Result<(Entry, bool), Error> {
        let Stop { deadline, cancel } = stop;
        let path = self.artifacts.join(entry_name(digest, target, metering));
        let key = cache_key(digest, target, metering);
        if let Some(entry) = self.load(&path, &key) {
            return Ok((entry, false));
        }
        let read;
        let bytes = match bytes {
            Some(b) => b,
            None => {
                read = module.read().map_err(|e| Error::Module(format!("{e:#}")))?;
                // The digest was remembered for this very file; it is checked all the same
                // before anything is compiled under it.
                if sha256_hex(&read) != digest {
                    return Err(Error::Module(format!(
                        "module {} changed while it was read: run again",
                        module.path.display()
                    )));
                }
                &read
            }
        };
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!(
                "bulwark: compiling {} for {} (once: later calls use the cache)...",
                module.path.display(),
                target.name()
            );
        }
        let artifact = compile_in_child(bytes, &module.path, target, metering, deadline, cancel)?;
        // Only on a miss, off the path of a cached call: the directory may hold many entries.
        remove_stale_temp_files(&self.artifacts);
        let stored = self.store(&path, &key, &artifact);
        // Opened again read-only, and checked like any entry: the descriptor goes to the VMM.
        if stored.is_ok()
            && let Some(entry) = self.load(&path, &key)
        {
            return Ok((entry, true));
        }
        // The call can go on with the artifact in hand; the next one compiles again.
        if let Err(e) = stored {
            eprintln!("bulwark: warning: the compiled module was not cached: {e:#}");
        }
        Ok((private_copy(&artifact)?, true))
    }
}

/// An unlinked temporary file holding `artifact` at [`ARTIFACT_OFFSET`]: nobody else can
/// open it.
fn private_copy(artifact: &[u8]) -> anyhow::Result<Entry> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    file.write_all_at(artifact, ARTIFACT_OFFSET)
        .and_then(|()| file.flush())
        .with_context(|| format!("cannot write a temporary file in {}", dir.display()))?;
    Ok(Entry {
        file,
        offset: ARTIFACT_OFFSET,
        len: artifact.len() as u64,
    })
}

/// What a remembered entry check is filed under (with the entry's cache key).
const VERIFIED_PURPOSE: &str = "entry verified";
/// What a remembered module digest is filed under.
const DIGEST_PURPOSE: &str = "module sha256";

/// The value remembered for an entry whose tag checked out: its artifact length, so a record
/// can never vouch for an entry of another size.
fn verified_value(len: u64) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[..8].copy_from_slice(&len.to_le_bytes());
    v[8..16].copy_from_slice(b"verified");
    v
}

/// The artifact length of an entry of the size `id` reports, if it can hold one.
fn before_len(id: &Identity) -> Option<u64> {
    id.size()
        .checked_sub(ARTIFACT_OFFSET)
        .filter(|&len| len <= MAX_ARTIFACT_SIZE)
}

/// The opened cache: its `artifacts` and `memo` directories, checked, and the secret key.
pub struct Cache {
    artifacts: PathBuf,
    memo: PathBuf,
    key: [u8; KEY_LEN],
}

impl Cache {
    /// Creates (0700) and checks the cache directory and its `artifacts` directory, and reads
    /// the secret key, making it first if there is none.
    pub fn open() -> anyhow::Result<Self> {
        let root = dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .with_context(|| {
                format!(
                    "cannot create the compile cache {}; set BULWARK_CACHE_DIR to a directory of your own",
                    root.display()
                )
            })?;
        // The cache directory itself may be a link the user made; what it leads to is checked.
        let meta = std::fs::metadata(&root)
            .with_context(|| format!("cannot inspect the compile cache {}", root.display()))?;
        check_private(&root, &meta)?;
        let artifacts = root.join("artifacts");
        match std::fs::DirBuilder::new().mode(0o700).create(&artifacts) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot create the compile cache {}", artifacts.display())
                });
            }
        }
        let meta = std::fs::symlink_metadata(&artifacts)
            .with_context(|| format!("cannot inspect the compile cache {}", artifacts.display()))?;
        check_private(&artifacts, &meta)?;
        let key = load_key(&root)?;
        // Created (0700) when the first record is written.
        let memo = root.join("memo");
        Ok(Self {
            artifacts,
            memo,
            key,
        })
    }

    /// The entry at `path`, opened read-only, if it is a regular file whose tag is right for
    /// `key` and its artifact; any other entry there is deleted.
    fn load(&self, path: &Path, key: &str) -> Option<Entry> {
        let file = match open_regular_nofollow(path) {
            Ok(file) => file,
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(_) => {
                discard(path);
                return None;
            }
        };
        // A check remembered for exactly this file, unchanged since, stands (see memo.rs).
        // The entry format is part of what was checked: a record never vouches for another.
        let purpose = format!(
            "{VERIFIED_PURPOSE} {} {key}",
            String::from_utf8_lossy(MAGIC).trim_end()
        );
        let memo = Memo::new(&self.memo, &self.key);
        let before = Identity::of(&file).ok()?;
        let remembered = memo.get(&purpose, &before);
        let len = before_len(&before)?;
        if remembered.is_some_and(|v| v == verified_value(len)) {
            return Some(Entry {
                file,
                offset: ARTIFACT_OFFSET,
                len,
            });
        }
        match verify(&self.key, key, &file) {
            Some(len) => {
                if let Ok(after) = Identity::of(&file) {
                    memo.put(&purpose, &before, &after, &verified_value(len));
                }
                Some(Entry {
                    file,
                    offset: ARTIFACT_OFFSET,
                    len,
                })
            }
            None => {
                discard(path);
                None
            }
        }
    }

    /// SHA-256 of the module in `file` (a regular file opened once), remembered per file
    /// (see memo.rs); `None` when it must be read and hashed.
    pub fn remembered_digest(&self, file: &File) -> Option<[u8; 32]> {
        let id = Identity::of(file).ok()?;
        Memo::new(&self.memo, &self.key).get(DIGEST_PURPOSE, &id)
    }

    /// Remembers `digest` for the module in `file`, whose identity was `before` when it was
    /// read.
    pub fn remember_digest(&self, file: &File, before: &Identity, digest: &[u8; 32]) {
        if let Ok(after) = Identity::of(file) {
            Memo::new(&self.memo, &self.key).put(DIGEST_PURPOSE, before, &after, digest);
        }
    }

    /// Writes the entry for `key` at `path`: header and artifact into a new file under a random
    /// name, renamed over `path`.
    fn store(&self, path: &Path, key: &str, artifact: &[u8]) -> anyhow::Result<()> {
        let tag = tag(&self.key, key, artifact)?;
        let file_name = path
            .file_name()
            .context("the cache entry has no file name")?;
        // No fsync: an entry torn by a crash fails its tag and is compiled again.
        let (tmp, mut file) = create_temp(&self.artifacts, file_name, 0o600)?;
        let mut header = [0u8; HEADER_LEN];
        header[..MAGIC.len()].copy_from_slice(MAGIC);
        header[MAGIC.len()..].copy_from_slice(&tag);
        // Between header and artifact the file has a hole: it takes no disk space.
        let written = file
            .write_all(&header)
            .and_then(|()| file.write_all_at(artifact, ARTIFACT_OFFSET))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.with_context(|| format!("cannot write {}", path.display()))
    }
}

/// How old a temporary entry file must be before it counts as left behind by a `bulwark` that
/// was killed while writing it (a write takes milliseconds).
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// Removes temporary entry files (`.NAME.RANDOM.tmp`) older than [`STALE_TEMP_AGE`] from
/// `artifacts`: a `bulwark` killed mid-write leaves one behind, and nothing else would remove
/// it. Only regular files with that name shape are touched; errors are ignored.
fn remove_stale_temp_files(artifacts: &Path) {
    let Ok(entries) = std::fs::read_dir(artifacts) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(".tmp")) {
            continue;
        }
        let stale = entry.metadata().is_ok_and(|m| {
            m.file_type().is_file()
                && m.modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TEMP_AGE)
        });
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// This process's effective user id.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses a cache directory that is not a directory, belongs to another user, or that its
/// group or others may write to: whoever can write there could plant code for Bulwark to run.
pub fn check_private(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    if !meta.is_dir() {
        bail!(
            "the compile cache {} is not a directory; remove it or set BULWARK_CACHE_DIR to a directory of your own",
            path.display()
        );
    }
    let me = euid();
    if meta.uid() != me {
        bail!(
            "the compile cache {} belongs to user {}, not to you (user {me}); bulwark does not use a cache someone else controls: set BULWARK_CACHE_DIR to a directory of your own",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "the compile cache {} is writable by its group or others (mode {:o}), so they could plant code for bulwark to run; fix it with `chmod 700 {}` or set BULWARK_CACHE_DIR to a private directory",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        );
    }
    Ok(())
}

/// Reads the cache's secret key from `root`, making it first if there is none, and replacing one
/// that is damaged (every entry made with the old key is then compiled again).
fn load_key(root: &Path) -> anyhow::Result<[u8; KEY_LEN]> {
    let path = root.join(KEY_FILE);
    for _ in 0..3 {
        match read_regular_file_nofollow(&path, KEY_LEN as u64) {
            Ok(bytes) => {
                if let Ok(key) = <[u8; KEY_LEN]>::try_from(bytes.as_slice()) {
                    return Ok(key);
                }
                // Published whole (see `create_key`), so a short key is damage, not a race.
                remove_damaged_key(&path)?;
            }
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(ReadError::Io(e)) if e.raw_os_error() != Some(libc::ELOOP) => {
                return Err(e).with_context(|| {
                    format!("cannot read the compile cache key {}", path.display())
                });
            }
            Err(_) => remove_damaged_key(&path)?,
        }
        create_key(root, &path)?;
    }
    bail!(
        "the compile cache key {} keeps changing under bulwark; is another program writing to {}?",
        path.display(),
        root.display()
    )
}

/// Removes a damaged key file (gone already is fine).
fn remove_damaged_key(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "the compile cache key {} is damaged and cannot be removed; remove it by hand",
                path.display()
            )
        }),
    }
}

/// Makes a new secret key at `path`: written whole to a new 0600 file, then published with a
/// hard link, which never replaces a key another process published first (then theirs is used).
fn create_key(root: &Path, path: &Path) -> anyhow::Result<()> {
    let mut key = [0u8; KEY_LEN];
    fill_random(&mut key).context("cannot read random bytes for the compile cache key")?;
    let (tmp, mut file) = create_temp(root, KEY_FILE.as_ref(), 0o600)?;
    let published = file
        .write_all(&key)
        .and_then(|()| file.sync_all())
        .and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            // A file system without hard links: a rename may replace a key published at the
            // same moment, which only costs the other process's entries a recompile.
            Err(_) => std::fs::rename(&tmp, path),
        });
    let _ = std::fs::remove_file(&tmp);
    published.with_context(|| format!("cannot create the compile cache key {}", path.display()))
}

/// The tag of an entry: HMAC-SHA256 under the cache's key over a domain string, the cache key
/// (length first) and the artifact.
fn tag(secret: &[u8; KEY_LEN], key: &str, artifact: &[u8]) -> anyhow::Result<[u8; TAG_LEN]> {
    Ok(mac(secret, key, artifact)?.finalize().into_bytes().into())
}

/// The HMAC state of [`tag`], before finalizing.
fn mac(secret: &[u8; KEY_LEN], key: &str, artifact: &[u8]) -> anyhow::Result<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret)
        .map_err(|e| anyhow::anyhow!("cannot key the cache's HMAC: {e}"))?;
    mac.update(TAG_DOMAIN);
    mac.update(&(key.len() as u64).to_le_bytes());
    mac.update(key.as_bytes());
    mac.update(artifact);
    Ok(mac)
}

/// The artifact's length if the entry in `file` carries the right tag for `key` (compared in
/// constant time). The artifact is read in chunks with `pread`, never whole into memory; an
/// entry of the wrong size or format, or one that changes size while it is read, fails.
fn verify(secret: &[u8; KEY_LEN], key: &str, file: &File) -> Option<u64> {
    let size = file.metadata().ok()?.len();
    let len = size.checked_sub(ARTIFACT_OFFSET)?;
    if len > MAX_ARTIFACT_SIZE {
        return None;
    }
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, 0).ok()?;
    if &header[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut mac = mac(secret, key, &[]).ok()?;
    let mut chunk = vec![0u8; VERIFY_CHUNK];
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(VERIFY_CHUNK as u64)).ok()?;
        file.read_exact_at(&mut chunk[..n], ARTIFACT_OFFSET + at)
            .ok()?;
        mac.update(&chunk[..n]);
        at += n as u64;
    }
    mac.verify_slice(&header[MAGIC.len()..]).ok()?;
    Some(len)
}

/// Deletes a cache entry that must not be used. A failure is left for the next writer's rename.
fn discard(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Compiles `module` (read from `name`, for messages) in the compile worker, `bulwark compile -
/// -o - --target T [--fuel]`: the module on its standard input, the artifact from its standard
/// output.
/// The worker dies with this process, has [`compile_memory`] of address space and no core dump,
/// and is killed at `deadline`, after [`COMPILE_TIMEOUT`], or when the call is cancelled.
fn compile_in_child(
    module: &[u8],
    name: &Path,
    target: Target,
    metering: Metering,
    deadline: Instant,
    cancel: &Cancel,
) -> Result<Vec<u8>, Error> {
    let exe = std::env::current_exe().context("cannot find the bulwark executable")?;
    // Never above the hard limit this process runs under: raising it would fail.
    let memory = compile_memory(module.len()).min(hard_memory_limit());
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let mut cmd = Command::new(exe);
    cmd.args(["compile", "-", "-o", "-", "--target", target.name()]);
    if metering == Metering::Fuel {
        cmd.arg("--fuel");
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe calls (prctl, getppid, setrlimit) on its own process; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            crate::interrupt::die_with_parent(parent)?;
            for (resource, value) in [(libc::RLIMIT_AS, memory), (libc::RLIMIT_CORE, 0)] {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let (stop_at, call_deadline) = match started.checked_add(COMPILE_TIMEOUT) {
        Some(limit) if limit < deadline => (limit, false),
        _ => (deadline, true),
    };
    let mut child = cmd
        .spawn()
        .context("cannot start the compile worker (bulwark compile)")?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(anyhow::anyhow!("the compile worker has no standard streams").into());
    };
    std::thread::scope(|s| {
        // The worker reads all of its input before it writes, but its output and error can fill
        // their pipes, so all three streams move at once.
        s.spawn(move || {
            // A worker that stops early closes the pipe: its exit status tells why.
            let _ = stdin.write_all(module);
        });
        let artifact = s.spawn(move || {
            let mut artifact = Vec::new();
            stdout
                .take(MAX_ARTIFACT_SIZE + 1)
                .read_to_end(&mut artifact)
                .map(|_| artifact)
        });
        let errors = s.spawn(move || {
            let mut stderr = stderr;
            let mut text = Vec::new();
            let _ = (&mut stderr).take(MAX_WORKER_STDERR).read_to_end(&mut text);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&text).into_owned()
        });
        let status = wait_until(&mut child, stop_at, call_deadline, cancel);
        let artifact = artifact.join();
        let errors = errors.join().unwrap_or_default();
        let status = status?;
        if cancel.is_cancelled() {
            return Err(Error::Interrupted);
        }
        let artifact = match artifact {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(anyhow::Error::new(e)
                    .context("cannot read the compiled artifact from the compile worker")
                    .into());
            }
            Err(_) => {
                return Err(anyhow::anyhow!("reading the compile worker's output failed").into());
            }
        };
        if artifact.len() as u64 > MAX_ARTIFACT_SIZE {
            return Err(Error::Module(format!(
                "cannot compile {}: its compiled artifact is over the {} MiB limit",
                name.display(),
                MAX_ARTIFACT_SIZE >> 20
            )));
        }
        if status.success() && !artifact.is_empty() {
            return Ok(artifact);
        }
        Err(Error::Module(worker_failure(name, status, &errors, memory)))
    })
}

/// This process's hard address-space limit (`u64::MAX` when there is none).
fn hard_memory_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0 {
        return u64::MAX;
    }
    limit.rlim_max
}

/// Waits for the worker to end; kills it at `stop_at` or on Ctrl-C.
fn wait_until(
    child: &mut std::process::Child,
    stop_at: Instant,
    call_deadline: bool,
    cancel: &Cancel,
) -> Result<ExitStatus, Error> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow::Error::new(e)
                    .context("cannot wait for the compile worker")
                    .into());
            }
        }
        let stop = if cancel.is_cancelled() {
            Some(Error::Interrupted)
        } else if Instant::now() >= stop_at {
            Some(Error::TimedOut { call_deadline })
        } else {
            None
        };
        if let Some(e) = stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let left = stop_at.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(2)));
    }
}

/// The message for a worker that failed: its own message when it exited with one, else how it
/// died, with its address-space limit (running out of it aborts the worker).
fn worker_failure(name: &Path, status: ExitStatus, errors: &str, memory: u64) -> String {
    let last = errors
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if status.success() {
        return format!(
            "cannot compile {}: the compiler produced no artifact",
            name.display()
        );
    }
    if status.code().is_some() && !errors.trim().is_empty() {
        let text = errors.trim().trim_start_matches("bulwark: ");
        return format!("cannot compile {}: {text}", name.display());
    }
    format!(
        "cannot compile {}: the compiler process died ({status}{}); it may have run out of its {} MiB of address space, the limit for a module of this size",
        name.display(),
        if last.is_empty() {
            String::new()
        } else {
            format!(": {last}")
        },
        memory >> 20
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_metering_variant_has_its_own_engine_key_and_entry() {
        for target in [Target::Guest, Target::Host] {
            let none = engine_key_for(target, Metering::None);
            let fuel = engine_key_for(target, Metering::Fuel);
            assert_ne!(none, fuel, "{target:?}");
            assert_eq!(engine_key(target), none, "the default is unmetered");
            assert_ne!(
                entry_name("d", target, Metering::None),
                entry_name("d", target, Metering::Fuel)
            );
            assert_ne!(
                cache_key("d", target, Metering::None),
                cache_key("d", target, Metering::Fuel)
            );
        }
        assert_ne!(
            engine_key_for(Target::Guest, Metering::Fuel),
            engine_key_for(Target::Host, Metering::Fuel)
        );
    }

    #[test]
    fn temp_files_left_by_a_killed_writer_are_removed_once_stale() {
        let dir = std::env::temp_dir().join(format!("bulwark-cache-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join(".abc-def.cwasm.0123456789abcdef.tmp");
        let fresh = dir.join(".abc-def.cwasm.fedcba9876543210.tmp");
        let entry = dir.join("abc-def.cwasm");
        for f in [&old, &fresh, &entry] {
            std::fs::write(f, b"x").unwrap();
        }
        let long_ago = std::time::SystemTime::now() - 2 * STALE_TEMP_AGE;
        for f in [&old, &entry] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        remove_stale_temp_files(&dir);
        assert!(!old.exists(), "a stale temp file is removed");
        assert!(fresh.exists(), "a temp file being written is left alone");
        assert!(entry.exists(), "entries are never touched here");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_memory_limit_follows_the_module_size() {
        assert_eq!(compile_memory(0), COMPILE_MEMORY_BASE);
        assert_eq!(
            compile_memory(1 << 20),
            COMPILE_MEMORY_BASE + COMPILE_MEMORY_PER_BYTE * (1 << 20)
        );
        assert_eq!(compile_memory(256 << 20), COMPILE_MEMORY_MAX);
        assert_eq!(compile_memory(usize::MAX), COMPILE_MEMORY_MAX);
    }

    #[test]
    fn a_tag_binds_the_artifact_to_its_key() {
        let secret = [7u8; KEY_LEN];
        let dir = std::env::temp_dir().join(format!("bulwark-tag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |bytes: &[u8]| {
            let path = dir.join("entry");
            std::fs::write(&path, bytes).unwrap();
            File::open(&path).unwrap()
        };
        let entry = |key: &str, artifact: &[u8]| {
            let mut e = vec![0u8; ARTIFACT_OFFSET_BYTES];
            e[..MAGIC.len()].copy_from_slice(MAGIC);
            e[MAGIC.len()..HEADER_LEN].copy_from_slice(&tag(&secret, key, artifact).unwrap());
            e.extend_from_slice(artifact);
            e
        };
        // Longer than one verify chunk, so the chunked read is covered.
        let artifact: Vec<u8> = (0..=250u8).cycle().take(VERIFY_CHUNK + 77).collect();
        let good = entry("a e guest", &artifact);
        let n = artifact.len() as u64;
        assert_eq!(verify(&secret, "a e guest", &file(&good)), Some(n));
        let opened = Entry {
            file: file(&good),
            offset: ARTIFACT_OFFSET,
            len: n,
        };
        assert_eq!(opened.read().unwrap(), artifact);
        assert_eq!(
            verify(&secret, "b e guest", &file(&good)),
            None,
            "another module's key"
        );
        assert_eq!(
            verify(&secret, "a e host", &file(&good)),
            None,
            "another target"
        );
        assert_eq!(
            verify(&[8u8; KEY_LEN], "a e guest", &file(&good)),
            None,
            "another secret"
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            verify(&secret, "a e guest", &file(&flipped)),
            None,
            "a flipped byte"
        );
        assert_eq!(
            verify(&secret, "a e guest", &file(&good[..good.len() - 1])),
            None,
            "truncated"
        );
        let mut old = good.clone();
        old[..MAGIC.len()].copy_from_slice(b"BWKCWv1\n");
        assert_eq!(
            verify(&secret, "a e guest", &file(&old)),
            None,
            "old format"
        );
        assert_eq!(
            verify(&secret, "a e guest", &file(&good[..HEADER_LEN])),
            None,
            "header only"
        );
        assert_eq!(verify(&secret, "a e guest", &file(b"")), None, "empty");
        // An empty artifact is not an entry the compiler makes, but its tag still binds.
        let empty = entry("a e guest", b"");
        assert_eq!(verify(&secret, "a e guest", &file(&empty)), Some(0));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
