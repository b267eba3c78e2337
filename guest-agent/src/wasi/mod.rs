//! The wasmtime linker glue of WASI preview 1: each `wasi_snapshot_preview1` import gets the
//! tool's memory and the call's context from the caller and runs the matching function of
//! `bulwark_wasi` (which holds all the logic and is tested on the host). The guest adds what
//! only it has: the TSC clock, the seeded random generator, the VMM's bounded wait,
//! `proc_exit` as a trap carrying the exit code, and, for a streaming call, sending the output
//! at `fd_write`, `fd_pwrite`, `fd_read`, `clock_time_get`, `sched_yield` and `poll_oneoff`
//! ([`crate::stream`] has the rule).

use alloc::string::String;
use alloc::vec::Vec;

use bulwark_engine::CallLimits;
use bulwark_proto::tree::Entry;
use bulwark_wasi::{Errno, Host, Params, WasiCtx, to_code};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use wasmtime::{Caller, Extern, Linker};

use crate::clock::{self, Clock};
use crate::stream::{Link, When};

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

/// Time, randomness and waiting inside the guest.
pub struct GuestHost {
    rng: ChaCha20Rng,
    realtime_ns: u64,
    started_tsc: u64,
    clock: Clock,
}

impl Host for GuestHost {
    fn monotonic_ns(&self) -> u64 {
        self.clock
            .micros(clock::now().wrapping_sub(self.started_tsc))
            .saturating_mul(1000)
    }

    fn realtime_ns(&self) -> u64 {
        self.realtime_ns.saturating_add(self.monotonic_ns())
    }

    fn random(&mut self, buf: &mut [u8]) {
        self.rng.fill_bytes(buf);
    }

    fn wait_ns(&mut self, ns: u64) {
        // Sleep in the VMM (a bounded wait), not in a spin: the vCPU thread blocks.
        let us = ns.div_ceil(1000);
        crate::control::wait_at_most(u32::try_from(us).unwrap_or(u32::MAX));
    }
}

/// Everything one call's tool can see, and its store limits.
pub struct Ctx {
    /// The WASI state.
    pub wasi: WasiCtx<GuestHost>,
    /// Memory and table limits for the store: one budget for all its memories.
    pub limits: CallLimits,
    /// The connection output is streamed on, for a call that asked for it.
    link: Option<Link>,
}

/// What a call's context is made from.
pub struct CtxParams {
    /// What the tool sees: arguments, environment, stdin, shared directories and their caps.
    pub wasi: Params,
    /// Seed for `random_get`.
    pub seed: [u8; 32],
    /// Wall-clock time at the call.
    pub realtime_ns: u64,
    /// TSC frequency.
    pub clock: Clock,
    /// Store limits.
    pub limits: CallLimits,
    /// Where to stream the output while the tool runs (None: keep it all for the answer).
    pub link: Option<Link>,
}

impl Ctx {
    /// A fresh context. Fails when the shared directories do not fit the limits or their tree
    /// is malformed.
    pub fn new(p: CtxParams) -> Result<Self, String> {
        let host = GuestHost {
            rng: ChaCha20Rng::from_seed(p.seed),
            realtime_ns: p.realtime_ns,
            started_tsc: clock::now(),
            clock: p.clock,
        };
        let wasi = WasiCtx::new(p.wasi, host).map_err(|e| alloc::format!("{e}"))?;
        Ok(Self {
            wasi,
            limits: p.limits,
            link: p.link,
        })
    }

    /// What each shared directory holds now, in the order they were shared.
    pub fn take_dirs(&mut self) -> Result<Vec<Vec<Entry>>, String> {
        self.wasi
            .take_dirs()
            .map_err(|e| alloc::format!("cannot export the shared directories: {e}"))
    }
}

/// The tool's memory: its export named `memory`. Without one, every WASI call traps, as
/// wasmtime-wasi's (wiggle's) glue does, even those that touch no memory.
fn memory(caller: &mut Caller<'_, Ctx>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(mem)) => Ok(mem),
        _ => Err(wasmtime::Error::msg("missing required memory export")),
    }
}

/// For a streaming call, sends the unsent output if `when` says so ([`crate::stream`]). The
/// host closed the connection if this fails: the error ends the call.
fn stream(caller: &mut Caller<'_, Ctx>, when: When) -> wasmtime::Result<()> {
    let ctx = caller.data_mut();
    if let Some(link) = &mut ctx.link {
        link.send(when, &mut ctx.wasi.stdout, &mut ctx.wasi.stderr)
            .map_err(wasmtime::Error::new)?;
    }
    Ok(())
}

/// Runs `f` on the tool's memory and the WASI context.
fn with_mem(
    caller: &mut Caller<'_, Ctx>,
    f: impl FnOnce(&mut [u8], &mut WasiCtx<GuestHost>) -> Result<(), Errno>,
) -> wasmtime::Result<i32> {
    let mem = memory(caller)?;
    let (data, ctx) = mem.data_and_store_mut(caller);
    Ok(to_code(f(data, &mut ctx.wasi)))
}

