//! Remembered checks: a hash of a big file, computed once, reused while the file provably has
//! not changed. Hashing costs more than anything else in a cached Python call (26 MB of module,
//! 71 MB of artifact), so the compile cache remembers each result in a small record, tagged with
//! the cache's secret key (so a record cannot be forged without it) and bound to the file's
//! identity as its open descriptor reports it: device, inode, size, modification time and
//! change time.
//!
//! The change time is what makes this sound: the kernel sets it on every write, truncation or
//! rename of the file, and no unprivileged process can set it back. A record is only written for
//! a file whose change time is at least [`SETTLED`] old when the hash ends (and unchanged since
//! before it started), so a write in the same clock tick as the hashing cannot hide behind an
//! equal time stamp (git's "racy clean" problem). Any record that does not match, or does not
//! verify, is ignored and the file hashed again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// How old a file's last change must be before a hash of it is remembered: well past the
/// kernel's time-stamp granularity (a clock tick).
pub const SETTLED: Duration = Duration::from_secs(2);

/// First bytes of a record.
const MAGIC: &[u8; 8] = b"BWKMEMO1";
/// What the record's tag covers first.
const TAG_DOMAIN: &[u8] = b"bulwark remembered hash v1\0";
/// Fields of a file's identity, each a little-endian u64.
const IDENTITY_FIELDS: usize = 7;
/// Length of a record: magic, identity, value, tag.
const RECORD_LEN: usize = MAGIC.len() + IDENTITY_FIELDS * 8 + 32 + 32;

/// A file's identity as its descriptor reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity([u64; IDENTITY_FIELDS]);

impl Identity {
    /// The identity of the open `file`.
    pub fn of(file: &File) -> std::io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self([
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime().cast_unsigned(),
            m.mtime_nsec().cast_unsigned(),
            m.ctime().cast_unsigned(),
            m.ctime_nsec().cast_unsigned(),
        ]))
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.0[2]
    }

    /// Whether the file last changed at least [`SETTLED`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let changed = Duration::from_secs(self.0[5])
            .checked_add(Duration::from_nanos(self.0[6]))
            .and_then(|since| SystemTime::UNIX_EPOCH.checked_add(since));
        changed.is_some_and(|t| now.duration_since(t).is_ok_and(|age| age >= SETTLED))
    }
}

/// The records of one cache directory, under its secret key.
pub struct Memo<'a> {
    dir: PathBuf,
    secret: &'a [u8; 32],
}

impl<'a> Memo<'a> {
    /// Records in `dir` (created 0700 when first written), tagged with `secret`.
    pub fn new(dir: &Path, secret: &'a [u8; 32]) -> Self {
        Self {
            dir: dir.to_owned(),
            secret,
        }
    }

    /// The value remembered for `purpose` of the file whose identity is `id`, if a record
    /// for exactly that identity exists and verifies.
    pub fn get(&self, purpose: &str, id: &Identity) -> Option<[u8; 32]> {
        if !self.dir_is_private() {
            return None;
        }
        let path = self.dir.join(self.name(purpose, id));
        let bytes = crate::compile::read_regular_file_nofollow(&path, RECORD_LEN as u64).ok()?;
        let record: &[u8; RECORD_LEN] = bytes.as_slice().try_into().ok()?;
        let (body, tag) = record.split_at(RECORD_LEN - 32);
        if &body[..MAGIC.len()] != MAGIC || body[MAGIC.len()..MAGIC.len() + 56] != id.bytes() {
            return None;
        }
        self.mac(purpose, body).ok()?.verify_slice(tag).ok()?;
        body[MAGIC.len() + 56..].try_into().ok()
    }

