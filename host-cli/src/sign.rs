//! Signed modules: `bulwark keygen`, `bulwark sign`, `bulwark verify`, and the check that
//! `bulwark run --trust/--policy` makes before anything is compiled.
//!
//! The format is the WebAssembly tool-conventions signature format (`Signatures.md`), through
//! its reference implementation, the `wasmsign2` crate, so modules and keys interoperate with
//! the `wasmsign2` tool:
//! - A signed module starts with a custom section named `signature` holding Ed25519 signatures
//!   over `"wasmsig" ‖ 0x01 ‖ 0x01 ‖ 0x01 ‖ SHA-256(every byte after that section)`. A module
//!   can carry signatures by several keys.
//! - A public key file is the format's serialization, `0x01` then the 32-byte key (33 bytes); a
//!   secret key file is `0x81`, the 32-byte seed, then the public key (65 bytes). PEM and DER
//!   Ed25519 keys are read too, and a public key file may hold the 66 hex digits `bulwark
//!   keygen` prints.
//! - Verification is the format's algorithm for an entire module: a signed set of hashes must
//!   match the module's parts one for one, so a signature over only part of a module (the
//!   format's partial signatures), or a module cut short or extended after signing, does not
//!   pass. (`wasmsign2`'s own `verify` is laxer; see [`check_signature`].)
//!
//! Pinned digests are the SHA-256 of the module file as it is on disk (what `sha256sum`
//! prints), the same digest the compile cache uses.

use std::fs::OpenOptions;
use std::io::{Cursor, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use wasmsign2::{PublicKey, SecretKey, WSError};

use crate::cli::{KeygenArgs, SignArgs, VerifyArgs};
use crate::compile::{hex, read_module, sha256};
use crate::policy::{self, KeySource};
use crate::run::code;

/// Largest key file read, in bytes (keys are under 200 bytes in every accepted encoding).
const MAX_KEY_FILE: u64 = 64 << 10;

/// The message an Ed25519 signature in the format covers, before the hashes: the domain,
/// specification version, content type (module) and hash function (SHA-256).
const SIGNED_PREFIX: &[u8] = b"wasmsig\x01\x01\x01";

/// A public key Bulwark trusts, with where it came from.
pub struct TrustedKey {
    /// Where the key came from, for messages: a file, or a policy line.
    pub label: String,
    /// The key.
    pub key: PublicKey,
}

/// What a module must satisfy under `--trust` and `--policy`.
pub struct Trust {
    /// Trusted keys, without duplicates: when there are any, a module must be signed by one.
    pub keys: Vec<TrustedKey>,
    /// Pinned SHA-256 digests: when there are any, a module's digest must be one of them.
    pub pins: Vec<[u8; 32]>,
    /// The policy file, if one was given.
    pub policy: Option<PathBuf>,
    /// Whether keys came from `--trust`.
    pub from_flags: bool,
}

impl Trust {
    /// Loads the keys named by `--trust` and the policy file; `None` when neither was given.
    pub fn load(trust: &[PathBuf], policy: Option<&Path>) -> anyhow::Result<Option<Self>> {
        if trust.is_empty() && policy.is_none() {
            return Ok(None);
        }
        let mut this = Trust {
            keys: Vec::new(),
            pins: Vec::new(),
            policy: policy.map(Path::to_path_buf),
            from_flags: !trust.is_empty(),
        };
        for path in trust {
            let key = read_public_key(path).context("--trust")?;
            this.add(path.display().to_string(), key);
        }
        if let Some(path) = policy {
            let parsed = policy::load(path)?;
            for entry in parsed.keys {
                let (label, key) = match &entry.source {
                    KeySource::File(file) => (
                        file.display().to_string(),
                        read_public_key(file).with_context(|| {
                            format!("policy file {} line {}", path.display(), entry.line)
                        })?,
                    ),
                    KeySource::Inline(bytes) => (
                        format!("trust-key on line {} of {}", entry.line, path.display()),
                        PublicKey::from_bytes(bytes).map_err(|e| {
                            anyhow::anyhow!(
                                "policy file {} line {}: not an Ed25519 public key ({e})",
                                path.display(),
                                entry.line
                            )
                        })?,
                    ),
                };
                this.add(label, key);
            }
            this.pins = parsed.pins;
        }
        Ok(Some(this))
    }

    /// Adds a key unless the same key is already trusted.
    fn add(&mut self, label: String, key: PublicKey) {
        if !self.keys.iter().any(|k| k.key.pk == key.pk) {
            self.keys.push(TrustedKey { label, key });
        }
    }

    /// Names what asked for the check: `--trust`, `policy FILE`, or both.
    fn source(&self) -> String {
        match (&self.policy, self.from_flags) {
            (None, _) => "--trust".to_owned(),
            (Some(p), false) => format!("policy {}", p.display()),
            (Some(p), true) => format!("--trust and policy {}", p.display()),
        }
    }
}

/// A module that passed the check.
#[derive(Debug)]
pub struct Passed {
    /// The trusted keys whose signatures verified: (label, key id in hex).
    pub signers: Vec<(String, String)>,
    /// Whether the module's SHA-256 was checked against pins (the policy pins digests).
    pub pinned: bool,
}

/// Why a module was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// WebAssembly text: it has no sections, so it cannot carry a signature.
    Text,
    /// Not a WebAssembly binary at all.
    NotWasm,
    /// No `signature` section at the start.
    Unsigned,
    /// The signature section or the module's section framing cannot be parsed.
    Malformed(String),
    /// Signed, but no signature is by a trusted key. The signatures' key ids, `none` for a
    /// signature without one.
    UntrustedSigners(Vec<String>),
    /// A trusted key signed it, but the signed hash no longer matches: the module changed after
    /// signing (or the signature covers only part of it). The labels of those keys.
    Changed(Vec<String>),
    /// Its SHA-256 is not among the pinned ones.
    NotPinned([u8; 32]),
}

