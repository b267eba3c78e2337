//! `bulwark compile`: precompiles a module with Cranelift for the guest (or this host), and the
//! compile worker `bulwark compile - -o -` the compile cache runs. Also the one way Bulwark
//! reads a file it was given: [`read_regular_file`] (opened once, regular files only, capped).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use bulwark_engine::Metering;
use sha2::{Digest, Sha256};

use crate::cli::{CompileArgs, Target};

/// Largest module accepted, in bytes.
pub const MAX_MODULE_SIZE: u64 = 256 << 20;

/// Compiles `wasm` (binary or text) into an artifact for `target` (the guest's engine, or
/// `--isolation wasm`'s engine on this host) and `metering` (fuel instrumentation compiled in,
/// or not).
pub fn compile_bytes(wasm: &[u8], target: Target, metering: Metering) -> anyhow::Result<Vec<u8>> {
    compile_with(&compiler_engine(target, metering)?, wasm)
}

/// The compiler engine for `target` and `metering`. Creating it installs wasmtime's signal
/// handlers (the settings have signal-based traps), which the confined compile worker could not
/// do: it creates the engine before it confines itself.
fn compiler_engine(target: Target, metering: Metering) -> anyhow::Result<wasmtime::Engine> {
    let config = match target {
        Target::Guest => bulwark_engine::compiler_config(metering)
            .map_err(|e| wasmtime_error("configuring the compiler", e))?,
        Target::Host => bulwark_engine::host_config(metering),
    };
    wasmtime::Engine::new(&config).map_err(|e| wasmtime_error("creating the compiler engine", e))
}