/// Runs `f` on the WASI context alone (functions that touch no memory; the tool must still
/// export one).
fn with_ctx(
    caller: &mut Caller<'_, Ctx>,
    f: impl FnOnce(&mut WasiCtx<GuestHost>) -> Result<(), Errno>,
) -> wasmtime::Result<i32> {
    memory(caller)?;
    Ok(to_code(f(&mut caller.data_mut().wasi)))
}

/// Adds the WASI preview 1 functions to `linker`.
pub fn add_to_linker(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    type C<'a> = Caller<'a, Ctx>;
    linker.func_wrap(MODULE, "args_sizes_get", |mut c: C<'_>, a: u32, b: u32| {
        with_mem(&mut c, |m, w| w.args_sizes_get(m, a, b))
    })?;
    linker.func_wrap(MODULE, "args_get", |mut c: C<'_>, a: u32, b: u32| {
        with_mem(&mut c, |m, w| w.args_get(m, a, b))
    })?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut c: C<'_>, a: u32, b: u32| with_mem(&mut c, |m, w| w.environ_sizes_get(m, a, b)),
    )?;
    linker.func_wrap(MODULE, "environ_get", |mut c: C<'_>, a: u32, b: u32| {
        with_mem(&mut c, |m, w| w.environ_get(m, a, b))
    })?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: C<'_>, id: u32, out: u32| with_mem(&mut c, |m, w| w.clock_res_get(m, id, out)),
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: C<'_>, id: u32, precision: u64, out: u32| {
            let code = with_mem(&mut c, |m, w| w.clock_time_get(m, id, precision, out))?;
            stream(&mut c, When::Due)?;
            Ok(code)
        },
    )?;
    linker.func_wrap(MODULE, "random_get", |mut c: C<'_>, buf: u32, len: u32| {
        with_mem(&mut c, |m, w| w.random_get(m, buf, len))
    })?;
    linker.func_wrap(MODULE, "sched_yield", |mut c: C<'_>| {
        let code = with_ctx(&mut c, |_| Ok(()))?;
        stream(&mut c, When::Due)?;
        Ok(code)
    })?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut c: C<'_>, subs: u32, events: u32, count: u32, nevents: u32| {
            // It may sleep: what the tool wrote goes out first.
            stream(&mut c, When::Now)?;
            with_mem(&mut c, |m, w| {
                w.poll_oneoff(m, subs, events, count, nevents)
            })
        },
    )?;
    linker.func_wrap(MODULE, "proc_exit", |code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Exit(code)))
    })?;
    linker.func_wrap(MODULE, "proc_raise", |mut c: C<'_>, _sig: u32| {
        with_ctx(&mut c, |_| Err(Errno::NotSup))
    })?;
    add_fd(linker)?;
    add_path(linker)?;
    for name in ["sock_accept", "sock_recv", "sock_send", "sock_shutdown"] {
        linker.func_new(
            MODULE,
            name,
            sock_type(name, linker.engine()),
            |mut c, params, results| {
                let fd = match params.first() {
                    Some(wasmtime::Val::I32(fd)) => u32::from_ne_bytes(fd.to_ne_bytes()),
                    _ => u32::MAX,
                };
                results[0] = wasmtime::Val::I32(with_ctx(&mut c, |w| w.sock(fd))?);
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// The `fd_*` functions.
fn add_fd(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    type C<'a> = Caller<'a, Ctx>;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, out: u32| {
            let code = with_mem(&mut c, |m, w| w.fd_read(m, fd, iovs, n, None, out))?;
            stream(&mut c, When::Due)?;
            Ok(code)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pread",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, at: u64, out: u32| {
            with_mem(&mut c, |m, w| w.fd_read(m, fd, iovs, n, Some(at), out))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, out: u32| {
            let code = with_mem(&mut c, |m, w| w.fd_write(m, fd, iovs, n, None, out))?;
            stream(&mut c, When::Due)?;
            Ok(code)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_pwrite",
        |mut c: C<'_>, fd: u32, iovs: u32, n: u32, at: u64, out: u32| {
            let code = with_mem(&mut c, |m, w| w.fd_write(m, fd, iovs, n, Some(at), out))?;
            stream(&mut c, When::Due)?;
            Ok(code)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |mut c: C<'_>, fd: u32, offset: i64, whence: u32, out: u32| {
            with_mem(&mut c, |m, w| w.fd_seek(m, fd, offset, whence, out))
        },
    )?;
    linker.func_wrap(MODULE, "fd_tell", |mut c: C<'_>, fd: u32, out: u32| {
        with_mem(&mut c, |m, w| w.fd_tell(m, fd, out))
    })?;
    linker.func_wrap(MODULE, "fd_close", |mut c: C<'_>, fd: u32| {
        with_ctx(&mut c, |w| w.fd_close(fd))
    })?;
    linker.func_wrap(MODULE, "fd_renumber", |mut c: C<'_>, from: u32, to: u32| {
        with_ctx(&mut c, |w| w.fd_renumber(from, to))
    })?;
    for name in ["fd_sync", "fd_datasync"] {
        linker.func_wrap(MODULE, name, |mut c: C<'_>, fd: u32| {
            with_ctx(&mut c, |w| w.fd_sync(fd))
        })?;
    }
    linker.func_wrap(
        MODULE,
        "fd_advise",
        |mut c: C<'_>, fd: u32, offset: u64, len: u64, advice: u32| {
            with_ctx(&mut c, |w| w.fd_advise(fd, offset, len, advice))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_allocate",
        |mut c: C<'_>, fd: u32, offset: u64, len: u64| {
            with_ctx(&mut c, |w| w.fd_allocate(fd, offset, len))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: C<'_>, fd: u32, out: u32| with_mem(&mut c, |m, w| w.fd_fdstat_get(m, fd, out)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |mut c: C<'_>, fd: u32, flags: u32| with_ctx(&mut c, |w| w.fd_fdstat_set_flags(fd, flags)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_rights",
        |mut c: C<'_>, fd: u32, base: u64, inheriting: u64| {
            with_ctx(&mut c, |w| w.fd_fdstat_set_rights(fd, base, inheriting))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_get",
        |mut c: C<'_>, fd: u32, out: u32| with_mem(&mut c, |m, w| w.fd_filestat_get(m, fd, out)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_size",
        |mut c: C<'_>, fd: u32, size: u64| with_ctx(&mut c, |w| w.fd_filestat_set_size(fd, size)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_filestat_set_times",
        |mut c: C<'_>, fd: u32, atim: u64, mtim: u64, flags: u32| {
            with_ctx(&mut c, |w| w.fd_filestat_set_times(fd, atim, mtim, flags))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_readdir",
        |mut c: C<'_>, fd: u32, buf: u32, len: u32, cookie: u64, out: u32| {
            with_mem(&mut c, |m, w| w.fd_readdir(m, fd, buf, len, cookie, out))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |mut c: C<'_>, fd: u32, out: u32| with_mem(&mut c, |m, w| w.fd_prestat_get(m, fd, out)),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |mut c: C<'_>, fd: u32, buf: u32, len: u32| {
            with_mem(&mut c, |m, w| w.fd_prestat_dir_name(m, fd, buf, len))
        },
    )?;
    Ok(())
}

