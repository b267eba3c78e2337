//! The warm pool: VMs booted to "agent listening" before any call needs them.
//!
//! There is one pool per runtime ([`Runtime`]): plain Wasm modules, Python and JavaScript
//! code. They differ in what backs the guest heap: Wasm tools mostly touch little memory and
//! get small pages by default (`--pool-pages`), the language runtimes touch tens of MiB and get
//! huge pages. A permanent spawner thread per runtime keeps its target of VMs ready (it must be
//! permanent: a VMM dies with the thread that spawned it, `PR_SET_PDEATHSIG`). A call takes one, has its artifact mapped
//! into it (`vm::Vm::provide_artifact`), runs, and the VM is destroyed: a pooled VM never
//! serves two calls, so no call runs where another tenant's ran. A reaper thread kills and
//! reaps used VMs off the call's path. A call the pool cannot serve (it needs more RAM than a
//! pooled VM has, asks to be measured, or finds the pool empty) starts its own VM, as
//! `bulwark run` does.
//!
//! With `--reuse`, a call that names its tenant may instead get a VM kept from an earlier call
//! of the same tenant and module ([`ReuseKey`]) with at least the RAM it needs. Such a VM is
//! started reusable (not taken from the pool: its snapshot must be taken before anything
//! connects to its agent) with the RAM of a pooled VM, or more if the call needs it (so that
//! the key's later calls fit, whatever the size of their input), given its artifact,
//! snapshotted, and serves the call. When a call ends cleanly ([`CallEnd::Clean`]),
//! its VM is reset to the snapshot by a resetter thread, off the call's path, and, once the
//! VMM answered OK and the agent listens again, kept idle for the next call of that key (a
//! call of that key that finds none idle waits for one being reset); any other end, or a
//! failed reset, kills it. Kept VMs
//! are killed beyond `--reuse-idle` (oldest first), after `--reuse-ttl` idle, and when the
//! server stops. A kept VM serves one call at a time: it is taken out of the idle store.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cache::Entry;
use crate::call::{CallEnd, FreshVm, ReuseKey, VmRequest, VmSource};
use crate::vm::{HeapPages, Vm};

/// What a pooled VM is kept for: each runtime has its own pool, target and heap pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A WebAssembly module of the caller's.
    Wasm,
    /// Python code, run by the CPython runtime.
    Python,
    /// JavaScript code, run by the QuickJS runtime.
    Javascript,
}

impl Runtime {
    /// Every runtime, in the order of [`PoolStatus::runtimes`].
    pub const ALL: [Runtime; 3] = [Runtime::Wasm, Runtime::Python, Runtime::Javascript];

    fn index(self) -> usize {
        match self {
            Runtime::Wasm => 0,
            Runtime::Python => 1,
            Runtime::Javascript => 2,
        }
    }
}

/// One runtime's pool: how many VMs it keeps ready and what backs their heap.
#[derive(Clone, Copy, Debug)]
pub struct RuntimePolicy {
    /// VMs kept ready.
    pub target: usize,
    /// What backs their guest heap.
    pub pages: HeapPages,
}

/// One runtime's pool in `GET /v1/pool`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RuntimeStatus {
    /// The runtime.
    pub runtime: Runtime,
    /// VMs it keeps ready.
    pub target: usize,
    /// VMs ready now.
    pub ready: usize,
    /// Whether their guest heap is on 4 KiB pages (else on transparent huge pages).
    pub small_pages: bool,
    /// Calls it served.
    pub hits: u64,
    /// Calls of this runtime that found it empty and started their own VM.
    pub misses: u64,
}

/// How long the spawner waits after a VM failed to start before it tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long a pooled VM may take to get its agent listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reset (and the agent listening again after it) may take before the VM is
/// killed instead of kept.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the reaper looks for kept VMs idle past `--reuse-ttl`, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which VMs may serve more than one call (`bulwark serve --reuse`, `--reuse-idle`,
/// `--reuse-ttl`).
#[derive(Clone, Copy, Debug)]
pub struct ReusePolicy {
    /// Calls that name a tenant may get a VM kept from an earlier call of the same key.
    pub enabled: bool,
    /// Most VMs kept idle, all keys together; the oldest is killed beyond it.
    pub max_idle: usize,
    /// A VM kept idle longer than this is killed.
    pub ttl: Duration,
    /// A VM whose VMM holds more memory than this (bytes) after its reset is killed instead of
    /// kept.
    pub max_rss: u64,
}

