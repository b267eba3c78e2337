//! The compile cache: artifacts on disk keyed by (module SHA-256, engine settings, wasmtime
//! version), compiled by a separate, resource-limited `bulwark compile` process so a compiler
//! crash or runaway cannot take the CLI with it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::Target;
use crate::compile::sha256_hex;

/// Wall-clock limit of one compilation.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(300);
/// Address-space limit of the compiler process.
pub const COMPILE_MEMORY: u64 = 8 << 30;

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

/// Digest of everything besides the module that decides the artifact's bytes.
pub fn engine_key(target: Target) -> String {
    let id = match target {
        Target::Guest => format!(
            "{} {} {}",
            bulwark_engine::WASMTIME_VERSION,
            bulwark_engine::TARGET,
            bulwark_engine::SETTINGS_ID
        ),
        // Compiled for this machine's CPU: an artifact carried to another machine is refused
        // when loaded, and the error says to clear the cache.
        Target::Host => format!(
            "{} host {}-{} {} {}",
            bulwark_engine::WASMTIME_VERSION,
            std::env::consts::ARCH,
            std::env::consts::OS,
            bulwark_engine::SETTINGS_ID,
            crate::local::HOST_SETTINGS_ID
        ),
    };
    sha256_hex(id.as_bytes())[..16].to_owned()
}

/// Path of the artifact for a module with SHA-256 `digest`, compiled for `target`.
pub fn artifact_path(digest: &str, target: Target) -> PathBuf {
    let suffix = match target {
        Target::Guest => "",
        Target::Host => "-host",
    };
    dir()
        .join("artifacts")
        .join(format!("{digest}-{}{suffix}.cwasm", engine_key(target)))
}

/// Returns the cached artifact for `module` (whose SHA-256 is `digest`) and `target`,
/// compiling it first if needed. The bool says whether it was compiled now.
pub fn artifact(module: &Path, digest: &str, target: Target) -> anyhow::Result<(Vec<u8>, bool)> {
    let path = artifact_path(digest, target);
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok((bytes, false));
    }
    let parent = path.parent().context("cache path has no directory")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create the compile cache {}", parent.display()))?;
    compile_in_child(module, &path, target)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((bytes, true))
}

/// Runs `bulwark compile module -o out` as a child with memory and time limits.
fn compile_in_child(module: &Path, out: &Path, target: Target) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the bulwark executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("compile")
        .arg(module)
        .arg("-o")
        .arg(out)
        .arg("--target")
        .arg(target.name());
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
    // which is async-signal-safe, on its own process.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: COMPILE_MEMORY,
                rlim_max: COMPILE_MEMORY,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the compiler process")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for the compiler")? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            if status.success() {
                return Ok(());
            }
            let err = err.trim().trim_start_matches("bulwark: ");
            bail!("{err}");
        }
        if started.elapsed() > COMPILE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "compiling {} took more than {} s; the compiler was stopped",
                module.display(),
                COMPILE_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
