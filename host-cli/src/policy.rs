//! Policy files for `bulwark run --policy` and `bulwark verify --policy`: which public keys are
//! trusted and which module digests are pinned.
//!
//! The format is a small line format (see [`SYNTAX`]), parsed strictly: an unknown directive or
//! a malformed value is an error naming the file and line, never silently ignored. This module
//! only reads text; turning key bytes into keys is `sign`'s job.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// Largest policy file read, in bytes.
pub const MAX_POLICY_SIZE: u64 = 1 << 20;

/// The policy file syntax, shown in `bulwark verify --help` and documented in the README.
pub const SYNTAX: &str = "\
Policy file (--policy FILE), one directive a line:
  trust PATH       trust the public key in file PATH (a relative PATH starts at the
                   policy file's directory)
  trust-key HEX    trust this public key: 66 hex digits, 01 then the 32-byte Ed25519 key,
                   as `bulwark keygen` prints it
  sha256 HEX       pin a module: the SHA-256 of the module file (64 hex digits, what
                   `sha256sum` and `bulwark verify` print)
  # text           a comment, on its own line or after a value (following a space)
A module passes when it is signed by one of the trusted keys (if any key is trusted, by the
policy or --trust) and its SHA-256 is one of the pinned ones (if the policy pins any). Any
other line is an error. Signing a module changes its SHA-256: pin the signed file.";

/// Where a trusted key in a policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `trust PATH`: a public key file (already resolved against the policy's directory).
    File(PathBuf),
    /// `trust-key HEX`: the key's serialized bytes (0x01 then 32 bytes).
    Inline(Vec<u8>),
}

/// One trusted key of a policy, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Line number in the policy file, from 1.
    pub line: usize,
    /// The key file or the key itself.
    pub source: KeySource,
}

/// A parsed policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Trusted public keys, in file order.
    pub keys: Vec<KeyEntry>,
    /// Pinned module SHA-256 digests, in file order, without duplicates.
    pub pins: Vec<[u8; 32]>,
}

/// Reads and parses the policy file at `path`. A policy that trusts no key and pins no module
/// is refused: it would allow everything.
pub fn load(path: &Path) -> anyhow::Result<Policy> {
    // Opened once and read with a cap: a FIFO or a device is refused instead of blocking.
    let bytes = crate::compile::read_regular_file(path, MAX_POLICY_SIZE)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("policy file {} is not UTF-8 text", path.display()))?;
    let base = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let policy = parse(&text, base).map_err(|e| {
        anyhow::anyhow!(
            "policy file {} {e}\n(see `bulwark verify --help` for the syntax)",
            path.display()
        )
    })?;
    if policy.keys.is_empty() && policy.pins.is_empty() {
        bail!(
            "policy file {} trusts no key and pins no module, so it would allow anything: add a `trust PATH`, `trust-key HEX` or `sha256 HEX` line",
            path.display()
        );
    }
    Ok(policy)
}

/// Parses policy text; relative `trust` paths are joined to `base`. Errors start with
/// `line N:`.
pub fn parse(text: &str, base: &Path) -> Result<Policy, String> {
    let mut policy = Policy::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = strip_comment(raw).trim();
        if content.is_empty() {
            continue;
        }
        let (word, rest) = content
            .split_once(char::is_whitespace)
            .map_or((content, ""), |(w, r)| (w, r.trim()));
        match word {
            "trust" => {
                if rest.is_empty() {
                    return Err(format!(
                        "line {line}: `trust` needs the path of a public key file"
                    ));
                }
                policy.keys.push(KeyEntry {
                    line,
                    source: KeySource::File(base.join(rest)),
                });
            }
            "trust-key" => {
                let key = one_value(line, word, rest)?;
                let bytes = match parse_hex(key) {
                    Some(b) if b.len() == 33 && b[0] == 0x01 => b,
                    _ => {
                        return Err(format!(
                            "line {line}: `{key}` is not a public key: `trust-key` takes 66 hex digits, 01 then the 32-byte Ed25519 key, as `bulwark keygen` prints it"
                        ));
                    }
                };
                policy.keys.push(KeyEntry {
                    line,
                    source: KeySource::Inline(bytes),
                });
            }
            "sha256" => {
                let digest = one_value(line, word, rest)?;
                let pin: [u8; 32] = parse_hex(digest)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        format!(
                            "line {line}: `{digest}` is not a SHA-256 digest (64 hex digits, as `sha256sum` prints it)"
                        )
                    })?;
                if !policy.pins.contains(&pin) {
                    policy.pins.push(pin);
                }
            }
            _ => {
                let hint = if parse_hex(word).is_some_and(|b| b.len() == 32) {
                    " (to pin a digest, write `sha256 HEX`)"
                } else {
                    ""
                };
                return Err(format!(
                    "line {line}: unknown directive `{word}`{hint}; a line is `trust PATH`, `trust-key HEX`, `sha256 HEX` or a # comment"
                ));
            }
        }
    }
    Ok(policy)
}

