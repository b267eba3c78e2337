//! WASI preview 1 for tools, implemented by the agent: arguments, environment, stdio, clocks,
//! random numbers, `proc_exit`, `poll_oneoff` on clocks.
//!
//! There is no file system yet: no directory is preopened, so every path operation gets EBADF
//! (the tool holds no directory descriptor), as WASI prescribes for a descriptor that is not
//! open. Every pointer and length from the tool is checked against its linear memory; a bad one
//! is EFAULT for the tool, never a fault for the guest.

use alloc::string::String;
use alloc::vec::Vec;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use wasmtime::{Caller, Extern, Linker, Memory, StoreLimits};

use crate::clock::{self, Clock};

/// WASI errno values used here.
mod errno {
    pub const SUCCESS: i32 = 0;
    pub const BADF: i32 = 8;
    pub const FAULT: i32 = 21;
    pub const INVAL: i32 = 28;
    pub const NOTSUP: i32 = 58;
    pub const SPIPE: i32 = 70;
    pub const OVERFLOW: i32 = 61;
}

const MODULE: &str = "wasi_snapshot_preview1";
/// `filetype::character_device`.
const FILETYPE_CHARACTER_DEVICE: u8 = 2;

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
    /// Standard output.
    pub stdout: Output,
    /// Standard error.
    pub stderr: Output,
    rng: ChaCha20Rng,
    realtime_ns: u64,
    started_tsc: u64,
    clock: Clock,
    /// Memory and table limits for the store.
    pub limits: StoreLimits,
}

/// What a call's context is made from.
pub struct CtxParams {
    /// argv.
    pub args: Vec<String>,
    /// Environment as (name, value).
    pub env: Vec<(String, String)>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Cap of stdout and of stderr.
    pub max_output: usize,
    /// Seed for `random_get`.
    pub seed: [u8; 32],
    /// Wall-clock time at the call.
    pub realtime_ns: u64,
    /// TSC frequency.
    pub clock: Clock,
    /// Store limits.
    pub limits: StoreLimits,
}

impl Ctx {
    /// A fresh context.
    pub fn new(p: CtxParams) -> Self {
        Self {
            args: p.args,
            env: p
                .env
                .into_iter()
                .map(|(k, v)| alloc::format!("{k}={v}"))
                .collect(),
            stdin: p.stdin,
            stdin_pos: 0,
            stdout: Output::new(p.max_output),
            stderr: Output::new(p.max_output),
            rng: ChaCha20Rng::from_seed(p.seed),
            realtime_ns: p.realtime_ns,
            started_tsc: clock::now(),
            clock: p.clock,
            limits: p.limits,
        }
    }

    fn elapsed_ns(&self) -> u64 {
        self.clock
            .micros(clock::now().wrapping_sub(self.started_tsc))
            .saturating_mul(1000)
    }
}