impl Refused {
    /// What failed and what to do, for a module at `path` checked against `trust`: a clause
    /// about "it" (the module), to follow `refused PATH: `.
    pub fn describe(&self, path: &Path, trust: &Trust) -> String {
        let p = path.display();
        let source = trust.source();
        match self {
            Refused::Text => format!(
                "it is WebAssembly text (.wat), which cannot carry a signature section, and {source} requires a signature: convert it to a binary module (for example `wasm-tools parse {p} -o tool.wasm`), sign that with `bulwark sign`, and run the signed .wasm"
            ),
            Refused::NotWasm => format!(
                "it is not a WebAssembly binary module (it does not start with \\0asm), so it cannot carry the signature {source} requires"
            ),
            Refused::Unsigned => format!(
                "it is not signed (it does not start with a `signature` section), and {source} requires a signature by a trusted key: sign it with `bulwark sign {p} --secret-key SECRET_KEY -o SIGNED.wasm` and run the signed copy"
            ),
            Refused::Malformed(e) => format!(
                "its signature cannot be read ({e}): the module or its signature section is damaged, or in a format version Bulwark does not know; have it signed again"
            ),
            Refused::UntrustedSigners(ids) => format!(
                "it is signed, but not by a trusted key: its {} signature(s) (key id {}) match none of the {} key(s) from {source}; if you trust the signer, add its public key with --trust (or a `trust` line in the policy), or have the module signed with a key you trust",
                ids.len(),
                ids.join(", "),
                trust.keys.len()
            ),
            Refused::Changed(signers) => format!(
                "it was signed by the trusted key {}, but not as it is now: it changed after it was signed, or the signature covers only part of it (its contents do not match the signed SHA-256; it may have been tampered with): get an intact copy from the signer, or have it signed again",
                signers.join(", ")
            ),
            Refused::NotPinned(d) => {
                let d = hex(d);
                let policy = trust
                    .policy
                    .as_ref()
                    .map_or_else(|| "the policy".to_owned(), |p| p.display().to_string());
                format!(
                    "its SHA-256 {d} is not pinned in policy {policy}: if you trust this exact module, add the line `sha256 {d}` to {policy}"
                )
            }
        }
    }
}

/// Checks `module` (the file's bytes) against `trust`: a signature by a trusted key when any
/// key is trusted, then a pinned digest when digests are pinned.
pub fn check(module: &[u8], trust: &Trust) -> Result<Passed, Refused> {
    let signers = if trust.keys.is_empty() {
        Vec::new()
    } else {
        check_signature(module, trust)?
    };
    let pinned = !trust.pins.is_empty();
    // Hashed only when pins ask for it: a large module costs about 3 ms per MiB.
    if pinned {
        let digest = sha256(module);
        if !trust.pins.contains(&digest) {
            return Err(Refused::NotPinned(digest));
        }
    }
    Ok(Passed { signers, pinned })
}

/// Most signatures looked at in one module (each costs one Ed25519 check per trusted key).
const MAX_SIGNATURES: usize = 256;

/// The format's verification of an entire module (Signatures.md): a set of signed hashes
/// whose signature verifies with a trusted key must hold exactly the module's part hashes, so
/// the whole module, as it is, is what was signed. Returns the trusted keys that signed it, in
/// trust order: (label, key id).
///
/// `wasmsign2`'s `PublicKeySet::verify` only asks that the whole module's hash be one of the
/// signed hashes, so it accepts a module cut short at a `signature_delimiter` (say, without its
/// data section), which runs differently; that is why the rule is applied here.
fn check_signature(module: &[u8], trust: &Trust) -> Result<Vec<(String, String)>, Refused> {
    if !module.starts_with(b"\0asm") {
        return Err(if looks_like_text(module) {
            Refused::Text
        } else {
            Refused::NotWasm
        });
    }
    let signed = parse_signed(module)?;
    let total: usize = signed
        .data
        .signed_hashes_set
        .iter()
        .map(|s| s.signatures.len())
        .sum();
    if total > MAX_SIGNATURES {
        return Err(Refused::Malformed(format!(
            "{total} signatures, more than the {MAX_SIGNATURES} Bulwark checks"
        )));
    }
    let mut ids = Vec::new();
    // Per trusted key: a valid signature on some hash set; on the set that is this module.
    let mut signed_any = vec![false; trust.keys.len()];
    let mut signed_whole = vec![false; trust.keys.len()];
    for set in &signed.data.signed_hashes_set {
        let whole = signed.parts.as_ref().is_ok_and(|parts| {
            set.hashes.len() == parts.len()
                && set.hashes.iter().zip(parts).all(|(h, p)| h.as_slice() == p)
        });
        let mut msg = SIGNED_PREFIX.to_vec();
        for h in &set.hashes {
            msg.extend_from_slice(h);
        }
        for sig in &set.signatures {
            ids.push(sig.key_id.as_deref().map_or_else(|| "none".to_owned(), hex));
            // (wasmsign2 keeps only Ed25519 signatures when it parses the section.)
            let Ok(sig) = ed25519_compact::Signature::from_slice(&sig.signature) else {
                continue;
            };
            for (i, k) in trust.keys.iter().enumerate() {
                if k.key.pk.verify(&msg, &sig).is_ok() {
                    signed_any[i] = true;
                    signed_whole[i] |= whole;
                }
            }
        }
    }
    let keys = |which: &[bool]| -> Vec<&TrustedKey> {
        trust
            .keys
            .iter()
            .zip(which)
            .filter_map(|(k, &yes)| yes.then_some(k))
            .collect()
    };
    let whole = keys(&signed_whole);
    if !whole.is_empty() {
        return Ok(whole
            .into_iter()
            .map(|k| (k.label.clone(), key_id(&k.key)))
            .collect());
    }
    let some = keys(&signed_any);
    if some.is_empty() {
        Err(Refused::UntrustedSigners(ids))
    } else {
        Err(Refused::Changed(
            some.into_iter().map(|k| k.label.clone()).collect(),
        ))
    }
}

