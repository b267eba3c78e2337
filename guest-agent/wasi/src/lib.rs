//! WASI preview 1 for Bulwark's tools, as plain data: arguments, environment, standard
//! streams, clocks, random numbers, `poll_oneoff`, and files in the directories shared with a
//! call (the in-memory file system `bulwark_memfs`).
//!
//! No wasmtime here: every function takes the tool's linear memory as `&mut [u8]` and the
//! raw WASI arguments, and returns `Result<_, Errno>`; the guest's linker glue gets the memory
//! from the caller and turns the result into the WASI return value. Every pointer and length
//! from the tool is bounds-checked ([`mem`]): a bad one is [`Errno::Fault`], never a panic.
//! Clocks, random bytes and waiting come from the embedder through [`Host`], so all of it is
//! tested on the host.
//!
//! The reference is wasmtime-wasi 48's preview 1 (what `bulwark run --isolation wasm` uses):
//! where it and the WASI text differ, this behaves like wasmtime-wasi and says so where it
//! does. In particular rights are not enforced as capabilities: like wasmtime-wasi, a
//! descriptor is only opened for reading and/or writing (from `FD_READ` / `FD_WRITE`), and
//! `fd_fdstat_get` reports rights computed from that.

#![no_std]
extern crate alloc;

mod errno;
mod fd;
pub mod mem;
mod misc;
mod path;
pub mod types;

#[cfg(test)]
mod tests;

use alloc::string::String;
use alloc::vec::Vec;

use bulwark_memfs::Fs;
use bulwark_proto::tree::{Entry, SharedDir};

pub use errno::{Errno, to_code};
pub use fd::{Desc, Fds, MAX_FDS, OpenFile};

/// What the embedder provides: time, randomness and waiting.
pub trait Host {
    /// Nanoseconds since the call started, never going back.
    fn monotonic_ns(&self) -> u64;
    /// Wall-clock time, nanoseconds since the Unix epoch.
    fn realtime_ns(&self) -> u64;
    /// Fills `buf` with random bytes.
    fn random(&mut self, buf: &mut [u8]);
    /// Waits for about `ns` nanoseconds without spinning (may return earlier).
    fn wait_ns(&mut self, ns: u64);
}

/// Captured output with a cap.
///
/// The cap counts every byte ever kept, including those already handed on with
/// [`Output::take`] (a streaming call sends its output while the tool runs, so the record
/// holds only what has not been sent yet, and memory stays bounded by the cap either way).
#[derive(Default)]
pub struct Output {
    /// Bytes kept and not taken yet: all of them when nothing was taken.
    pub bytes: Vec<u8>,
    cap: usize,
    /// Bytes kept and then taken.
    taken: usize,
    /// Bytes were dropped at the cap.
    pub truncated: bool,
}

impl Output {
    /// An empty output that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            bytes: Vec::new(),
            cap,
            taken: 0,
            truncated: false,
        }
    }

    /// Appends what fits under the cap; the rest is dropped and noted.
    pub fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.kept());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Bytes kept so far, taken ones included (never more than the cap).
    pub fn kept(&self) -> usize {
        self.taken.saturating_add(self.bytes.len())
    }

    /// Bytes kept and not taken yet.
    pub fn pending(&self) -> usize {
        self.bytes.len()
    }

    /// Hands over the bytes kept since the last take (moved, not copied). They still count
    /// against the cap.
    pub fn take(&mut self) -> Vec<u8> {
        let bytes = core::mem::take(&mut self.bytes);
        self.taken = self.taken.saturating_add(bytes.len());
        bytes
    }
}

/// What a call's WASI context is made from.
pub struct Params {
    /// argv.
    pub args: Vec<String>,
    /// Environment as (name, value).
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Directories to preopen, with their contents.
    pub dirs: Vec<SharedDir>,
    /// Caps on the shared directories' contents.
    pub fs_limits: bulwark_memfs::Limits,
    /// Cap of stdout and of stderr.
    pub max_output: usize,
}

/// Why a context could not be made.
#[derive(Debug)]
pub enum CtxError {
    /// A shared directory's tree is malformed or does not fit the limits.
    Load {
        /// Where the tool would have seen it.
        guest_path: String,
        /// What the file system said.
        error: bulwark_memfs::Errno,
    },
    /// More shared directories than descriptors.
    TooManyDirs,
}

impl core::fmt::Display for CtxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Load { guest_path, error } => {
                write!(
                    f,
                    "cannot load the directory shared as {guest_path}: {error}"
                )
            }
            Self::TooManyDirs => write!(f, "too many shared directories"),
        }
    }
}

impl core::error::Error for CtxError {}

/// Everything one call's tool can see through WASI.
pub struct WasiCtx<H> {
    args: Vec<String>,
    env: Vec<String>,
    stdin: Vec<u8>,
    stdin_pos: usize,
    fds: Fds,
    fs: Fs,
    shared_dirs: usize,
    /// Standard output.
    pub stdout: Output,
    /// Standard error.
    pub stderr: Output,
    /// Time, randomness, waiting.
    pub host: H,
}

impl<H: Host> WasiCtx<H> {
    /// A fresh context: stdin, stdout, stderr at 0-2, then the shared directories preopened
    /// in order.
    pub fn new(p: Params, host: H) -> Result<Self, CtxError> {
        let mut ctx = Self {
            args: p.args,
            env: p
                .env
                .into_iter()
                .map(|(k, v)| alloc::format!("{k}={v}"))
                .collect(),
            stdin: p.stdin,
            stdin_pos: 0,
            fds: Fds::new(),
            fs: Fs::new(p.fs_limits),
            shared_dirs: p.dirs.len(),
            stdout: Output::new(p.max_output),
            stderr: Output::new(p.max_output),
            host,
        };
        let now = ctx.host.realtime_ns();
        for (i, dir) in p.dirs.into_iter().enumerate() {
            let SharedDir {
                guest_path,
                entries,
            } = dir;
            let load = |error| CtxError::Load {
                guest_path: guest_path.clone(),
                error,
            };
            let ino = ctx.fs.add_root(now).map_err(load)?;
            ctx.fs.load(i, entries, now).map_err(load)?;
            ctx.fs.open(ino).map_err(load)?;
            ctx.fds
                .insert(Desc::Dir {
                    ino,
                    preopen: Some(guest_path),
                    read: true,
                })
                .map_err(|_| CtxError::TooManyDirs)?;
        }
        Ok(ctx)
    }

    /// What each shared directory holds now, in the order they were shared.
    pub fn take_dirs(&mut self) -> Result<Vec<Vec<Entry>>, bulwark_memfs::Errno> {
        (0..self.shared_dirs).map(|i| self.fs.export(i)).collect()
    }

    /// The file system (for tests and diagnostics).
    pub fn fs(&self) -> &Fs {
        &self.fs
    }

    /// Wall-clock time now, nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64 {
        self.host.realtime_ns()
    }
}
