//! WASI preview 1 for tools, implemented by the agent: arguments, environment, standard
//! streams, clocks, random numbers, `proc_exit`, `poll_oneoff` on clocks, and files in the
//! directories shared with the call (an in-memory file system, `bulwark_memfs`).
//!
//! Every pointer and length from the tool is checked against its linear memory ([`mem`]); a
//! bad one is EFAULT for the tool, never a fault for the guest. Sockets are not supported.

mod fd;
mod mem;
mod path;

use alloc::string::String;
use alloc::vec::Vec;

use bulwark_engine::CallLimits;
use bulwark_memfs::Fs;
use bulwark_proto::tree::{Entry, SharedDir};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use wasmtime::{Caller, Extern, Linker, Memory};

use crate::clock::{self, Clock};
use fd::{Desc, Fd, Fds, rights};
use mem::{slice, write_bytes, write_strings, write_u32, write_u64};

/// WASI errno values used here.
mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const BUSY: i32 = 10;
    pub const EXIST: i32 = 20;
    pub const FAULT: i32 = 21;
    pub const FBIG: i32 = 22;
    pub const ILSEQ: i32 = 25;
    pub const INVAL: i32 = 28;
    pub const ISDIR: i32 = 31;
    pub const MFILE: i32 = 33;
    pub const NAMETOOLONG: i32 = 37;
    pub const NOENT: i32 = 44;
    pub const NOTDIR: i32 = 54;
    pub const NOTSUP: i32 = 58;
    pub const OVERFLOW: i32 = 61;
    pub const SPIPE: i32 = 70;
    pub const NOTCAPABLE: i32 = 76;
}

const MODULE: &str = "wasi_snapshot_preview1";

/// The tool called `proc_exit` with this code.
#[derive(Debug)]
pub struct Exit(pub i32);

impl core::fmt::Display for Exit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "exit with code {}", self.0)
    }
}

impl core::error::Error for Exit {}

/// Captured output with a cap.
#[derive(Default)]
pub struct Output {
    /// Bytes kept.
    pub bytes: Vec<u8>,
    cap: usize,
    /// Bytes were dropped at the cap.
    pub truncated: bool,
}

