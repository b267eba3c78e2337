//! Runs tool calls: loads the artifact the VMM mapped into the artifact window in place
//! (`Module::deserialize_raw`: nothing is copied), keeps the loaded module for the VM's life, and
//! runs each call in a fresh store with WASI, store limits and, when the call has a fuel budget,
//! fuel.
//!
//! The VMM maps the artifact before the guest starts (`--artifact-from-stdin`) or while it runs
//! (`--artifact-later`, for warm VMs): either way the boot info's `artifact_size` says how much
//! is mapped, and the agent reads it when a call needs the artifact, not before.
//!
//! Fuel metering is compiled into an artifact only for calls that ask for it
//! ([`bulwark_engine::Metering`]), so the agent has one engine and linker per variant: the
//! unmetered one from the start, the metered one made when the first call with a fuel budget
//! comes (creating it costs about what the unmetered one cost at start-up; most VMs never need
//! it). A call's artifact is deserialized by the engine of the call's variant, which refuses an
//! artifact compiled for the other: unmetered code never runs a call that asked for fuel.

use alloc::format;
use core::ptr::NonNull;

use bulwark_abi::boot::BootInfo;
use bulwark_abi::layout;
use bulwark_engine::Metering;
use bulwark_proto::call::{
    Artifact, MAX_SHARED_DIRS, Outcome, PROTOCOL_VERSION, Request, Response,
};
use wasmtime::{Engine, Linker, Module, Store};

use crate::clock::{self, Clock};
use crate::stream::Link;
use crate::wasi::{self, Ctx, CtxParams, Exit};

/// One metering variant's engine and the WASI linker made for it.
struct Runtime {
    engine: Engine,
    linker: Linker<Ctx>,
}

impl Runtime {
    fn new(engine: Engine) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker)?;
        Ok(Self { engine, linker })
    }
}

/// The window's artifact, once loaded: wasmtime registers its code by address, so one
/// mapping is loaded once, under the digest and variant of the call that loaded it.
struct Loaded {
    digest: [u8; 32],
    metering: Metering,
    module: Module,
}

/// The agent's engines, linkers and artifact cache.
pub struct Agent {
    /// For calls without a fuel budget.
    unmetered: Runtime,
    /// For calls with one; made when the first such call comes.
    metered: Option<Runtime>,
    /// The window's artifact, once a call loaded it.
    loaded: Option<Loaded>,
    clock: Clock,
}

impl Agent {
    /// An agent whose unmetered calls use `engine`, which must be made from
    /// `runtime::config()` (no fuel metering); the metered engine is made when needed. Calls run
    /// the artifact the VMM mapped into the artifact window ([`mapped_window`]).
    pub fn new(engine: Engine, clock: Clock) -> wasmtime::Result<Self> {
        Ok(Self {
            unmetered: Runtime::new(engine)?,
            metered: None,
            loaded: None,
            clock,
        })
    }

    /// The engine and linker of `metering`, made now if this is the first call that needs them.
    fn runtime(&mut self, metering: Metering) -> Result<&Runtime, Outcome> {
        match metering {
            Metering::None => Ok(&self.unmetered),
            Metering::Fuel => match &mut self.metered {
                Some(runtime) => Ok(runtime),
                slot @ None => {
                    let made = Engine::new(&crate::runtime::config_for(Metering::Fuel))
                        .and_then(Runtime::new)
                        .map_err(|e| {
                            Outcome::AgentFailed(format!(
                                "cannot create the fuel-metered engine: {e}"
                            ))
                        })?;
                    Ok(slot.insert(made))
                }
            },
        }
    }