/// The reuse figures in `GET /v1/pool`.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ReuseStatus {
    /// Whether reuse is on (`--reuse`).
    pub enabled: bool,
    /// Most VMs kept idle (`--reuse-idle`).
    pub max_idle: usize,
    /// How long a VM is kept idle at most, in milliseconds (`--reuse-ttl`).
    pub ttl_ms: u64,
    /// VMs kept idle now, reset and ready for their key's next call.
    pub idle: usize,
    /// VMs being reset now (their call ended cleanly a moment ago).
    pub resetting: usize,
    /// Reusable VMs started (the first call of a key, or none was idle).
    pub started: u64,
    /// Calls served by a kept VM (reuses).
    pub hits: u64,
    /// Resets that succeeded.
    pub resets: u64,
    /// Resets that failed, and kept VMs found dead (each VM was killed).
    pub reset_failures: u64,
    /// How long the last reset took in the VMM, in microseconds.
    pub last_reset_us: Option<u64>,
    /// Pages of guest RAM the last reset's call had written.
    pub last_reset_pages: Option<u64>,
    /// Reusable VMs killed because their call did not end cleanly (a trap, a timeout, cut
    /// output, an error, a cancel).
    pub not_kept: u64,
    /// Kept VMs killed to stay within `--reuse-idle`.
    pub evicted: u64,
    /// Kept VMs killed after `--reuse-ttl` idle.
    pub expired: u64,
    /// VMs killed after their reset instead of kept: their VMM held more than
    /// `--reuse-max-rss`.
    pub too_big: u64,
    /// Reusable VMs that failed to start, take their artifact or snapshot (the call then got
    /// a VM of its own).
    pub start_failures: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// What `GET /v1/pool` shows.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// VMs the pool keeps ready, all runtimes together.
    pub target: usize,
    /// VMs ready now, all runtimes together.
    pub ready: usize,
    /// Each runtime's pool.
    pub runtimes: Vec<RuntimeStatus>,
    /// RAM of each pooled VM, in MiB.
    pub mem_mib: u64,
    /// Calls served by a pooled VM.
    pub hits: u64,
    /// Calls that started their own VM: the pool was empty.
    pub misses: u64,
    /// Calls that started their own VM because a pooled one could not serve them (more RAM, a
    /// measured call).
    pub bypassed: u64,
    /// VMs the pool started.
    pub started: u64,
    /// VMs that failed to start or to take their artifact.
    pub failures: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// VMs kept for reuse.
    pub reuse: ReuseStatus,
}

/// A VM kept for the next call of its key.
struct Kept {
    /// The key of the calls it served, with the VM's own RAM as `mem_mib`.
    key: ReuseKey,
    vm: Vm,
    /// When it was kept (reset).
    since: Instant,
}

struct State {
    /// Ready VMs, per runtime ([`Runtime::index`]).
    ready: [VecDeque<Vm>; 3],
    /// VMs kept for reuse, oldest first.
    kept: VecDeque<Kept>,
    /// The keys of the VMs being reset now (each the VM's own RAM as `mem_mib`).
    resetting: Vec<ReuseKey>,
    /// Calls holding a VM from this pool (pooled or their own), until retired.
    in_flight: usize,
    status: PoolStatus,
    stopping: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a VM is taken or the pool stops.
    wake: Condvar,
    /// Signalled when a reset ends (the VM kept, or killed).
    reset_done: Condvar,
    mem_mib: u64,
    /// Each runtime's pool ([`Runtime::index`]).
    runtimes: [RuntimePolicy; 3],
    reuse: ReusePolicy,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the kept VMs idle past the TTL out of the store (to be killed by the caller).
    fn take_expired(&self) -> Vec<Vm> {
        let mut state = self.lock();
        let ttl = self.reuse.ttl;
        let (expired, fresh): (Vec<Kept>, Vec<Kept>) =
            state.kept.drain(..).partition(|k| k.since.elapsed() >= ttl);
        state.kept = fresh.into();
        state.status.reuse.expired += expired.len() as u64;
        expired.into_iter().map(|k| k.vm).collect()
    }
}