/// The single value of a `trust-key` or `sha256` line; anything after it is an error.
fn one_value<'a>(line: usize, word: &str, rest: &'a str) -> Result<&'a str, String> {
    let mut parts = rest.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(value), None) => Ok(value),
        (None, _) => Err(format!("line {line}: `{word}` needs a value")),
        (Some(_), Some(extra)) => Err(format!(
            "line {line}: unexpected `{extra}` after the value of `{word}` (a comment starts with #)"
        )),
    }
}

/// `line` without its comment: `#` starts one at the start of the line or after whitespace.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Decodes hex digits (either case); `None` unless the whole string is pairs of hex digits.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const KEY: &str = "01d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn every_directive_and_comments_parse() {
        let text = format!(
            "# the team's policy\n\n  trust keys/team.pub\ntrust /etc/bulwark/ci key.pub   \ntrust-key {}  # ci\nsha256 {DIGEST} # json-rank 1.0\nsha256 {}\n",
            KEY.to_uppercase(),
            DIGEST.to_uppercase()
        );
        let p = parse(&text, Path::new("/policies")).unwrap();
        assert_eq!(
            p.keys,
            vec![
                KeyEntry {
                    line: 3,
                    source: KeySource::File("/policies/keys/team.pub".into())
                },
                KeyEntry {
                    line: 4,
                    source: KeySource::File("/etc/bulwark/ci key.pub".into())
                },
                KeyEntry {
                    line: 5,
                    source: KeySource::Inline(parse_hex(KEY).unwrap())
                },
            ]
        );
        assert_eq!(
            p.pins,
            vec![<[u8; 32]>::try_from(parse_hex(DIGEST).unwrap()).unwrap()],
            "the same digest twice is one pin"
        );
        // A `#` inside a word is not a comment.
        let p = parse("trust a#b.pub", Path::new("")).unwrap();
        assert_eq!(p.keys[0].source, KeySource::File("a#b.pub".into()));
    }

    #[test]
    fn anything_unknown_or_malformed_is_an_error_with_its_line() {
        let cases = [
            ("trusted k.pub", "line 1: unknown directive `trusted`"),
            ("\n[keys]", "line 2: unknown directive `[keys]`"),
            (DIGEST, "write `sha256 HEX`"),
            ("trust", "line 1: `trust` needs the path"),
            ("sha256", "line 1: `sha256` needs a value"),
            ("sha256 abc", "is not a SHA-256 digest"),
            (&format!("sha256 {DIGEST}00"), "is not a SHA-256 digest"),
            (
                &format!("sha256 {DIGEST} tool.wasm"),
                "unexpected `tool.wasm`",
            ),
            ("trust-key 02ab", "is not a public key"),
            (&format!("trust-key {DIGEST}"), "is not a public key"),
            (&format!("trust-key 81{}", &KEY[2..]), "is not a public key"),
        ];
        for (text, want) in cases {
            let e = parse(text, Path::new(".")).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn files_name_themselves_and_an_empty_policy_is_refused() {
        let dir = std::env::temp_dir().join(format!("bulwark-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy");
        std::fs::write(&path, "# nothing\n").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains("trusts no key and pins no module"), "{e}");
        std::fs::write(&path, "pin abc\n").unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("line 1: unknown directive `pin`"), "{e}");
        std::fs::write(&path, "trust team.pub\n").unwrap();
        assert_eq!(
            load(&path).unwrap().keys[0].source,
            KeySource::File(dir.join("team.pub"))
        );
        std::fs::write(&path, b"sha256 \xff\n").unwrap();
        assert!(format!("{:#}", load(&path).unwrap_err()).contains("not UTF-8"));
        let e = format!("{:#}", load(&dir.join("missing")).unwrap_err());
        assert!(e.contains("cannot read policy file"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn hex_is_strict() {
        assert_eq!(parse_hex("00fFa0"), Some(vec![0, 255, 160]));
        assert_eq!(parse_hex(""), None);
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex("+1"), None);
        assert_eq!(parse_hex("é1"), None);
    }
}