    /// The module for `artifact` in the engine of `metering`, and the microseconds it took to
    /// get it ready (the metered engine's creation included, when this call made it).
    fn module(&mut self, artifact: Artifact, metering: Metering) -> Result<(Module, u64), Outcome> {
        if let Some(loaded) = &self.loaded {
            if loaded.digest != artifact.digest {
                return Err(Outcome::Refused(
                    "the request names another module than the one this VM has mapped".into(),
                ));
            }
            if loaded.metering != metering {
                return Err(Outcome::Refused(format!(
                    "this VM's artifact is loaded as {} code; the call needs {} code",
                    loaded.metering.name(),
                    metering.name()
                )));
            }
            return Ok((loaded.module.clone(), 0));
        }
        let window = mapped_window()?;
        if window.is_empty() {
            return Err(Outcome::Refused(
                "this VM has no artifact mapped (the VMM maps one with --artifact-from-stdin, or when it is sent one after --artifact-later; a call must wait for that)".into(),
            ));
        }
        if u64::try_from(window.len()).ok() != Some(artifact.size) {
            return Err(Outcome::Refused(format!(
                "the request names a {}-byte artifact, but this VM has {} bytes mapped",
                artifact.size,
                window.len()
            )));
        }
        let t = clock::now();
        let engine = self.runtime(metering)?.engine.clone();
        // SAFETY: the window is the artifact the host compiled with
        // bulwark_engine::compiler_config and mapped through the VMM, read-only (in the page
        // tables and, where KVM allows, in the memory slot) and unchanged for the VM's life,
        // which outlives every module (`window` is 'static: see `mapped_window`). Deserializing
        // checks that its
        // wasmtime version and engine settings (fuel metering among them) match this engine's
        // and refuses anything else. The host is trusted to hand over its own compiler's output
        // (the tool's code itself is untrusted, but it runs as Wasm).
        let module =
            unsafe { Module::deserialize_raw(&engine, NonNull::from(window)) }.map_err(|e| {
                Outcome::Refused(format!(
                    "cannot load the artifact as {} code: {e}",
                    metering.name()
                ))
            })?;
        let load_us = self.clock.micros(clock::now().wrapping_sub(t));
        self.loaded = Some(Loaded {
            digest: artifact.digest,
            metering,
            module: module.clone(),
        });
        Ok((module, load_us))
    }

    /// Runs one call. With `link` (a call with `Request::stream`), the tool's output is sent
    /// while it runs ([`crate::stream`]) and the answer's `stdout` and `stderr` hold only what
    /// was not sent yet; the link is dropped when the call ends.
    pub fn call(&mut self, req: Request, link: Option<Link>) -> Response {
        let mut response = Response::new(Outcome::Exited(0));
        if req.dirs.len() > MAX_SHARED_DIRS {
            response.outcome = Outcome::Refused(format!(
                "{} shared directories, over the limit of {MAX_SHARED_DIRS}",
                req.dirs.len()
            ));
            return response;
        }
        if req.version != PROTOCOL_VERSION {
            response.outcome = Outcome::Refused(format!(
                "protocol version {} is not {PROTOCOL_VERSION}",
                req.version
            ));
            return response;
        }
        // The call's variant: fuel metering only with a fuel budget.
        let metering = Metering::of(req.limits.fuel);
        let (module, load_us) = match self.module(req.artifact, metering) {
            Ok(m) => m,
            Err(outcome) => {
                response.outcome = outcome;
                return response;
            }
        };
        response.timings.load_us = load_us;
        let limits = bulwark_engine::store_limits(req.limits.max_memory);
        crate::linear_memory::set_call_budget(req.limits.max_memory);
        let ctx = Ctx::new(CtxParams {
            wasi: bulwark_wasi::Params {
                args: req.args,
                env: req.env,
                stdin: req.stdin,
                dirs: req.dirs,
                fs_limits: bulwark_memfs::Limits {
                    max_bytes: req.limits.max_dir_bytes,
                    // Each shared directory's root is an inode on top of the entry limit.
                    max_inodes: usize::try_from(req.limits.max_dir_entries)
                        .unwrap_or(usize::MAX)
                        .saturating_add(MAX_SHARED_DIRS),
                },
                max_output: usize::try_from(req.limits.max_output).unwrap_or(usize::MAX),
            },
            seed: req.random_seed,
            realtime_ns: req.realtime_ns,
            clock: self.clock,
            limits,
            link,
        });
        let clock = self.clock;
        let ctx = match ctx {
            Ok(ctx) => ctx,
            Err(message) => {
                response.outcome = Outcome::Refused(message);
                return response;
            }
        };
        let runtime = match self.runtime(metering) {
            Ok(r) => r,
            Err(outcome) => {
                response.outcome = outcome;
                return response;
            }
        };
        let t0 = clock::now();
        let mut store = Store::new(&runtime.engine, ctx);
        store.limiter(|ctx| &mut ctx.limits);
        // The guest's epoch never advances (the host enforces the wall-clock deadline by
        // ending the VM): the epoch checks compiled in never fire.
        store.set_epoch_deadline(u64::MAX);
        // Only the metered engine has fuel to set.
        if let Some(fuel) = req.limits.fuel
            && let Err(e) = store.set_fuel(fuel)
        {
            response.outcome = Outcome::AgentFailed(format!("cannot set fuel: {e}"));
            return response;
        }
        let instance = runtime.linker.instantiate(&mut store, &module);
        let t1 = clock::now();
        response.timings.instantiate_us = clock.micros(t1.wrapping_sub(t0));
        let mut started = false;
        let result = instance.and_then(|instance| {
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            started = true;
            start.call(&mut store, ())
        });
        response.timings.run_us = clock.micros(clock::now().wrapping_sub(t1));
        response.outcome = match result {
            Ok(()) => Outcome::Exited(0),
            Err(e) => outcome_of(&e, started),
        };
        if let Some(fuel) = req.limits.fuel {
            response.fuel_consumed = store.get_fuel().ok().map(|left| fuel.saturating_sub(left));
        }
        let mut ctx = store.into_data();
        match ctx.take_dirs() {
            Ok(dirs) => response.dirs = dirs,
            Err(message) => response.outcome = Outcome::AgentFailed(message),
        }
        response.output_truncated = ctx.wasi.stdout.truncated || ctx.wasi.stderr.truncated;
        // All of it, or for a streaming call what was not sent yet.
        response.stdout = ctx.wasi.stdout.take();
        response.stderr = ctx.wasi.stderr.take();
        response
    }
}

