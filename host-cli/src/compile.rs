//! `bulwark compile`: precompiles a module with Cranelift for the guest.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::cli::{CompileArgs, Target};

/// Largest module accepted, in bytes.
pub const MAX_MODULE_SIZE: u64 = 256 << 20;

/// Compiles `wasm` (binary or text) into an artifact for `target`: the guest's engine, or
/// `--isolation wasm`'s engine on this host.
pub fn compile_bytes(wasm: &[u8], target: Target) -> anyhow::Result<Vec<u8>> {
    let config = match target {
        Target::Guest => bulwark_engine::compiler_config()
            .map_err(|e| wasmtime_error("configuring the compiler", e))?,
        Target::Host => crate::local::host_config(),
    };
    let engine = wasmtime::Engine::new(&config)
        .map_err(|e| wasmtime_error("creating the compiler engine", e))?;
    engine
        .precompile_module(wasm)
        .map_err(|e| wasmtime_error("compiling", e))
}

/// wasmtime's own error type, as an anyhow error with its whole cause chain.
fn wasmtime_error(what: &str, e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{what}: {e:?}")
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha256(bytes))
}

/// Reads a module, refusing files over [`MAX_MODULE_SIZE`] before reading them.
pub fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read module {}", path.display()))?;
    if meta.len() > MAX_MODULE_SIZE {
        bail!(
            "module {} is {} bytes, over the {MAX_MODULE_SIZE}-byte limit",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so the
/// path never holds a partial artifact.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("the output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Escapes a string for a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs `bulwark compile`.
pub fn run(args: &CompileArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let wasm = read_module(&args.input)?;
    let digest = sha256_hex(&wasm);
    let artifact = compile_bytes(&wasm, args.target).with_context(|| {
        format!(
            "cannot compile {}: is it a valid WebAssembly module?",
            args.input.display()
        )
    })?;
    write_atomically(&args.output, &artifact)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if args.json {
        println!(
            "{{\"input\":{},\"input_bytes\":{},\"sha256\":\"{digest}\",\"output\":{},\"output_bytes\":{},\"millis\":{ms:.1}}}",
            json_string(&args.input.to_string_lossy()),
            wasm.len(),
            json_string(&args.output.to_string_lossy()),
            artifact.len(),
        );
    } else {
        println!(
            "compiled {} ({} bytes, sha256 {digest}) -> {} ({} bytes) in {ms:.1} ms",
            args.input.display(),
            wasm.len(),
            args.output.display(),
            artifact.len(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (func (export "run") (result i64) i64.const 42))"#;

    #[test]
    fn compiles_to_a_reproducible_elf_artifact() {
        let a = compile_bytes(WAT.as_bytes(), Target::Guest).unwrap();
        assert_eq!(&a[..4], b"\x7fELF");
        assert_eq!(
            a,
            compile_bytes(WAT.as_bytes(), Target::Guest).unwrap(),
            "same input, same bytes"
        );
    }

    #[test]
    fn invalid_modules_and_oversized_files_are_refused() {
        assert!(compile_bytes(b"\0asm\x01\0\0\0garbage", Target::Guest).is_err());
        assert!(compile_bytes(b"\0asm\x01\0\0\0garbage", Target::Host).is_err());
        assert!(
            compile_bytes(
                b"(module (func (export \"f\") (result i32)))",
                Target::Guest
            )
            .is_err(),
            "type error"
        );
        let dir = std::env::temp_dir().join(format!("bulwark-compile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.wasm");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_MODULE_SIZE + 1)
            .unwrap();
        let e = read_module(&big).unwrap_err().to_string();
        assert!(e.contains("over the"), "{e}");
        let e = read_module(&dir.join("missing.wasm"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.wasm"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