/// A module's signature data and what its content hashes to.
struct Signed {
    /// The `signature` section's contents.
    data: wasmsign2::SignatureData,
    /// The format's rolling SHA-256 over the sections after the signature section, taken after
    /// each `signature_delimiter` section and at the end (unless the module ends with one); an
    /// error when those sections' framing is broken.
    parts: Result<Vec<[u8; 32]>, String>,
}

/// Reads the signature section (the first section) and hashes the rest, from the raw bytes.
fn parse_signed(module: &[u8]) -> Result<Signed, Refused> {
    if module.len() < 8 {
        return Err(Refused::Malformed("the module header is cut short".into()));
    }
    let first = next_section(module, 8).map_err(Refused::Malformed)?;
    let Some((0, payload, end)) = first else {
        return Err(Refused::Unsigned);
    };
    let Some((b"signature", data)) = custom_name(&module[payload]) else {
        return Err(Refused::Unsigned);
    };
    let data = wasmsign2::SignatureData::deserialize(data)
        .map_err(|e| Refused::Malformed(format!("its signature section: {e}")))?;
    Ok(Signed {
        data,
        parts: part_hashes(module, end),
    })
}

/// The format's part hashes of the sections from `pos` on (see [`Signed::parts`]).
fn part_hashes(module: &[u8], mut pos: usize) -> Result<Vec<[u8; 32]>, String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut hashes = Vec::new();
    let mut ends_with_delimiter = false;
    while let Some((id, payload, end)) = next_section(module, pos)? {
        hasher.update(&module[pos..end]);
        ends_with_delimiter = id == 0
            && custom_name(&module[payload])
                .is_some_and(|(name, _)| name == b"signature_delimiter");
        if ends_with_delimiter {
            hashes.push(hasher.clone().finalize().into());
        }
        pos = end;
    }
    if !ends_with_delimiter {
        hashes.push(hasher.finalize().into());
    }
    Ok(hashes)
}

/// The section at `pos`: its id, the range of its payload, and where it ends; `None` at the end
/// of the module.
fn next_section(
    module: &[u8],
    pos: usize,
) -> Result<Option<(u8, std::ops::Range<usize>, usize)>, String> {
    let Some(&id) = module.get(pos) else {
        return Ok(None);
    };
    let (size, n) = read_u32(module.get(pos + 1..).unwrap_or_default())
        .ok_or_else(|| format!("the size of the section at byte {pos} is unreadable"))?;
    let start = pos + 1 + n;
    let end = start
        .checked_add(size as usize)
        .filter(|&e| e <= module.len())
        .ok_or_else(|| format!("the section at byte {pos} runs past the end of the module"))?;
    Ok(Some((id, start..end, end)))
}

/// A custom section payload's name and the bytes after it.
fn custom_name(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, n) = read_u32(payload)?;
    let rest = payload.get(n..)?;
    let len = len as usize;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// An unsigned LEB128 number of at most 32 bits and the bytes it took.
fn read_u32(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v, i + 1));
        }
    }
    None
}

/// Whether bytes that are not a Wasm binary look like the text format.
fn looks_like_text(bytes: &[u8]) -> bool {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    matches!(first, Some(b'(' | b';'))
}

/// The key id `wasmsign2` derives from a public key (and stores with a signature), in hex.
pub fn key_id(key: &PublicKey) -> String {
    let with_id = key.clone().attach_default_key_id();
    with_id.key_id().map_or_else(String::new, |id| hex(id))
}

/// Reads a key file: a regular file (opened once: a FIFO or a device is refused instead of
/// blocking) of at most [`MAX_KEY_FILE`] bytes.
fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    crate::compile::read_regular_file(path, MAX_KEY_FILE).map_err(|e| match e {
        crate::compile::ReadError::TooLarge { .. } => anyhow::anyhow!(
            "{} is over {} KiB: not a key file",
            path.display(),
            MAX_KEY_FILE >> 10
        ),
        e => anyhow::Error::new(e).context(format!("cannot read key file {}", path.display())),
    })
}

/// Reads a public key file: the format's 33 bytes, the 66 hex digits `bulwark keygen` prints,
/// or PEM/DER.
pub fn read_public_key(path: &Path) -> anyhow::Result<PublicKey> {
    let bytes = read_key_file(path)?;
    parse_public_key(&bytes).with_context(|| format!("public key file {}", path.display()))
}