/// Compiles `wasm` with `engine`.
fn compile_with(engine: &wasmtime::Engine, wasm: &[u8]) -> anyhow::Result<Vec<u8>> {
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

/// Why [`read_regular_file`] returned no bytes.
#[derive(Debug)]
pub enum ReadError {
    /// Opening, inspecting or reading the file failed (`NotFound` when nothing is there; with
    /// [`read_regular_file_nofollow`], a symbolic link fails to open with `ELOOP`).
    Io(std::io::Error),
    /// The path names something other than a regular file: what it is ("a FIFO (named
    /// pipe)", "a character device", "a directory", ...).
    NotRegular(&'static str),
    /// The file holds more than the limit: `len` is its size when opened, or the limit plus one
    /// when it grew while it was read.
    TooLarge {
        /// Bytes the file has (or at least has).
        len: u64,
        /// The limit.
        max: u64,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                write!(f, "it is a symbolic link, which is not followed here")
            }
            Self::Io(e) => write!(f, "{e}"),
            Self::NotRegular(what) => write!(f, "it is {what}, not a regular file"),
            Self::TooLarge { len, max } => {
                write!(f, "it is {len} bytes, over the {max}-byte limit")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// What a file type is, in words, for messages.
fn describe(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Reads the regular file at `path`, at most `max` bytes, opening it exactly once.
///
/// The file is opened with `O_RDONLY | O_NONBLOCK | O_CLOEXEC` (a FIFO with no writer opens at
/// once instead of blocking), the open descriptor is `fstat`ed, and anything but a regular file
/// (a FIFO, a device such as `/dev/zero`, a directory, a socket) is refused before a byte is
/// read. The read itself stops at `max + 1` bytes, so a file that grows after the check still
/// cannot make this read more than that.
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    read_opened(path, max, 0)
}

/// [`read_regular_file`] that also refuses a symbolic link at `path` itself (`O_NOFOLLOW`; the
/// error is `ELOOP`): for files in a directory Bulwark owns, such as the compile cache.
pub fn read_regular_file_nofollow(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    read_opened(path, max, libc::O_NOFOLLOW)
}

/// Opens `path` read-only without following a final symbolic link and checks, on the
/// descriptor, that it is a regular file (a FIFO or device is not read, and the open does not
/// block on one).
pub fn open_regular_nofollow(path: &Path) -> Result<std::fs::File, ReadError> {
    open_regular(path, libc::O_NOFOLLOW)
}

fn open_regular(path: &Path, flags: libc::c_int) -> Result<std::fs::File, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    // std adds O_CLOEXEC to every open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | flags)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(describe(meta.file_type())));
    }
    Ok(file)
}

fn read_opened(path: &Path, max: u64, flags: libc::c_int) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let file = open_regular(path, flags)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if meta.len() > max {
        return Err(ReadError::TooLarge {
            len: meta.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge {
            len: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// A module file, opened once: a regular file (FIFOs, devices and directories are refused
/// without reading them), read later through this descriptor only.
pub struct ModuleFile {
    /// The open file.
    pub file: std::fs::File,
    /// Its path, for messages.
    pub path: std::path::PathBuf,
}

impl ModuleFile {
    /// Opens the module at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = open_regular(path, 0)
            .map_err(|e| anyhow::anyhow!("cannot read module {}: {e}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Reads the whole module from its start, at most [`MAX_MODULE_SIZE`] bytes.
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        let mut file = &self.file;
        let mut bytes = Vec::new();
        file.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| {
                file.take(MAX_MODULE_SIZE + 1)
                    .read_to_end(&mut bytes)
                    .map(drop)
            })
            .map_err(|e| anyhow::anyhow!("cannot read module {}: {e}", self.path.display()))?;
        let len = bytes.len() as u64;
        if len > MAX_MODULE_SIZE {
            anyhow::bail!(
                "module {} is at least {len} bytes, over the {MAX_MODULE_SIZE}-byte limit",
                self.path.display()
            );
        }
        Ok(bytes)
    }
}

/// Reads a module: a regular file of at most [`MAX_MODULE_SIZE`] bytes, opened once (see
/// [`read_regular_file`]); FIFOs, devices and directories are refused without reading them.
pub fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    read_regular_file(path, MAX_MODULE_SIZE).map_err(|e| match e {
        ReadError::TooLarge { len, max } if len > max => anyhow::anyhow!(
            "module {} is {}{len} bytes, over the {max}-byte limit",
            path.display(),
            if len == max + 1 { "at least " } else { "" }
        ),
        e => anyhow::anyhow!("cannot read module {}: {e}", path.display()),
    })
}

/// Reads a module from standard input, at most [`MAX_MODULE_SIZE`] bytes.
fn read_module_stdin() -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut wasm = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_MODULE_SIZE + 1)
        .read_to_end(&mut wasm)
        .context("cannot read the module from standard input")?;
    if wasm.len() as u64 > MAX_MODULE_SIZE {
        bail!("the module on standard input is over the {MAX_MODULE_SIZE}-byte limit");
    }
    Ok(wasm)
}

/// `n` random bytes from the kernel, as lower-case hex: unpredictable names for temporary files.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    fill_random(&mut bytes)?;
    Ok(hex(&bytes))
}

/// Fills `buf` from `/dev/urandom`.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Creates a new temporary file in `dir` for `name` (`.NAME.RANDOM.tmp`, `O_EXCL`, `mode`),
/// to be renamed over the real name once complete. Returns its path and the open file.
pub fn create_temp(
    dir: &Path,
    name: &std::ffi::OsStr,
    mode: u32,
) -> anyhow::Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        random_hex(8).context("cannot read random bytes for a temporary file name")?
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((tmp, file))
}

/// Writes `bytes` to `path` through a new temporary file in the same directory (created with
/// `O_EXCL` under a random name) and a rename, so the path never holds a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let (tmp, mut f) = create_temp(dir, name, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let result = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
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

/// The path that means standard input (as the module) or standard output (as `-o`).
const STDIO: &str = "-";

/// Confines the compile worker (`bulwark compile - -o -`, which `bulwark run` starts) before it
/// reads a byte of the module: it needs no file system, no network and no new processes, only
/// its standard input, output and error (see [`crate::confine`]).
fn confine_compile_worker() -> anyhow::Result<()> {
    crate::confine::compile_worker()
}

/// Runs `bulwark compile`.
///
/// `-` as the input reads the module from standard input; `-o -` writes the artifact to
/// standard output and prints no summary. With both, this is the compile worker the compile
/// cache runs: it touches no path at all, and confines itself first
/// ([`confine_compile_worker`]).
pub fn run(args: &CompileArgs) -> anyhow::Result<()> {
    let from_stdin = args.input.as_os_str() == STDIO;
    let to_stdout = args.output.as_os_str() == STDIO;
    if from_stdin && to_stdout {
        return worker(args.target, metering(args));
    }
    let started = Instant::now();
    let (wasm, name) = if from_stdin {
        (read_module_stdin()?, "standard input".to_owned())
    } else {
        (read_module(&args.input)?, args.input.display().to_string())
    };
    let digest = sha256_hex(&wasm);
    let artifact = compile_bytes(&wasm, args.target, metering(args))
        .with_context(|| format!("cannot compile {name}: is it a valid WebAssembly module?"))?;
    if to_stdout {
        return write_stdout(&artifact);
    }
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
            "compiled {name} ({} bytes, sha256 {digest}) -> {} ({} bytes) in {ms:.1} ms",
            wasm.len(),
            args.output.display(),
            artifact.len(),
        );
    }
    Ok(())
}