/// Asks the reuse spawner thread for a reusable VM of this many MiB; the answer comes back on
/// the sender.
type SpawnRequest = (u64, mpsc::Sender<anyhow::Result<Vm>>);

/// Kills `vm` now and has the reaper wait for it.
fn discard(reaper: &mpsc::Sender<Vm>, mut vm: Vm) {
    vm.kill();
    if let Err(mpsc::SendError(vm)) = reaper.send(vm) {
        drop(vm);
    }
}

/// The resetter thread's work for one VM whose call ended cleanly: resets it to its snapshot
/// and keeps it for `key` (the VM's own RAM as `mem_mib`), or kills it if the reset fails;
/// either way it is no longer counted as resetting.
fn reset_and_keep(inner: &Inner, reaper: &mpsc::Sender<Vm>, mut vm: Vm, key: ReuseKey) {
    let reset = vm.reset(Instant::now() + RESET_TIMEOUT).and_then(|stats| {
        vm.wait_listening(Instant::now() + RESET_TIMEOUT)?;
        Ok(stats)
    });
    let mut state = inner.lock();
    if let Some(at) = state.resetting.iter().position(|k| *k == key) {
        state.resetting.swap_remove(at);
    }
    let over: Vec<Vm> = match reset {
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("bulwark serve: reuse: a reset failed; the VM was killed: {message}");
            state.status.reuse.reset_failures += 1;
            state.status.reuse.last_error = Some(message);
            vec![vm]
        }
        Ok(stats) => {
            let r = &mut state.status.reuse;
            r.resets += 1;
            r.last_reset_us = Some(stats.micros);
            r.last_reset_pages = Some(stats.pages_written);
            // Unknown counts as too big: a VM whose memory cannot be read is not kept.
            let rss = vm
                .rss_kib()
                .map_or(u64::MAX, |kib| kib.saturating_mul(1024));
            if rss > inner.reuse.max_rss {
                r.too_big += 1;
                eprintln!(
                    "bulwark serve: reuse: a VM holding {} MiB after its reset was killed, not kept (--reuse-max-rss {} MiB)",
                    rss >> 20,
                    inner.reuse.max_rss >> 20
                );
                vec![vm]
            } else if state.stopping {
                vec![vm]
            } else {
                state.kept.push_back(Kept {
                    key,
                    vm,
                    since: Instant::now(),
                });
                let excess = state.kept.len().saturating_sub(inner.reuse.max_idle);
                state.status.reuse.evicted += excess as u64;
                state.kept.drain(..excess).map(|k| k.vm).collect()
            }
        }
    };
    drop(state);
    inner.reset_done.notify_all();
    for vm in over {
        discard(reaper, vm);
    }
}

/// The warm pool; a [`VmSource`] for calls.
pub struct Pool {
    inner: Arc<Inner>,
    reaper: mpsc::Sender<Vm>,
    /// The thread that starts reusable VMs (a VMM dies with the thread that spawned it, and a
    /// kept VM outlives its call's thread); `None` without `--reuse`.
    spawner: Option<mpsc::Sender<SpawnRequest>>,
    /// The thread that resets VMs whose call ended cleanly, off the call's path; `None`
    /// without `--reuse`.
    resetter: Option<mpsc::Sender<(Vm, ReuseKey)>>,
}