/// The `path_*` functions.
fn add_path(linker: &mut Linker<Ctx>) -> wasmtime::Result<()> {
    type C<'a> = Caller<'a, Ctx>;
    linker.func_wrap(
        MODULE,
        "path_open",
        |mut c: C<'_>,
         dirfd: u32,
         lookup: u32,
         p: u32,
         len: u32,
         oflags: u32,
         base: u64,
         inheriting: u64,
         fdflags: u32,
         out: u32| {
            with_mem(&mut c, |m, w| {
                w.path_open(
                    m, dirfd, lookup, p, len, oflags, base, inheriting, fdflags, out,
                )
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_create_directory",
        |mut c: C<'_>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |m, w| w.path_create_directory(m, dirfd, p, len))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_remove_directory",
        |mut c: C<'_>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |m, w| w.path_remove_directory(m, dirfd, p, len))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_unlink_file",
        |mut c: C<'_>, dirfd: u32, p: u32, len: u32| {
            with_mem(&mut c, |m, w| w.path_unlink_file(m, dirfd, p, len))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_rename",
        |mut c: C<'_>, fd1: u32, p1: u32, l1: u32, fd2: u32, p2: u32, l2: u32| {
            with_mem(&mut c, |m, w| w.path_rename(m, fd1, p1, l1, fd2, p2, l2))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_link",
        |mut c: C<'_>, fd1: u32, flags: u32, p1: u32, l1: u32, fd2: u32, p2: u32, l2: u32| {
            with_mem(&mut c, |m, w| {
                w.path_link(m, fd1, flags, p1, l1, fd2, p2, l2)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_get",
        |mut c: C<'_>, dirfd: u32, flags: u32, p: u32, len: u32, out: u32| {
            with_mem(&mut c, |m, w| {
                w.path_filestat_get(m, dirfd, flags, p, len, out)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_filestat_set_times",
        |mut c: C<'_>, dirfd: u32, flags: u32, p: u32, len: u32, atim: u64, mtim: u64, fst: u32| {
            with_mem(&mut c, |m, w| {
                w.path_filestat_set_times(m, dirfd, flags, p, len, atim, mtim, fst)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_symlink",
        |mut c: C<'_>, p1: u32, l1: u32, dirfd: u32, p2: u32, l2: u32| {
            with_mem(&mut c, |m, w| w.path_symlink(m, p1, l1, dirfd, p2, l2))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "path_readlink",
        |mut c: C<'_>, dirfd: u32, p: u32, len: u32, buf: u32, buf_len: u32, used: u32| {
            with_mem(&mut c, |m, w| {
                w.path_readlink(m, dirfd, p, len, buf, buf_len, used)
            })
        },
    )?;
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
