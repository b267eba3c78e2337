//! Runs tool calls: deserializes artifacts (kept by digest for the VM's life), and runs each call
//! in a fresh store with WASI, store limits and fuel.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::vec::Vec;

use bulwark_proto::call::{
    Artifact, MAX_SHARED_DIRS, Outcome, PROTOCOL_VERSION, Request, Response,
};
use wasmtime::{Engine, Linker, Module, Store};

use crate::clock::{self, Clock};
use crate::wasi::{self, Ctx, CtxParams, Exit};

/// Most artifacts kept at once; the oldest is dropped past this.
const MAX_CACHED_MODULES: usize = 16;

/// The agent's engine, linker and artifact cache.
pub struct Agent {
    engine: Engine,
    linker: Linker<Ctx>,
    modules: BTreeMap<[u8; 32], Module>,
    order: Vec<[u8; 32]>,
    clock: Clock,
}

impl Agent {
    /// An agent using `engine`.
    pub fn new(engine: Engine, clock: Clock) -> wasmtime::Result<Self> {
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker)?;
        Ok(Self {
            engine,
            linker,
            modules: BTreeMap::new(),
            order: Vec::new(),
            clock,
        })
    }

    fn module(&mut self, artifact: Artifact) -> Result<(Module, u64), Outcome> {
        match artifact {
            Artifact::Cached { digest } => self
                .modules
                .get(&digest)
                .cloned()
                .map(|m| (m, 0))
                .ok_or_else(|| {
                    Outcome::Refused("the VM does not have that artifact cached".into())
                }),
            Artifact::Inline { digest, bytes } => {
                let t = clock::now();
                // SAFETY: the host compiled this artifact with bulwark_engine::compiler_config;
                // deserialize checks that its wasmtime version and engine settings match ours
                // and refuses anything else. The host is trusted to hand over its own compiler's
                // output (the tool's code itself is untrusted, but it runs as Wasm).
                let module = unsafe { Module::deserialize(&self.engine, &bytes) }
                    .map_err(|e| Outcome::Refused(format!("cannot load the artifact: {e}")))?;
                let load_us = self.clock.micros(clock::now().wrapping_sub(t));
                if self.order.len() >= MAX_CACHED_MODULES {
                    let oldest = self.order.remove(0);
                    self.modules.remove(&oldest);
                }
                self.order.push(digest);
                self.modules.insert(digest, module.clone());
                Ok((module, load_us))
            }
        }
    }

    /// Runs one call.
    pub fn call(&mut self, req: Request) -> Response {
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
        let (module, load_us) = match self.module(req.artifact) {
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
        });
        let ctx = match ctx {
            Ok(ctx) => ctx,
            Err(message) => {
                response.outcome = Outcome::Refused(message);
                return response;
            }
        };
        let t0 = clock::now();
        let mut store = Store::new(&self.engine, ctx);
        store.limiter(|ctx| &mut ctx.limits);
        let fuel = req.limits.fuel.unwrap_or(u64::MAX);
        if let Err(e) = store.set_fuel(fuel) {
            response.outcome = Outcome::AgentFailed(format!("cannot set fuel: {e}"));
            return response;
        }
        let instance = self.linker.instantiate(&mut store, &module);
        let t1 = clock::now();
        response.timings.instantiate_us = self.clock.micros(t1.wrapping_sub(t0));
        let mut started = false;
        let result = instance.and_then(|instance| {
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            started = true;
            start.call(&mut store, ())
        });
        response.timings.run_us = self.clock.micros(clock::now().wrapping_sub(t1));
        response.outcome = match result {
            Ok(()) => Outcome::Exited(0),
            Err(e) => outcome_of(&e, started),
        };
        if req.limits.fuel.is_some() {
            response.fuel_consumed = store.get_fuel().ok().map(|left| fuel - left);
        }
        let mut ctx = store.into_data();
        match ctx.take_dirs() {
            Ok(dirs) => response.dirs = dirs,
            Err(message) => response.outcome = Outcome::AgentFailed(message),
        }
        response.output_truncated = ctx.wasi.stdout.truncated || ctx.wasi.stderr.truncated;
        response.stdout = core::mem::take(&mut ctx.wasi.stdout.bytes);
        response.stderr = core::mem::take(&mut ctx.wasi.stderr.bytes);
        response
    }
}

/// Classifies a failed instantiation or run (`started`: `_start` was called).
fn outcome_of(e: &wasmtime::Error, started: bool) -> Outcome {
    let exit = e.downcast_ref::<Exit>().map(|Exit(code)| *code);
    bulwark_engine::outcome_of(e, exit, started)
}