/// The compile worker: module on standard input, artifact on standard output, an error message
/// on standard error (the caller names the module).
fn worker(target: Target, metering: Metering) -> anyhow::Result<()> {
    // Before confinement: creating the engine sets up wasmtime's signal handlers. No byte of
    // the module has been read yet.
    let engine = compiler_engine(target, metering)?;
    confine_compile_worker().context("cannot confine the compile worker")?;
    let wasm = read_module_stdin()?;
    let artifact = compile_with(&engine, &wasm).context("is it a valid WebAssembly module?")?;
    write_stdout(&artifact)
}

/// The variant `bulwark compile` was asked for: `--fuel` compiles fuel metering in.
fn metering(args: &CompileArgs) -> Metering {
    if args.fuel {
        Metering::Fuel
    } else {
        Metering::None
    }
}

/// Writes an artifact to standard output.
fn write_stdout(artifact: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(artifact)
        .and_then(|()| out.flush())
        .context("cannot write the artifact to standard output")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (func (export "run") (result i64) i64.const 42))"#;

    #[test]
    fn compiles_to_a_reproducible_elf_artifact() {
        let a = compile_bytes(WAT.as_bytes(), Target::Guest, Metering::None).unwrap();
        assert_eq!(&a[..4], b"\x7fELF");
        assert_eq!(
            a,
            compile_bytes(WAT.as_bytes(), Target::Guest, Metering::None).unwrap(),
            "same input, same bytes"
        );
    }

    #[test]
    fn fuel_metering_is_compiled_in_only_when_asked() {
        for target in [Target::Guest, Target::Host] {
            let none = compile_bytes(WAT.as_bytes(), target, Metering::None).unwrap();
            let fuel = compile_bytes(WAT.as_bytes(), target, Metering::Fuel).unwrap();
            assert_ne!(
                none, fuel,
                "{target:?}: the variants are different artifacts"
            );
        }
    }

    #[test]
    fn invalid_modules_and_oversized_files_are_refused() {
        assert!(compile_bytes(b"\0asm\x01\0\0\0garbage", Target::Guest, Metering::None).is_err());
        assert!(compile_bytes(b"\0asm\x01\0\0\0garbage", Target::Host, Metering::Fuel).is_err());
        assert!(
            compile_bytes(
                b"(module (func (export \"f\") (result i32)))",
                Target::Guest,
                Metering::Fuel
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
    fn only_regular_files_are_read_and_never_past_the_cap() {
        let dir = std::env::temp_dir().join(format!("bulwark-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_regular_file(&file, 10).unwrap(), b"0123456789");
        assert!(matches!(
            read_regular_file(&file, 9),
            Err(ReadError::TooLarge { len: 10, max: 9 })
        ));
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        for (path, what) in [
            (fifo.as_path(), "a FIFO (named pipe)"),
            (Path::new("/dev/zero"), "a character device"),
            (dir.as_path(), "a directory"),
        ] {
            match read_regular_file(path, 1 << 20) {
                Err(ReadError::NotRegular(w)) => assert_eq!(w, what),
                other => panic!("{}: {other:?}", path.display()),
            }
        }
        let e = read_module(&fifo).unwrap_err().to_string();
        assert!(e.contains("fifo") && e.contains("FIFO"), "{e}");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_regular_file(&link, 10).unwrap(), b"0123456789");
        let e = read_regular_file_nofollow(&link, 10).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