/// The boot info's `artifact_size` as it is now: 0 until the VMM has mapped an artifact, then
/// its size for the VM's life (see [`BootInfo::artifact_size`]).
pub fn artifact_size_now() -> u64 {
    let at = (layout::BOOT_INFO + BootInfo::ARTIFACT_SIZE_OFFSET as u64) as *const u64;
    // SAFETY: `guest_main` checked that the boot info is at BOOT_INFO, a user-readable page
    // mapped for the VM's life; the field is 8-aligned (repr(C), 8-byte fields before it). The
    // VMM may write it while the guest runs (one aligned 8-byte store), hence the volatile read.
    unsafe { core::ptr::read_volatile(at) }
}

/// The artifact the VMM has mapped so far: empty before it has, else its bytes at
/// [`layout::ARTIFACT_START`]. The size is read from the boot info now and checked again
/// against the window's size: it is the VMM's word, but the guest trusts no size it has not
/// bounded.
fn mapped_window() -> Result<&'static [u8], Outcome> {
    let size = artifact_size_now();
    if size > layout::ARTIFACT_MAX_SIZE {
        return Err(Outcome::AgentFailed(format!(
            "the boot info says {size} artifact bytes are mapped, more than the window holds"
        )));
    }
    let size = usize::try_from(size)
        .map_err(|_| Outcome::AgentFailed("the artifact's size does not fit usize".into()))?;
    // SAFETY: the VMM writes a non-zero size only once the artifact's memory slot covers
    // `size` bytes at ARTIFACT_START (at start, or after `--artifact-later`'s mapping), never
    // changes it after, and keeps the slot for the VM's whole life; the page tables map the
    // whole window read-only, so nothing in the guest writes these bytes. Size 0 is an empty
    // slice, which touches no memory.
    Ok(unsafe { core::slice::from_raw_parts(layout::ARTIFACT_START as *const u8, size) })
}

/// Classifies a failed instantiation or run (`started`: `_start` was called).
fn outcome_of(e: &wasmtime::Error, started: bool) -> Outcome {
    let exit = e.downcast_ref::<Exit>().map(|Exit(code)| *code);
    bulwark_engine::outcome_of(e, exit, started)
}