/// Parses public key bytes in any accepted encoding.
fn parse_public_key(bytes: &[u8]) -> anyhow::Result<PublicKey> {
    if bytes.len() == 65 && bytes[0] == 0x81 {
        bail!(
            "this is a SECRET key: trust the public key file instead (`bulwark keygen` writes both), and keep the secret key private"
        );
    }
    let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
    if let Some(raw) = policy::parse_hex(text) {
        return PublicKey::from_bytes(&raw).map_err(|e| {
            anyhow::anyhow!("hex digits that are not an Ed25519 public key (01 then 32 bytes): {e}")
        });
    }
    PublicKey::from_any(bytes).map_err(|_| {
        anyhow::anyhow!(
            "not an Ed25519 public key: expected 0x01 then the 32-byte key (33 bytes, as `bulwark keygen` and `wasmsign2 keygen` write it), its 66 hex digits, or PEM/DER"
        )
    })
}

/// Reads a secret key file and checks that its two halves belong together.
pub fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let bytes = read_key_file(path)?;
    let sk =
        parse_secret_key(&bytes).with_context(|| format!("secret key file {}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "bulwark: warning: secret key {} can be read by other users (mode {:o}); `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        );
    }
    Ok(sk)
}

/// Parses secret key bytes (the format's 65 bytes, PEM or DER).
fn parse_secret_key(bytes: &[u8]) -> anyhow::Result<SecretKey> {
    if bytes.len() == 33 && bytes[0] == 0x01 {
        bail!("this is a public key: signing needs the secret key file");
    }
    let sk = SecretKey::from_any(bytes).map_err(|_| {
        anyhow::anyhow!(
            "not an Ed25519 secret key: expected 0x81, the 32-byte seed and the 32-byte public key (65 bytes, as `bulwark keygen` and `wasmsign2 keygen` write it), or PEM/DER"
        )
    })?;
    sk.sk
        .validate_public_key(&sk.sk.public_key())
        .map_err(|_| {
            anyhow::anyhow!("the key is damaged: its public half does not match its seed")
        })?;
    Ok(sk)
}

/// The public key of a secret key.
fn public_of(sk: &SecretKey) -> PublicKey {
    PublicKey {
        pk: sk.sk.public_key(),
        key_id: None,
    }
}

/// `bulwark run --trust/--policy` refused the call: the exit code and what to say.
pub struct Refusal {
    /// `run::code::REFUSED` for a refused module, `run::code::BULWARK` for unreadable keys or
    /// policy.
    pub code: u8,
    /// What failed and what to do.
    pub error: anyhow::Error,
}

/// The check `bulwark run` makes right after reading the module, before compiling it. Without
/// `--trust` and `--policy` every module passes.
pub fn check_run(
    path: &Path,
    trust: &[PathBuf],
    policy: Option<&Path>,
    module: &[u8],
) -> Result<(), Refusal> {
    let trust = match Trust::load(trust, policy) {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(()),
        Err(error) => {
            return Err(Refusal {
                code: code::BULWARK,
                error,
            });
        }
    };
    check(module, &trust).map(drop).map_err(|r| Refusal {
        code: code::REFUSED,
        error: anyhow::anyhow!(
            "refused {} (nothing was compiled or run): {}",
            path.display(),
            r.describe(path, &trust)
        ),
    })
}

/// Creates `path` with `mode`, failing if it exists, and writes `bytes` to it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists; keys are never overwritten: choose another name or remove it",
                    path.display()
                )
            } else {
                format!("cannot create {}", path.display())
            }
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs `bulwark keygen`.
pub fn keygen(args: &KeygenArgs) -> anyhow::Result<()> {
    if args.secret_key == args.public_key {
        bail!("--secret-key and --public-key must be different files");
    }
    for path in [&args.secret_key, &args.public_key] {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; keys are never overwritten: choose another name or remove it",
                path.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    crate::compile::fill_random(&mut seed).context("cannot read /dev/urandom for a new key")?;
    let pair = ed25519_compact::KeyPair::try_from_seed(ed25519_compact::Seed::new(seed))
        .context("the random seed was all zeros; run keygen again")?;
    let sk = SecretKey { sk: pair.sk };
    let pk = public_of(&sk);
    write_new(&args.secret_key, &sk.to_bytes(), 0o600)?;
    if let Err(e) = write_new(&args.public_key, &pk.to_bytes(), 0o644) {
        // No secret key without its public key.
        let _ = std::fs::remove_file(&args.secret_key);
        return Err(e);
    }
    let (id, pk_hex) = (key_id(&pk), hex(&pk.to_bytes()));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "secret_key": args.secret_key.display().to_string(),
                "public_key": args.public_key.display().to_string(),
                "key_id": id,
                "public_key_hex": pk_hex,
            })
        );
    } else {
        println!(
            "wrote secret key {} (mode 0600: keep it private) and public key {}\nkey id {id}\npublic key {pk_hex}\n(in a policy file: `trust {}` or `trust-key {pk_hex}`)",
            args.secret_key.display(),
            args.public_key.display(),
            args.public_key.display(),
        );
    }
    Ok(())
}

/// Signs `module` (a Wasm binary) with `sk`; an existing signature section keeps its other
/// signatures. Returns the signed module's bytes.
pub fn sign_bytes(module: &[u8], sk: &SecretKey) -> anyhow::Result<Vec<u8>> {
    let parsed = wasmsign2::Module::deserialize(&mut Cursor::new(module))
        .map_err(|e| anyhow::anyhow!("its sections cannot be read ({e}): is it WebAssembly?"))?;
    let pk = public_of(sk).attach_default_key_id();
    let (signed, _) = sk
        .sign_multi(parsed, pk.key_id(), false, false)
        .map_err(|e| match e {
            WSError::DuplicateSignature => anyhow::anyhow!("it is already signed with this key"),
            e => anyhow::anyhow!("{e}"),
        })?;
    let mut out = Vec::with_capacity(module.len() + 256);
    signed
        .serialize(&mut out)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The signed copy must verify with the key before anyone relies on it.
    pk.verify(&mut Cursor::new(&out), None)
        .map_err(|e| anyhow::anyhow!("the signed copy does not verify ({e})"))?;
    Ok(out)
}

/// Runs `bulwark sign`.
pub fn sign(args: &SignArgs) -> anyhow::Result<()> {
    let sk = read_secret_key(&args.secret_key)?;
    let module = read_module(&args.module)?;
    if !module.starts_with(b"\0asm") {
        if looks_like_text(&module) {
            bail!(
                "cannot sign {}: it is WebAssembly text (.wat), which cannot carry a signature section; convert it to a binary module first (for example `wasm-tools parse {} -o tool.wasm`) and sign that",
                args.module.display(),
                args.module.display()
            );
        }
        bail!(
            "cannot sign {}: it is not a WebAssembly binary module (it does not start with \\0asm)",
            args.module.display()
        );
    }
    let signed = sign_bytes(&module, &sk)
        .with_context(|| format!("cannot sign {}", args.module.display()))?;
    crate::compile::write_atomically(&args.output, &signed)?;
    let pk = public_of(&sk);
    let (id, digest) = (key_id(&pk), hex(&sha256(&signed)));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "module": args.module.display().to_string(),
                "output": args.output.display().to_string(),
                "key_id": id,
                "public_key_hex": hex(&pk.to_bytes()),
                "sha256": digest,
            })
        );
    } else {
        println!(
            "signed {} with key id {id} -> {} (sha256 {digest})",
            args.module.display(),
            args.output.display()
        );
    }
    Ok(())
}

/// Runs `bulwark verify`: exit 0 when the module passes, `run::code::REFUSED` when it is
/// refused, 1 when keys, policy or module cannot be read.
pub fn verify(args: &VerifyArgs) -> ExitCode {
    let loaded = Trust::load(&args.trust, args.policy.as_deref()).and_then(|t| {
        let t = t.context("give --trust PUBLIC_KEY or --policy FILE")?;
        let module = read_module(&args.module)?;
        Ok((t, module))
    });
    let (trust, module) = match loaded {
        Ok(x) => x,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": format!("{e:#}") })
                );
            } else {
                eprintln!("bulwark: {e:#}");
            }
            return ExitCode::FAILURE;
        }
    };
    let signatures: usize = parse_signed(&module).map_or(0, |s| {
        s.data
            .signed_hashes_set
            .iter()
            .map(|h| h.signatures.len())
            .sum()
    });
    let m = args.module.display();
    match check(&module, &trust) {
        Ok(passed) => {
            let digest = hex(&sha256(&module));
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": true,
                        "module": m.to_string(),
                        "sha256": digest,
                        "pinned": passed.pinned,
                        "signatures": signatures,
                        "verified_by": passed.signers.iter().map(|(label, id)| {
                            serde_json::json!({ "key": label, "key_id": id })
                        }).collect::<Vec<_>>(),
                    })
                );
            } else {
                for (label, id) in &passed.signers {
                    println!("{m}: signature OK, verified by {label} (key id {id})");
                }
                let pinned = if passed.pinned {
                    format!(
                        ", pinned in policy {}",
                        trust
                            .policy
                            .as_ref()
                            .map_or_else(String::new, |p| p.display().to_string())
                    )
                } else {
                    String::new()
                };
                println!("{m}: sha256 {digest}{pinned}");
            }
            ExitCode::SUCCESS
        }
        Err(refused) => {
            let msg = format!("refused {m}: {}", refused.describe(&args.module, &trust));
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": false,
                        "module": m.to_string(),
                        "sha256": hex(&sha256(&module)),
                        "signatures": signatures,
                        "error": msg,
                    })
                );
            } else {
                eprintln!("bulwark: {msg}");
            }
            ExitCode::from(code::REFUSED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// A small valid module: one type, one function that returns, exported as `_start`.
    fn module() -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type () -> ()
        m.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]); // one function of type 0
        m.extend_from_slice(&[0x07, 0x0a, 0x01, 0x06]); // export "_start" func 0
        m.extend_from_slice(b"_start");
        m.extend_from_slice(&[0x00, 0x00]);
        m.extend_from_slice(&[0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]); // body: end
        m
    }

    fn key(n: u8) -> SecretKey {
        let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([n; 32]));
        SecretKey { sk: pair.sk }
    }

    fn trust(keys: &[&SecretKey], pins: &[[u8; 32]]) -> Trust {
        let mut t = Trust {
            keys: Vec::new(),
            pins: pins.to_vec(),
            policy: None,
            from_flags: true,
        };
        for (i, k) in keys.iter().enumerate() {
            t.add(format!("key{i}.pub"), public_of(k));
        }
        t
    }

    #[test]
    fn a_signed_module_passes_and_names_its_signer() {
        let signed = sign_bytes(&module(), &key(1)).unwrap();
        let passed = check(&signed, &trust(&[&key(2), &key(1)], &[])).unwrap();
        assert_eq!(
            passed.signers,
            vec![("key1.pub".to_owned(), key_id(&public_of(&key(1))))]
        );
        assert!(!passed.pinned);
    }

    #[test]
    fn the_signature_section_is_the_tool_conventions_format() {
        let original = module();
        let signed = sign_bytes(&original, &key(1)).unwrap();
        // Section 0, then its size, then the name "signature".
        assert_eq!(&signed[..8], &original[..8]);
        assert_eq!(signed[8], 0, "a custom section comes first");
        let (size, n) = leb(&signed[9..]);
        let section = &signed[9 + n..9 + n + size];
        let rest = &signed[9 + n + size..];
        assert_eq!(
            rest,
            &original[8..],
            "the module itself is unchanged after it"
        );
        assert_eq!(&section[..10], b"\x09signature");
        let data = &section[10..];
        // version 1, content type 1 (module), hash 1 (SHA-256), one set of hashes.
        assert_eq!(&data[..4], &[1, 1, 1, 1]);
        let (set_len, n) = leb(&data[4..]);
        let set = &data[4 + n..4 + n + set_len];
        assert_eq!(set[0], 1, "one hash");
        let hash: [u8; 32] = sha2::Sha256::digest(rest).into();
        assert_eq!(
            &set[1..33],
            &hash,
            "the hash covers every byte after the section"
        );
        assert_eq!(set[33], 1, "one signature");
        let (sig_len, n) = leb(&set[34..]);
        let sig = &set[34 + n..34 + n + sig_len];
        let id = key_id(&public_of(&key(1)));
        assert_eq!(sig[0] as usize, 12, "key id length");
        assert_eq!(hex(&sig[1..13]), id);
        assert_eq!(sig[13], 1, "Ed25519");
        assert_eq!(sig[14], 64, "signature length");
        let mut msg = b"wasmsig\x01\x01\x01".to_vec();
        msg.extend_from_slice(&hash);
        let s = ed25519_compact::Signature::from_slice(&sig[15..79]).unwrap();
        public_of(&key(1)).pk.verify(&msg, &s).unwrap();
        assert_eq!(34 + n + sig_len, set.len(), "nothing else in the set");
    }

    fn leb(b: &[u8]) -> (usize, usize) {
        let (mut v, mut shift) = (0usize, 0);
        for (i, byte) in b.iter().enumerate() {
            v |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return (v, i + 1);
            }
            shift += 7;
        }
        panic!("unterminated LEB128");
    }

    /// `signed` with a custom section appended is refused as changed since key0 signed it.
    fn assert_extended_is_changed(signed: &[u8], t: &Trust) {
        let longer = [signed, &[0x00, 0x02, 0x01, b'x']].concat();
        assert_eq!(
            check(&longer, t).unwrap_err(),
            Refused::Changed(vec!["key0.pub".into()])
        );
    }

    #[test]
    fn every_byte_of_the_module_is_covered() {
        let signed = sign_bytes(&module(), &key(1)).unwrap();
        let sig_end = signed.len() - (module().len() - 8);
        let t = trust(&[&key(1)], &[]);
        for i in sig_end..signed.len() {
            let mut bad = signed.clone();
            bad[i] ^= 0x01;
            match check(&bad, &t) {
                Err(Refused::Changed(who)) => assert_eq!(who, vec!["key0.pub".to_owned()]),
                other => panic!("byte {i} flipped: {other:?}"),
            }
        }
        // Appending a section after signing is a change too.
        assert_extended_is_changed(&signed, &t);
    }

    #[test]
    fn unknown_keys_unsigned_text_and_garbage_are_refused() {
        let signed = sign_bytes(&module(), &key(1)).unwrap();
        let t = trust(&[&key(2)], &[]);
        let id = key_id(&public_of(&key(1)));
        assert_eq!(
            check(&signed, &t).unwrap_err(),
            Refused::UntrustedSigners(vec![id.clone()])
        );
        let msg = Refused::UntrustedSigners(vec![id.clone()]).describe(Path::new("t.wasm"), &t);
        assert!(msg.contains(&id) && msg.contains("--trust"), "{msg}");
        assert_eq!(check(&module(), &t).unwrap_err(), Refused::Unsigned);
        assert_eq!(
            check(b"  ;; text\n(module)", &t).unwrap_err(),
            Refused::Text
        );
        assert_eq!(check(b"\x7fELF", &t).unwrap_err(), Refused::NotWasm);
        assert_eq!(
            check(b"\0asm\x01\0\0\0", &t).unwrap_err(),
            Refused::Unsigned,
            "no sections at all"
        );
        // A signature section that is not first does not count.
        let mut late = module();
        late.extend_from_slice(&signed[8..signed.len() - (module().len() - 8)]);
        assert_eq!(check(&late, &t).unwrap_err(), Refused::Unsigned);
        // Damaged signature data.
        let mut bad = signed.clone();
        let (_, n) = leb(&signed[9..]);
        assert_eq!(&signed[9 + n..9 + n + 10], b"\x09signature");
        bad[9 + n + 10] = 9; // the specification version
        assert!(matches!(
            check(&bad, &t).unwrap_err(),
            Refused::Malformed(_)
        ));
    }

    /// `module()` with a `signature_delimiter` section before its export section.
    fn module_with_delimiter() -> Vec<u8> {
        let m = module();
        let at = m.windows(2).position(|w| w == [0x07, 0x0a]).unwrap();
        let mut delimiter = vec![0x00, 1 + 19 + 16, 19];
        delimiter.extend_from_slice(b"signature_delimiter");
        delimiter.extend_from_slice(&[7; 16]);
        [&m[..at], &delimiter[..], &m[at..]].concat()
    }

    #[test]
    fn a_module_cut_at_a_delimiter_or_extended_after_signing_is_refused() {
        let t = trust(&[&key(1)], &[]);
        let signed = sign_bytes(&module_with_delimiter(), &key(1)).unwrap();
        let data = parse_signed(&signed).unwrap().data;
        assert_eq!(
            data.signed_hashes_set[0].hashes.len(),
            2,
            "one hash per part"
        );
        check(&signed, &t).unwrap();
        // Cut after the delimiter: every byte left is signed (its hash is the first part's),
        // but it is not the module that was signed.
        let end = signed
            .windows(19)
            .position(|w| w == b"signature_delimiter")
            .unwrap()
            + 19
            + 16;
        let cut = &signed[..end];
        assert!(
            public_of(&key(1))
                .verify(&mut Cursor::new(cut), None)
                .is_ok(),
            "wasmsign2's simple verify accepts the cut module, which is why Bulwark checks parts"
        );
        assert_eq!(
            check(cut, &t).unwrap_err(),
            Refused::Changed(vec!["key0.pub".into()])
        );
        // Sections added after signing, even after a delimiter, are not signed.
        assert_extended_is_changed(&signed, &t);
    }

    #[test]
    fn modules_signed_by_wasmsign2_itself_pass() {
        for m in [module(), module_with_delimiter()] {
            let parsed = wasmsign2::Module::deserialize(&mut Cursor::new(&m)).unwrap();
            // The simple API: no key id, one hash over everything after the section.
            let signed = key(3).sign(parsed, None).unwrap();
            let mut bytes = Vec::new();
            signed.serialize(&mut bytes).unwrap();
            if m == module() {
                let passed = check(&bytes, &trust(&[&key(2), &key(3)], &[])).unwrap();
                assert_eq!(passed.signers[0].0, "key1.pub");
            } else {
                // A single hash over a module with a delimiter in it does not match its two
                // parts: the format's whole-module rule refuses it.
                assert!(check(&bytes, &trust(&[&key(3)], &[])).is_err());
            }
        }
    }

    #[test]
    fn framing_is_read_with_bounds() {
        assert_eq!(
            read_u32(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Some((u32::MAX, 5))
        );
        assert_eq!(
            read_u32(&[0x80, 0x80, 0x80, 0x80, 0x10]),
            None,
            "over 32 bits"
        );
        assert_eq!(read_u32(&[0x80, 0x80]), None, "cut short");
        assert_eq!(
            read_u32(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x00]),
            None,
            "six bytes"
        );
        assert_eq!(custom_name(&[0x03, b'a', b'b']), None);
        assert_eq!(
            custom_name(&[0x01, b'a', b'b']),
            Some((&b"a"[..], &b"b"[..]))
        );
        let huge = b"\0asm\x01\0\0\0\x00\xff\xff\xff\xff\x0f";
        assert!(matches!(parse_signed(huge), Err(Refused::Malformed(_))));
        assert!(matches!(parse_signed(b"\0asm"), Err(Refused::Malformed(_))));
        // Too many signatures to check.
        let signed = sign_bytes(&module(), &key(1)).unwrap();
        let mut data = parse_signed(&signed).unwrap().data;
        let one = data.signed_hashes_set[0].signatures[0].clone();
        // (wasmsign2 refuses more than 256 in one set; the cap is on all sets together.)
        data.signed_hashes_set[0].signatures = vec![one; 200];
        data.signed_hashes_set = vec![data.signed_hashes_set[0].clone(); 2];
        let mut section = vec![0x09];
        section.extend_from_slice(b"signature");
        section.extend_from_slice(&data.serialize().unwrap());
        let mut m = b"\0asm\x01\0\0\0\x00".to_vec();
        let mut n = section.len();
        while n >= 0x80 {
            m.push(u8::try_from(n & 0x7f).unwrap() | 0x80);
            n >>= 7;
        }
        m.push(u8::try_from(n).unwrap());
        m.extend_from_slice(&section);
        m.extend_from_slice(&module()[8..]);
        let e = check(&m, &trust(&[&key(1)], &[])).unwrap_err();
        assert!(
            matches!(&e, Refused::Malformed(w) if w.contains("400 signatures")),
            "{e:?}"
        );
    }

    #[test]
    fn several_signers_and_re_signing() {
        let once = sign_bytes(&module(), &key(1)).unwrap();
        let twice = sign_bytes(&once, &key(2)).unwrap();
        for k in [key(1), key(2)] {
            check(&twice, &trust(&[&k], &[])).unwrap();
        }
        let both = check(&twice, &trust(&[&key(1), &key(2)], &[])).unwrap();
        assert_eq!(both.signers.len(), 2);
        let e = sign_bytes(&twice, &key(1)).unwrap_err().to_string();
        assert!(e.contains("already signed with this key"), "{e}");
    }

    #[test]
    fn pins_are_checked_after_the_signature() {
        let signed = sign_bytes(&module(), &key(1)).unwrap();
        let digest = sha256(&signed);
        let passed = check(&signed, &trust(&[&key(1)], &[[0; 32], digest])).unwrap();
        assert!(passed.pinned);
        assert_eq!(
            check(&signed, &trust(&[&key(1)], &[[0; 32]])).unwrap_err(),
            Refused::NotPinned(digest)
        );
        // Pins alone: no signature needed, text modules can be pinned.
        let text = b"(module)";
        check(text, &trust(&[], &[sha256(text)])).unwrap();
        let t = trust(&[], &[sha256(text)]);
        let e = check(&module(), &t).unwrap_err();
        let msg = e.describe(Path::new("m.wasm"), &t);
        assert!(
            msg.contains(&format!("sha256 {}", hex(&sha256(&module())))),
            "{msg}"
        );
    }

    #[test]
    fn key_files_are_read_strictly() {
        let sk = key(7);
        let pk = public_of(&sk);
        assert_eq!(parse_public_key(&pk.to_bytes()).unwrap().pk, pk.pk);
        let hex_text = format!("{}\n", hex(&pk.to_bytes()));
        assert_eq!(parse_public_key(hex_text.as_bytes()).unwrap().pk, pk.pk);
        assert_eq!(parse_public_key(pk.to_pem().as_bytes()).unwrap().pk, pk.pk);
        let e = format!("{:#}", parse_public_key(&sk.to_bytes()).unwrap_err());
        assert!(e.contains("SECRET key"), "{e}");
        assert!(parse_public_key(b"\x01short").is_err());
        assert!(parse_public_key(b"").is_err());
        assert_eq!(
            parse_secret_key(&sk.to_bytes()).unwrap().sk.public_key(),
            pk.pk
        );
        let e = format!("{:#}", parse_secret_key(&pk.to_bytes()).unwrap_err());
        assert!(e.contains("public key"), "{e}");
        let mut damaged = sk.to_bytes();
        damaged[40] ^= 1;
        let e = format!("{:#}", parse_secret_key(&damaged).unwrap_err());
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn keygen_never_overwrites_and_keeps_the_secret_private() {
        let dir = std::env::temp_dir().join(format!("bulwark-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let args = KeygenArgs {
            secret_key: dir.join("k.sec"),
            public_key: dir.join("k.pub"),
            json: true,
        };
        keygen(&args).unwrap();
        let mode = std::fs::metadata(&args.secret_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let sk = read_secret_key(&args.secret_key).unwrap();
        let pk = read_public_key(&args.public_key).unwrap();
        assert_eq!(sk.sk.public_key(), pk.pk);
        let before = std::fs::read(&args.secret_key).unwrap();
        let e = keygen(&args).unwrap_err().to_string();
        assert!(e.contains("never overwritten"), "{e}");
        assert_eq!(std::fs::read(&args.secret_key).unwrap(), before);
        // A new secret key next to an existing public key is not created either.
        let args2 = KeygenArgs {
            secret_key: dir.join("other.sec"),
            public_key: dir.join("k.pub"),
            json: true,
        };
        assert!(keygen(&args2).is_err());
        assert!(!args2.secret_key.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_commands_parse_and_verify_needs_a_key_or_policy() {
        use clap::{CommandFactory, Parser};
        crate::cli::Cli::command().debug_assert();
        let parse = |args: &[&str]| crate::cli::Cli::try_parse_from(args);
        assert!(parse(&["bulwark", "verify", "m.wasm"]).is_err());
        assert!(parse(&["bulwark", "verify", "m.wasm", "--policy", "p"]).is_ok());
        assert!(
            parse(&[
                "bulwark", "verify", "m.wasm", "--trust", "a", "--trust", "b"
            ])
            .is_ok()
        );
        assert!(parse(&["bulwark", "keygen", "-k", "s"]).is_err());
        assert!(parse(&["bulwark", "sign", "m.wasm", "-k", "s", "-o", "out.wasm"]).is_ok());
        // As for every `run` option: after `--` they are the tool's arguments.
        match parse(&[
            "bulwark", "run", "--trust", "a", "--policy", "p", "m.wasm", "--", "--trust", "x",
        ]) {
            Ok(crate::cli::Cli {
                command: crate::cli::Command::Run(r),
            }) => {
                assert_eq!(r.trust, vec![PathBuf::from("a")]);
                assert_eq!(r.policy, Some(PathBuf::from("p")));
                assert_eq!(r.args, vec!["--trust", "x"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trust_loads_flags_and_policy_and_drops_duplicates() {
        let dir = std::env::temp_dir().join(format!("bulwark-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pk1 = public_of(&key(1));
        std::fs::write(dir.join("one.pub"), pk1.to_bytes()).unwrap();
        let policy = dir.join("policy");
        std::fs::write(
            &policy,
            format!(
                "trust one.pub\ntrust-key {}\nsha256 {}\n",
                hex(&public_of(&key(2)).to_bytes()),
                "ab".repeat(32)
            ),
        )
        .unwrap();
        assert!(Trust::load(&[], None).unwrap().is_none());
        let t = Trust::load(&[dir.join("one.pub")], Some(&policy))
            .unwrap()
            .unwrap();
        assert_eq!(t.keys.len(), 2, "one.pub twice is one key");
        assert_eq!(t.pins, vec![[0xab; 32]]);
        assert!(t.source().contains("--trust and policy"));
        std::fs::write(&policy, "trust missing.pub\n").unwrap();
        let e = format!("{:#}", Trust::load(&[], Some(&policy)).err().unwrap());
        assert!(e.contains("line 1") && e.contains("missing.pub"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
