//! The warm pool: VMs booted to "agent listening" before any call needs them.
//!
//! A permanent spawner thread keeps `target` VMs ready (it must be permanent: a VMM dies with
//! the thread that spawned it, `PR_SET_PDEATHSIG`). A call takes one, has its artifact mapped
//! into it (`vm::Vm::provide_artifact`), runs, and the VM is destroyed: a VM never serves two
//! calls, so no call runs where another tenant's ran. A reaper thread kills and reaps used VMs
//! off the call's path. A call the pool cannot serve (it needs more RAM than a pooled VM has,
//! asks to be measured, or finds the pool empty) starts its own VM, as `bulwark run` does.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cache::Entry;
use crate::call::{FreshVm, VmSource};
use crate::vm::Vm;

/// How long the spawner waits after a VM failed to start before it tries again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// How long a pooled VM may take to get its agent listening.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /v1/pool` shows.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    /// VMs the pool keeps ready.
    pub target: usize,
    /// VMs ready now.
    pub ready: usize,
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
}

struct State {
    ready: VecDeque<Vm>,
    /// Calls holding a VM from this pool (pooled or their own), until retired.
    in_flight: usize,
    status: PoolStatus,
    stopping: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a VM is taken or the pool stops.
    wake: Condvar,
    mem_mib: u64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The warm pool; a [`VmSource`] for calls.
pub struct Pool {
    inner: Arc<Inner>,
    reaper: mpsc::Sender<Vm>,
}

impl Pool {
    /// Starts the pool's threads: `target` VMs of `mem_mib` MiB are kept ready (none when 0).
    pub fn start(target: usize, mem_mib: u64) -> anyhow::Result<Self> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                in_flight: 0,
                status: PoolStatus {
                    target,
                    mem_mib,
                    ..PoolStatus::default()
                },
                stopping: false,
            }),
            wake: Condvar::new(),
            mem_mib,
        });
        let (reaper, used) = mpsc::channel::<Vm>();
        std::thread::Builder::new()
            .name("bulwark-reaper".into())
            .spawn(move || {
                // Dropping a VM kills its VMM and waits for it.
                for vm in used {
                    drop(vm);
                }
            })?;
        if target > 0 {
            let spawner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("bulwark-pool".into())
                .spawn(move || fill(&spawner, target))?;
        }
        Ok(Self { inner, reaper })
    }

    /// The pool's state now.
    pub fn status(&self) -> PoolStatus {
        let state = self.inner.lock();
        PoolStatus {
            ready: state.ready.len(),
            ..state.status.clone()
        }
    }

    /// Stops refilling and destroys the ready VMs.
    pub fn stop(&self) {
        let ready: Vec<Vm> = {
            let mut state = self.inner.lock();
            state.stopping = true;
            state.ready.drain(..).collect()
        };
        self.inner.wake.notify_all();
        drop(ready);
    }

    fn take(&self) -> Option<Vm> {
        let mut state = self.inner.lock();
        let vm = state.ready.pop_front();
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

/// The spawner thread: keeps `target` VMs ready until the pool stops. While calls run and a VM
/// is still ready, it waits: starting a VM takes a few milliseconds of CPU, which the calls in
/// flight would otherwise wait for; an empty pool is refilled at once.
fn fill(inner: &Inner, target: usize) {
    loop {
        {
            let mut state = inner.lock();
            while !state.stopping
                && (state.ready.len() >= target || (!state.ready.is_empty() && state.in_flight > 0))
            {
                state = inner
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stopping {
                return;
            }
        }
        let started = Vm::start_waiting(inner.mem_mib, false).and_then(|mut vm| {
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
                state.ready.push_back(vm);
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

impl VmSource for Pool {
    fn vm(
        &self,
        mem_mib: u64,
        artifact: &Entry,
        deadline: Instant,
        measure: bool,
    ) -> anyhow::Result<Vm> {
        if measure || mem_mib > self.inner.mem_mib {
            if measure {
                // A measured VM is not given back (`VmSource::vm`): not counted in flight.
                self.count(|s| s.bypassed += 1);
                return FreshVm.vm(mem_mib, artifact, deadline, measure);
            }
            let vm = FreshVm.vm(mem_mib, artifact, deadline, measure)?;
            self.handed_out(|s| s.bypassed += 1);
            return Ok(vm);
        }
        // A pooled VM that cannot take the artifact (it died, say) is dropped, and the call
        // starts its own.
        while let Some(mut vm) = self.take() {
            match vm.provide_artifact(artifact, deadline) {
                Ok(()) => {
                    self.handed_out(|s| s.hits += 1);
                    return Ok(vm);
                }
                Err(e) => {
                    vm.kill();
                    let message = format!("{e:#}");
                    eprintln!(
                        "bulwark serve: pool: a ready VM could not take its artifact: {message}"
                    );
                    self.count(|s| {
                        s.failures += 1;
                        s.last_error = Some(message);
                    });
                    let _ = self.reaper.send(vm);
                }
            }
        }
        let vm = FreshVm.vm(mem_mib, artifact, deadline, measure)?;
        self.handed_out(|s| s.misses += 1);
        Ok(vm)
    }

    fn retire(&self, mut vm: Vm, _answered: bool) {
        // Killed here, reaped there: a VM still running its tool (a call that timed out) must
        // not spin on until the reaper has time for it.
        vm.kill();
        {
            let mut state = self.inner.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        self.inner.wake.notify_all();
        if let Err(mpsc::SendError(vm)) = self.reaper.send(vm) {
            drop(vm);
        }
    }
}