/// The tool's exported memory.
fn memory(caller: &mut Caller<'_, Ctx>) -> Option<Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

/// `len` bytes at `ptr` in the tool's memory, or None if out of bounds.
fn slice(data: &[u8], ptr: u32, len: u32) -> Option<&[u8]> {
    let start = ptr as usize;
    data.get(start..start.checked_add(len as usize)?)
}

fn write_bytes(data: &mut [u8], ptr: u32, bytes: &[u8]) -> Result<(), i32> {
    let start = ptr as usize;
    let end = start.checked_add(bytes.len()).ok_or(errno::FAULT)?;
    data.get_mut(start..end)
        .ok_or(errno::FAULT)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(data: &mut [u8], ptr: u32, v: u32) -> Result<(), i32> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

fn write_u64(data: &mut [u8], ptr: u32, v: u64) -> Result<(), i32> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

/// The (pointer, length) pairs of an iovec array.
fn iovecs(data: &[u8], ptr: u32, count: u32) -> Result<Vec<(u32, u32)>, i32> {
    let raw = slice(data, ptr, count.checked_mul(8).ok_or(errno::FAULT)?).ok_or(errno::FAULT)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect())
}

fn result(r: Result<(), i32>) -> i32 {
    r.err().unwrap_or(errno::SUCCESS)
}

/// Writes a list of strings as argv/environ do: pointers at `ptrs`, NUL-terminated bytes at `buf`.
fn write_strings(data: &mut [u8], list: &[String], ptrs: u32, buf: u32) -> Result<(), i32> {
    let mut at = buf;
    for (i, s) in list.iter().enumerate() {
        write_u32(
            data,
            ptrs.checked_add(4 * i as u32).ok_or(errno::FAULT)?,
            at,
        )?;
        write_bytes(data, at, s.as_bytes())?;
        let nul = at.checked_add(s.len() as u32).ok_or(errno::FAULT)?;
        write_bytes(data, nul, &[0])?;
        at = nul.checked_add(1).ok_or(errno::FAULT)?;
    }
    Ok(())
}

fn sizes(list: &[String]) -> (u32, u32) {
    let bytes: usize = list.iter().map(|s| s.len() + 1).sum();
    (list.len() as u32, bytes as u32)
}

/// Runs `f` on the tool's memory and its context; EFAULT if the tool exports no memory.
fn with_mem(
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
                let (n, bytes) = sizes(&ctx.args);
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
                let (n, bytes) = sizes(&ctx.env);
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
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, written: u32| {
            with_mem(&mut c, |d, ctx| {
                let out = match fd {
                    1 => &mut ctx.stdout,
                    2 => &mut ctx.stderr,
                    0 => return Err(errno::BADF),
                    _ => return Err(errno::BADF),
                };
                let mut total = 0u32;
                for (ptr, len) in iovecs(d, iovs, count)? {
                    out.push(slice(d, ptr, len).ok_or(errno::FAULT)?);
                    total = total.checked_add(len).ok_or(errno::OVERFLOW)?;
                }
                write_u32(d, written, total)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: Caller<'_, Ctx>, fd: u32, iovs: u32, count: u32, read: u32| {
            with_mem(&mut c, |d, ctx| {
                if fd != 0 {
                    return Err(errno::BADF);
                }
                let mut total = 0u32;
                for (ptr, len) in iovecs(d, iovs, count)? {
                    let rest = &ctx.stdin[ctx.stdin_pos..];
                    let n = rest.len().min(len as usize);
                    write_bytes(d, ptr, &rest[..n])?;
                    ctx.stdin_pos += n;
                    total += n as u32;
                }
                write_u32(d, read, total)
            })
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |fd: u32| {
        if fd <= 2 { errno::SUCCESS } else { errno::BADF }
    })?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: Caller<'_, Ctx>, fd: u32, stat: u32| {
            with_mem(&mut c, |d, _| {
                if fd > 2 {
                    return Err(errno::BADF);
                }
                let mut s = [0u8; 24];
                s[0] = FILETYPE_CHARACTER_DEVICE;
                // Rights: fd_read (bit 1) for stdin, fd_write (bit 6) for stdout/stderr.
                let rights: u64 = if fd == 0 { 1 << 1 } else { 1 << 6 };
                s[8..16].copy_from_slice(&rights.to_le_bytes());
                write_bytes(d, stat, &s)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_get",
        |mut c: Caller<'_, Ctx>, fd: u32, stat: u32| {
            with_mem(&mut c, |d, _| {
                if fd > 2 {
                    return Err(errno::BADF);
                }
                let mut s = [0u8; 64];
                s[16] = FILETYPE_CHARACTER_DEVICE;
                write_bytes(d, stat, &s)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |fd: u32, _off: i64, _whence: u32, _new: u32| {
            if fd <= 2 { errno::SPIPE } else { errno::BADF }
        },
    )?;
    linker.func_wrap(MODULE, "fd_fdstat_set_flags", |fd: u32, _flags: u32| {
        if fd <= 2 { errno::NOTSUP } else { errno::BADF }
    })?;
    linker.func_wrap(MODULE, "fd_prestat_get", |_fd: u32, _ptr: u32| errno::BADF)?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_fd: u32, _ptr: u32, _len: u32| errno::BADF,
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |_fd: u32, _buf: u32, _len: u32, _cookie: u64, _used: u32| errno::BADF,
    )?;
    // No directory is preopened, so no descriptor a path could be relative to exists.
    linker.func_wrap(
        MODULE,
        "path_open",
        |_dir: u32,
         _flags: u32,
         _path: u32,
         _len: u32,
         _oflags: u32,
         _base: u64,
         _inh: u64,
         _fdflags: u32,
         _fd: u32| { errno::BADF },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |_dir: u32, _flags: u32, _p: u32, _l: u32, _out: u32| errno::BADF,
    )?;
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |_dir: u32, _p: u32, _l: u32| errno::BADF,
    )?;
    linker.func_wrap(
        MODULE,
        "path_remove_directory",
        |_dir: u32, _p: u32, _l: u32| errno::BADF,
    )?;
    linker.func_wrap(MODULE, "path_unlink_file", |_dir: u32, _p: u32, _l: u32| {
        errno::BADF
    })?;
    linker.func_wrap(
        MODULE,
        "path_rename",
        |_d1: u32, _p1: u32, _l1: u32, _d2: u32, _p2: u32, _l2: u32| errno::BADF,
    )?;
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

/// `poll_oneoff`: clock subscriptions are waited for (the guest has nothing else to do, and the
/// host's deadline bounds the call); fd subscriptions are ready at once (stdin is all there,
/// stdout and stderr never block).
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
    let raw = slice(d, subs, count.checked_mul(48).ok_or(errno::FAULT)?)
        .ok_or(errno::FAULT)?
        .to_vec();
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
        while ctx.elapsed_ns() < at {
            core::hint::spin_loop();
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