impl Output {
    fn new(cap: usize) -> Self {
        Self {
            bytes: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// Everything one call's tool can see.
pub struct Ctx {
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
    rng: ChaCha20Rng,
    realtime_ns: u64,
    started_tsc: u64,
    clock: Clock,
    /// Memory and table limits for the store: one budget for all its memories.
    pub limits: CallLimits,
}

/// What a call's context is made from.
pub struct CtxParams {
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
    /// Seed for `random_get`.
    pub seed: [u8; 32],
    /// Wall-clock time at the call.
    pub realtime_ns: u64,
    /// TSC frequency.
    pub clock: Clock,
    /// Store limits.
    pub limits: CallLimits,
}

impl Ctx {
    /// A fresh context. Fails when the shared directories do not fit the limits or their tree
    /// is malformed.
    pub fn new(p: CtxParams) -> Result<Self, String> {
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
            rng: ChaCha20Rng::from_seed(p.seed),
            realtime_ns: p.realtime_ns,
            started_tsc: clock::now(),
            clock: p.clock,
            limits: p.limits,
        };
        let now = ctx.now_ns();
        for (i, dir) in p.dirs.into_iter().enumerate() {
            let ino = ctx
                .fs
                .add_root(now)
                .map_err(|e| alloc::format!("cannot make a root for {}: {e:?}", dir.guest_path))?;
            ctx.fs.load(i, dir.entries, now).map_err(|e| {
                alloc::format!(
                    "cannot load the directory shared as {}: {e:?}",
                    dir.guest_path
                )
            })?;
            ctx.fs.open(ino).map_err(|e| alloc::format!("{e:?}"))?;
            ctx.fds
                .insert(Fd {
                    desc: Desc::Dir {
                        ino,
                        preopen: Some(dir.guest_path),
                    },
                    base: rights::ALL,
                    inheriting: rights::ALL,
                })
                .map_err(|e| alloc::format!("too many shared directories (errno {e})"))?;
        }
        Ok(ctx)
    }

    /// What each shared directory holds now, in the order they were shared.
    pub fn take_dirs(&mut self) -> Result<Vec<Vec<Entry>>, String> {
        (0..self.shared_dirs)
            .map(|i| {
                self.fs
                    .export(i)
                    .map_err(|e| alloc::format!("cannot export shared directory {i}: {e:?}"))
            })
            .collect()
    }

    fn elapsed_ns(&self) -> u64 {
        self.clock
            .micros(clock::now().wrapping_sub(self.started_tsc))
            .saturating_mul(1000)
    }

    /// Wall-clock time now, nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64 {
        self.realtime_ns.saturating_add(self.elapsed_ns())
    }
}

/// The tool's exported memory.
fn memory(caller: &mut Caller<'_, Ctx>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

fn result(r: Result<(), i32>) -> i32 {
    r.err().unwrap_or(errno::SUCCESS)
}

/// Runs `f` on the tool's memory and its context; EFAULT if the tool exports no memory.
pub(crate) fn with_mem(
    caller: &mut Caller<'_, Ctx>,
    f: impl FnOnce(&mut [u8], &mut Ctx) -> Result<(), i32>,
) -> i32 {
    let Some(mem) = memory(caller) else {
        return errno::FAULT;
    };
    let (data, ctx) = mem.data_and_store_mut(caller);
    result(f(data, ctx))
}

/// Adds the WASI preview 1 functions to `linker`.
pub fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "args_sizes_get",
        |mut c: Caller<'_, Ctx>, argc: u32, size: u32| {
            with_mem(&mut c, |d, ctx| {
                let (n, bytes) = mem::sizes(&ctx.args);
                write_u32(d, argc, n)?;
                write_u32(d, size, bytes)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |mut c: Caller<'_, Ctx>, ptrs: u32, buf: u32| {
            with_mem(&mut c, |d, ctx| write_strings(d, &ctx.args, ptrs, buf))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut c: Caller<'_, Ctx>, count: u32, size: u32| {
            with_mem(&mut c, |d, ctx| {
                let (n, bytes) = mem::sizes(&ctx.env);
                write_u32(d, count, n)?;
                write_u32(d, size, bytes)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |mut c: Caller<'_, Ctx>, ptrs: u32, buf: u32| {
            with_mem(&mut c, |d, ctx| write_strings(d, &ctx.env, ptrs, buf))
        },
    )?;
    fd::add_to_linker(linker)?;
    path::add_to_linker(linker)?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: Caller<'_, Ctx>, id: u32, res: u32| {
            with_mem(&mut c, |d, _| {
                if id > 3 {
                    return Err(errno::INVAL);
                }
                write_u64(d, res, 1000)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: Caller<'_, Ctx>, id: u32, _precision: u64, time: u32| {
            with_mem(&mut c, |d, ctx| {
                let now = match id {
                    0 => ctx.realtime_ns.saturating_add(ctx.elapsed_ns()),
                    1..=3 => ctx.elapsed_ns(),
                    _ => return Err(errno::INVAL),
                };
                write_u64(d, time, now)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut c: Caller<'_, Ctx>, buf: u32, len: u32| {
            with_mem(&mut c, |d, ctx| {
                let start = buf as usize;
                let end = start.checked_add(len as usize).ok_or(errno::FAULT)?;
                ctx.rng
                    .fill_bytes(d.get_mut(start..end).ok_or(errno::FAULT)?);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(MODULE, "sched_yield", || errno::SUCCESS)?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut c: Caller<'_, Ctx>, subs: u32, events: u32, count: u32, nevents: u32| {
            with_mem(&mut c, |d, ctx| {
                poll_oneoff(d, ctx, subs, events, count, nevents)
            })
        },
    )?;
    linker.func_wrap(MODULE, "proc_exit", |code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Exit(code)))
    })?;
    linker.func_wrap(MODULE, "proc_raise", |_sig: u32| errno::NOTSUP)?;
    for name in ["sock_accept", "sock_recv", "sock_send", "sock_shutdown"] {
        linker.func_new(
            MODULE,
            name,
            sock_type(name, linker.engine()),
            |_c, _params, results| {
                results[0] = wasmtime::Val::I32(errno::NOTSUP);
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// The WASI signature of a `sock_*` function.
fn sock_type(name: &str, engine: &wasmtime::Engine) -> wasmtime::FuncType {
    use wasmtime::ValType::I32;
    let params: &[wasmtime::ValType] = match name {
        "sock_accept" => &[I32, I32, I32],
        "sock_recv" => &[I32, I32, I32, I32, I32, I32],
        "sock_send" => &[I32, I32, I32, I32, I32],
        _ => &[I32, I32],
    };
    wasmtime::FuncType::new(engine, params.iter().cloned(), [I32])
}

/// `poll_oneoff`: clock subscriptions are waited for in the VMM's bounded wait, so a sleeping
/// tool blocks its vCPU thread instead of spinning (the host's deadline bounds the call); fd
/// subscriptions are ready at once (stdin is all there, files and stdout/stderr never block).
fn poll_oneoff(
    d: &mut [u8],
    ctx: &mut Ctx,
    subs: u32,
    events: u32,
    count: u32,
    nevents: u32,
) -> Result<(), i32> {
    if count == 0 {
        return Err(errno::INVAL);
    }
    let raw = slice(d, subs, count.checked_mul(48).ok_or(errno::FAULT)?)?.to_vec();
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
    let mut deadline: Option<u64> = None;
    let mut ready = Vec::new();
    for sub in raw.chunks_exact(48) {
        let userdata = word(sub, 0);
        match sub[8] {
            0 => {
                let timeout = word(sub, 24);
                let absolute = u16::from_le_bytes([sub[40], sub[41]]) & 1 != 0;
                let now = ctx.elapsed_ns();
                let at = if absolute {
                    timeout
                } else {
                    now.saturating_add(timeout)
                };
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
                ready.push((userdata, 0u8, at));
            }
            tag @ (1 | 2) => ready.push((userdata, tag, 0)),
            _ => return Err(errno::INVAL),
        }
    }
    let fd_ready = ready.iter().any(|r| r.1 != 0);
    if let (Some(at), false) = (deadline, fd_ready) {
        // Sleep in the VMM (a bounded wait), not in a spin: the vCPU thread blocks.
        loop {
            let now = ctx.elapsed_ns();
            if now >= at {
                break;
            }
            let us = (at - now).div_ceil(1000);
            crate::control::wait_at_most(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
    let now = ctx.elapsed_ns();
    let mut n = 0u32;
    for (userdata, tag, at) in ready {
        if tag == 0 && at > now {
            continue;
        }
        let mut ev = [0u8; 32];
        ev[0..8].copy_from_slice(&userdata.to_le_bytes());
        ev[10] = tag;
        write_bytes(d, events.checked_add(n * 32).ok_or(errno::FAULT)?, &ev)?;
        n += 1;
    }
    write_u32(d, nevents, n)
}