    /// Remembers `value` for `purpose` of the file whose identity was `before` when hashing
    /// began and is `after` now: only if the two are equal and the file has settled. Failures
    /// are ignored (the next call hashes again).
    pub fn put(&self, purpose: &str, before: &Identity, after: &Identity, value: &[u8; 32]) {
        if before != after || !after.settled(SystemTime::now()) {
            return;
        }
        let mut body = Vec::with_capacity(RECORD_LEN);
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&after.bytes());
        body.extend_from_slice(value);
        let Ok(mac) = self.mac(purpose, &body) else {
            return;
        };
        body.extend_from_slice(&mac.finalize().into_bytes());
        let _ = self.write(&self.name(purpose, after), &body);
    }

    /// Writes a record under a new random name and renames it into place.
    fn write(&self, name: &str, record: &[u8]) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        if !self.dir_is_private() {
            anyhow::bail!("{} is not a private directory", self.dir.display());
        }
        let (tmp, mut file) = crate::compile::create_temp(&self.dir, name.as_ref(), 0o600)?;
        let done = file
            .write_all(record)
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(name)));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(done?)
    }

    /// Whether the records' directory is a directory (not a link) of ours that nobody else
    /// may write, as the cache's own directories must be; else no record is read or written.
    fn dir_is_private(&self) -> bool {
        std::fs::symlink_metadata(&self.dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == crate::cache::euid() && m.mode() & 0o022 == 0)
    }

    /// The record's file name: one per purpose, device and inode (a newer record replaces an
    /// older one for the same file).
    fn name(&self, purpose: &str, id: &Identity) -> String {
        let mut h = Sha256::new();
        h.update(purpose.as_bytes());
        h.update([0]);
        h.update(id.0[0].to_le_bytes());
        h.update(id.0[1].to_le_bytes());
        crate::compile::hex(&h.finalize()[..16])
    }

    fn mac(&self, purpose: &str, body: &[u8]) -> anyhow::Result<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret)
            .map_err(|e| anyhow::anyhow!("cannot key the memo's HMAC: {e}"))?;
        mac.update(TAG_DOMAIN);
        mac.update(&(purpose.len() as u64).to_le_bytes());
        mac.update(purpose.as_bytes());
        mac.update(body);
        Ok(mac)
    }
}

impl Identity {
    fn bytes(&self) -> [u8; IDENTITY_FIELDS * 8] {
        let mut out = [0u8; IDENTITY_FIELDS * 8];
        for (chunk, v) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bulwark-memo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An identity whose change time lies `age` in the past.
    fn aged(id: Identity, age: Duration) -> Identity {
        let t = SystemTime::now() - age;
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let mut fields = id.0;
        fields[5] = d.as_secs();
        fields[6] = u64::from(d.subsec_nanos());
        Identity(fields)
    }

    #[test]
    fn a_value_is_remembered_only_for_a_settled_unchanged_file() {
        let dir = scratch("settled");
        let path = dir.join("module");
        std::fs::write(&path, b"module bytes").unwrap();
        let id = Identity::of(&File::open(&path).unwrap()).unwrap();
        let memo = Memo::new(&dir.join("memo"), &[3; 32]);
        // Just written: not settled, nothing remembered.
        memo.put("p", &id, &id, &[1; 32]);
        assert_eq!(memo.get("p", &id), None);
        let old = aged(id, SETTLED * 2);
        let mut changed = old;
        changed.0[2] += 1;
        memo.put("p", &old, &changed, &[1; 32]);
        assert_eq!(memo.get("p", &old), None, "changed while hashed");
        memo.put("p", &old, &old, &[1; 32]);
        assert_eq!(memo.get("p", &old), Some([1; 32]));
        assert_eq!(memo.get("q", &old), None, "another purpose");
        assert_eq!(memo.get("p", &changed), None, "another identity");
        let other = Memo::new(&dir.join("memo"), &[4; 32]);
        assert_eq!(other.get("p", &old), None, "another key");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_forged_or_damaged_record_is_ignored() {
        let dir = scratch("forged");
        let memo_dir = dir.join("memo");
        let memo = Memo::new(&memo_dir, &[3; 32]);
        let id = Identity([1, 2, 3, 4, 5, 6, 7]);
        memo.put("p", &id, &id, &[9; 32]);
        assert_eq!(memo.get("p", &id), Some([9; 32]));
        let record = memo_dir.join(memo.name("p", &id));
        let mut bytes = std::fs::read(&record).unwrap();
        for at in [0, MAGIC.len() + 3, RECORD_LEN - 40, RECORD_LEN - 1] {
            bytes[at] ^= 1;
            std::fs::write(&record, &bytes).unwrap();
            assert_eq!(memo.get("p", &id), None, "byte {at} flipped");
            bytes[at] ^= 1;
        }
        std::fs::write(&record, &bytes[..RECORD_LEN - 1]).unwrap();
        assert_eq!(memo.get("p", &id), None, "short");
        std::fs::write(&record, &bytes).unwrap();
        assert_eq!(memo.get("p", &id), Some([9; 32]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