impl Pool {
    /// Starts the pool's threads: each runtime's target of VMs of `mem_mib` MiB is kept ready
    /// (`runtimes`, in [`Runtime::ALL`]'s order); `reuse` says which VMs may serve more than
    /// one call.
    pub fn start(
        runtimes: [RuntimePolicy; 3],
        mem_mib: u64,
        reuse: ReusePolicy,
    ) -> anyhow::Result<Self> {
        let target = runtimes.iter().map(|r| r.target).sum();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ready: Default::default(),
                kept: VecDeque::new(),
                resetting: Vec::new(),
                in_flight: 0,
                status: PoolStatus {
                    target,
                    mem_mib,
                    runtimes: Runtime::ALL
                        .iter()
                        .zip(&runtimes)
                        .map(|(&runtime, policy)| RuntimeStatus {
                            runtime,
                            target: policy.target,
                            ready: 0,
                            small_pages: policy.pages == HeapPages::Small,
                            hits: 0,
                            misses: 0,
                        })
                        .collect(),
                    reuse: ReuseStatus {
                        enabled: reuse.enabled,
                        max_idle: reuse.max_idle,
                        ttl_ms: u64::try_from(reuse.ttl.as_millis()).unwrap_or(u64::MAX),
                        ..ReuseStatus::default()
                    },
                    ..PoolStatus::default()
                },
                stopping: false,
            }),
            wake: Condvar::new(),
            reset_done: Condvar::new(),
            mem_mib,
            runtimes,
            reuse,
        });
        let (reaper, used) = mpsc::channel::<Vm>();
        let sweeper = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("bulwark-reaper".into())
            .spawn(move || {
                // Dropping a VM kills its VMM and waits for it. With reuse, kept VMs idle past
                // their TTL are killed here too, whether calls come or not.
                let every = SWEEP_EVERY.min(reuse.ttl).max(Duration::from_millis(10));
                loop {
                    match used.recv_timeout(every) {
                        Ok(vm) => drop(vm),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if reuse.enabled {
                        for mut vm in sweeper.take_expired() {
                            vm.kill();
                            drop(vm);
                        }
                    }
                }
            })?;
        let (spawner, resetter) = if reuse.enabled {
            let (tx, requests) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("bulwark-reuse-spawner".into())
                .spawn(move || {
                    for (mem_mib, answer) in requests {
                        let _ = answer.send(Vm::start_reusable(mem_mib));
                    }
                })?;
            let (reset_tx, to_reset) = mpsc::channel::<(Vm, ReuseKey)>();
            let keeper = Arc::clone(&inner);
            let reaper = reaper.clone();
            std::thread::Builder::new()
                .name("bulwark-reuse-reset".into())
                .spawn(move || {
                    for (vm, key) in to_reset {
                        reset_and_keep(&keeper, &reaper, vm, key);
                    }
                })?;
            (Some(tx), Some(reset_tx))
        } else {
            (None, None)
        };
        for runtime in Runtime::ALL {
            if inner.runtimes[runtime.index()].target > 0 {
                let spawner = Arc::clone(&inner);
                std::thread::Builder::new()
                    .name(format!("bulwark-pool-{runtime:?}").to_lowercase())
                    .spawn(move || fill(&spawner, runtime))?;
            }
        }
        Ok(Self {
            inner,
            reaper,
            spawner,
            resetter,
        })
    }

    /// The source of one call's VM: from `runtime`'s pool, or for `tenant` when the call names
    /// one: with `--reuse`, such a call may get a VM kept from an earlier call of the same
    /// tenant and module.
    pub fn for_call(&self, runtime: Runtime, tenant: Option<String>) -> CallVms<'_> {
        CallVms {
            pool: self,
            runtime,
            tenant: tenant.filter(|_| self.inner.reuse.enabled),
        }
    }

    /// The pool's state now.
    pub fn status(&self) -> PoolStatus {
        let state = self.inner.lock();
        let mut status = PoolStatus {
            ready: state.ready.iter().map(VecDeque::len).sum(),
            ..state.status.clone()
        };
        for (runtime, ready) in status.runtimes.iter_mut().zip(&state.ready) {
            runtime.ready = ready.len();
        }
        status.reuse.idle = state.kept.len();
        status.reuse.resetting = state.resetting.len();
        status
    }

    /// Stops refilling and destroys the ready VMs and the kept ones.
    pub fn stop(&self) {
        let (ready, kept): (Vec<Vm>, Vec<Kept>) = {
            let mut state = self.inner.lock();
            state.stopping = true;
            (
                state.ready.iter_mut().flat_map(|r| r.drain(..)).collect(),
                state.kept.drain(..).collect(),
            )
        };
        self.inner.wake.notify_all();
        drop(ready);
        drop(kept);
    }

    /// Kills `vm` now and has the reaper wait for it.
    fn discard(&self, vm: Vm) {
        discard(&self.reaper, vm);
    }

    /// A kept VM for `key` (the same tenant, module and metering, at least the RAM the call
    /// needs), out of the idle store, if one is there and alive: the most recently kept, so
    /// that the others expire when calls slow down. When none is idle but one is being reset
    /// (its call just ended), this waits for that reset, until `deadline` at the latest.
    fn take_kept(&self, key: &ReuseKey, deadline: Instant) -> Option<Vm> {
        let fits = |k: &ReuseKey| {
            k.tenant == key.tenant
                && k.module == key.module
                && k.metered == key.metered
                && k.mem_mib >= key.mem_mib
        };
        let until = deadline.min(Instant::now() + RESET_TIMEOUT);
        loop {
            let kept = {
                let mut state = self.inner.lock();
                let ttl = self.inner.reuse.ttl;
                loop {
                    if let Some(at) = state
                        .kept
                        .iter()
                        .rposition(|k| fits(&k.key) && k.since.elapsed() < ttl)
                    {
                        break state.kept.remove(at)?;
                    }
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || !state.resetting.iter().any(fits) {
                        return None;
                    }
                    state = self
                        .inner
                        .reset_done
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            };
            let mut vm = kept.vm;
            match vm.failure() {
                None => return Some(vm),
                Some(why) => {
                    eprintln!("bulwark serve: reuse: a kept VM ended while idle: {why}");
                    self.count(|s| {
                        s.reuse.reset_failures += 1;
                        s.reuse.last_error = Some(why);
                    });
                    self.discard(vm);
                }
            }
        }
    }

    /// A new reusable VM for `mem_mib`, with `artifact` mapped and its snapshot taken, its
    /// agent listening: started by the reuse spawner thread, readied here before `deadline`.
    fn start_reusable(
        &self,
        spawner: &mpsc::Sender<SpawnRequest>,
        mem_mib: u64,
        artifact: &Entry,
        deadline: Instant,
    ) -> anyhow::Result<Vm> {
        let (tx, rx) = mpsc::channel();
        spawner
            .send((mem_mib, tx))
            .map_err(|_| anyhow::anyhow!("the reuse spawner thread is gone"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut vm = rx
            .recv_timeout(left)
            .map_err(|_| anyhow::anyhow!("a reusable VM did not start in time"))??;
        let readied = vm
            .provide_artifact(artifact, deadline)
            .and_then(|()| vm.snapshot(deadline))
            .and_then(|_pages| vm.wait_listening(deadline));
        match readied {
            Ok(()) => Ok(vm),
            Err(e) => {
                self.discard(vm);
                Err(e)
            }
        }
    }

    fn take(&self, runtime: Runtime) -> Option<Vm> {
        let mut state = self.inner.lock();
        let vm = state.ready[runtime.index()].pop_front();
        if vm.is_some() {
            self.inner.wake.notify_all();
        }
        vm
    }

    fn count(&self, f: impl FnOnce(&mut PoolStatus)) {
        f(&mut self.inner.lock().status);
    }

    /// Counts a VM handed to a call, with `f` on the figures.
    fn handed_out(&self, f: impl FnOnce(&mut PoolStatus)) {
        let mut state = self.inner.lock();
        state.in_flight += 1;
        f(&mut state.status);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The spawner thread of `runtime`: keeps its target of VMs ready until the pool stops. While
/// calls run and a VM is still ready, it waits: starting a VM takes a few milliseconds of CPU,
/// which the calls in flight would otherwise wait for; an empty pool is refilled at once.
fn fill(inner: &Inner, runtime: Runtime) {
    let RuntimePolicy { target, pages } = inner.runtimes[runtime.index()];
    loop {
        {
            let mut state = inner.lock();
            while !state.stopping && {
                let ready = &state.ready[runtime.index()];
                ready.len() >= target || (!ready.is_empty() && state.in_flight > 0)
            } {
                state = inner
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stopping {
                return;
            }
        }
        let started = Vm::start_waiting(inner.mem_mib, false, pages).and_then(|mut vm| {
            vm.wait_listening(Instant::now() + READY_TIMEOUT)?;
            Ok(vm)
        });
        match started {
            Ok(vm) => {
                let mut state = inner.lock();
                state.status.started += 1;
                if state.stopping {
                    return;
                }
                state.ready[runtime.index()].push_back(vm);
            }
            Err(e) => {
                let message = format!("{e:#}");
                eprintln!("bulwark serve: pool: a VM failed to start: {message}");
                {
                    let mut state = inner.lock();
                    state.status.failures += 1;
                    state.status.last_error = Some(message);
                }
                std::thread::sleep(RETRY_AFTER_FAILURE);
            }
        }
    }
}

/// The pool as the VM source of calls of one runtime ([`CallVms`]).
impl Pool {
    /// A VM for `req`: a kept one for its reuse key, else one of `runtime`'s pool, else one
    /// of the call's own.
    fn vm(&self, runtime: Runtime, req: &VmRequest<'_>) -> anyhow::Result<Vm> {
        if let (Some(key), Some(spawner), false) = (req.reuse, &self.spawner, req.measure) {
            if let Some(vm) = self.take_kept(key, req.deadline) {
                self.handed_out(|s| s.reuse.hits += 1);
                return Ok(vm);
            }
            // As big as a pooled VM at least: a later call of the key whose input is a little
            // bigger still fits.
            let vm_mib = req.mem_mib.max(self.inner.mem_mib);
            match self.start_reusable(spawner, vm_mib, req.artifact, req.deadline) {
                Ok(vm) => {
                    self.handed_out(|s| s.reuse.started += 1);
                    return Ok(vm);
                }
                Err(e) => {
                    // The call still runs, in a VM of its own.
                    let message = format!("{e:#}");
                    eprintln!("bulwark serve: reuse: a reusable VM failed to start: {message}");
                    self.count(|s| {
                        s.reuse.start_failures += 1;
                        s.reuse.last_error = Some(message);
                    });
                }
            }
        }
        if req.measure || req.mem_mib > self.inner.mem_mib {
            if req.measure {
                // A measured VM is not given back (`VmRequest::measure`): not counted in
                // flight.
                self.count(|s| s.bypassed += 1);
                return FreshVm.vm(req);
            }
            let vm = FreshVm.vm(req)?;
            self.handed_out(|s| s.bypassed += 1);
            return Ok(vm);
        }
        // A pooled VM that cannot take the artifact (it died, say) is dropped, and the call
        // starts its own.
        while let Some(mut vm) = self.take(runtime) {
            match vm.provide_artifact(req.artifact, req.deadline) {
                Ok(()) => {
                    self.handed_out(|s| {
                        s.hits += 1;
                        s.runtimes[runtime.index()].hits += 1;
                    });
                    return Ok(vm);
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    eprintln!(
                        "bulwark serve: pool: a ready VM could not take its artifact: {message}"
                    );
                    self.count(|s| {
                        s.failures += 1;
                        s.last_error = Some(message);
                    });
                    self.discard(vm);
                }
            }
        }
        let vm = FreshVm.vm(req)?;
        self.handed_out(|s| {
            s.misses += 1;
            s.runtimes[runtime.index()].misses += 1;
        });
        Ok(vm)
    }

    fn give_back(&self, vm: Vm, end: CallEnd, reuse: Option<&ReuseKey>) {
        {
            let mut state = self.inner.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        self.inner.wake.notify_all();
        let reusable = self.inner.reuse.enabled && vm.is_snapshotted();
        match (reuse, &self.resetter) {
            (Some(key), Some(resetter)) if reusable && end == CallEnd::Clean => {
                // The call is over: cancelling it must not kill the VM it leaves.
                let mut vm = vm;
                vm.unwatch();
                let key = ReuseKey {
                    mem_mib: vm.mem_mib(),
                    ..key.clone()
                };
                self.inner.lock().resetting.push(key.clone());
                // Reset off the call's path; the VM is handed out again only once its reset
                // answered OK.
                if let Err(mpsc::SendError((vm, key))) = resetter.send((vm, key)) {
                    reset_and_keep(&self.inner, &self.reaper, vm, key);
                }
            }
            _ => {
                if reusable {
                    self.count(|s| s.reuse.not_kept += 1);
                }
                // Killed here, reaped there: a VM still running its tool (a call that timed
                // out) must not spin on until the reaper has time for it.
                self.discard(vm);
            }
        }
    }
}

/// The VM source of one call: the pool, for the call's tenant (see [`Pool::for_call`]).
pub struct CallVms<'a> {
    pool: &'a Pool,
    runtime: Runtime,
    tenant: Option<String>,
}

impl VmSource for CallVms<'_> {
    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    fn vm(&self, req: &VmRequest<'_>) -> anyhow::Result<Vm> {
        self.pool.vm(self.runtime, req)
    }

    fn give_back(&self, vm: Vm, end: CallEnd, reuse: Option<&ReuseKey>) {
        self.pool.give_back(vm, end, reuse);
    }
}
