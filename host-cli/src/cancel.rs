//! A call's cancel token: whoever holds a clone can stop the call at once.
//!
//! Cancelling sets a flag that the call's waits poll (the compile worker, an in-process run) and
//! kills the call's VMM, if one is running, so a call blocked reading the VM's answer sees the
//! connection close instead of waiting for its deadline. `bulwark run` cancels its one call on
//! Ctrl-C, SIGTERM or SIGHUP (`interrupt`); the server cancels a call whose client went away, and
//! every call still running at a second stop signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// A cheap, cloneable handle that cancels one call.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<State>);

#[derive(Debug, Default)]
struct State {
    cancelled: AtomicBool,
    /// The VMM process of the call (0: none). Held under the lock while it is signalled, and
    /// cleared under it before the VMM is reaped, so the pid never names another process.
    vmm: Mutex<libc::pid_t>,
}

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the call: sets the flag and kills its VMM, if it has one running.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let vmm = self.0.vmm.lock().unwrap_or_else(PoisonError::into_inner);
        if *vmm > 0 {
            // SAFETY: kill(2) on a child process the call spawned and has not reaped: `forget_vmm`
            // clears the pid under this lock before the reap, so it cannot name another process.
            unsafe {
                libc::kill(*vmm, libc::SIGKILL);
            }
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Notes the VMM process to kill on cancel; killed at once if the call is cancelled already.
    pub fn watch_vmm(&self, pid: u32) {
        let mut vmm = self.0.vmm.lock().unwrap_or_else(PoisonError::into_inner);
        *vmm = libc::pid_t::try_from(pid).unwrap_or(0);
        if self.is_cancelled() && *vmm > 0 {
            // SAFETY: as in `cancel`: our unreaped child, under the lock.
            unsafe {
                libc::kill(*vmm, libc::SIGKILL);
            }
        }
    }

    /// Forgets the VMM process; call before reaping it.
    pub fn forget_vmm(&self) {
        *self.0.vmm.lock().unwrap_or_else(PoisonError::into_inner) = 0;
    }
}

/// The cancel tokens of the calls a long-lived process (`bulwark serve`, `bulwark mcp`) is
/// running now, so that all of them can be cancelled at once.
#[derive(Debug, Default)]
pub struct Running {
    next: std::sync::atomic::AtomicU64,
    calls: Mutex<std::collections::HashMap<u64, Cancel>>,
}

impl Running {
    /// Notes `cancel` as running until the returned guard drops.
    pub fn enter(self: &Arc<Self>, cancel: &Cancel) -> Entered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, cancel.clone());
        Entered {
            running: Arc::clone(self),
            id,
        }
    }

    /// Cancels every call running now; how many there were.
    pub fn cancel_all(&self) -> usize {
        let calls = self.lock();
        for c in calls.values() {
            c.cancel();
        }
        calls.len()
    }

    /// Whether no call is running.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Cancel>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A call's place in [`Running`]: dropping it forgets the call there.
#[derive(Debug)]
pub struct Entered {
    running: Arc<Running>,
    id: u64,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.running.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_kills_the_watched_process_and_is_seen_by_every_clone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let token = Cancel::new();
        let clone = token.clone();
        token.watch_vmm(child.id());
        assert!(!clone.is_cancelled());
        clone.cancel();
        assert!(token.is_cancelled());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        token.forget_vmm();
    }

    #[test]
    fn a_process_watched_after_cancel_is_killed_at_once() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let token = Cancel::new();
        token.cancel();
        token.watch_vmm(child.id());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn running_calls_are_cancelled_together_and_forgotten_when_done() {
        let running = Arc::new(Running::default());
        let (a, b) = (Cancel::new(), Cancel::new());
        let entered_a = running.enter(&a);
        {
            let _entered_b = running.enter(&b);
            assert!(!running.is_empty());
        }
        assert_eq!(running.cancel_all(), 1, "b was done, only a still runs");
        assert!(a.is_cancelled() && !b.is_cancelled());
        drop(entered_a);
        assert!(running.is_empty());
    }
}
