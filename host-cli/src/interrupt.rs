//! Ctrl-C, SIGTERM and SIGHUP during `bulwark run`: the call stops at once and everything it made
//! is cleaned up on the normal path out.
//!
//! The handler (on a thread of the `ctrlc` crate, whose `termination` feature adds SIGTERM and
//! SIGHUP to SIGINT) sets a flag and kills the running VMM, if there is one, so a call blocked
//! reading the VM's answer sees the connection close instead of waiting for its deadline. The VM's
//! socket directory and any scratch copies are removed by their owners' `Drop` on the way out; an
//! in-process call polls [`requested`].
//!
//! What no handler can catch (SIGKILL, a crash) still takes the VMM along: it is started with
//! `PR_SET_PDEATHSIG` = SIGKILL (see `vm::Vm::start`), so it never outlives `bulwark`.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The VMM process of the call in flight (0: none).
static VMM_PID: AtomicI32 = AtomicI32::new(0);

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Failing to install it is not fatal: the
/// call then simply cannot be interrupted early (the VMM still dies with this process).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        REQUESTED.store(true, Ordering::SeqCst);
        let pid = VMM_PID.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) with a pid we spawned and have not reaped (`forget_vmm` runs
            // before the reap), so it cannot name another process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    });
}

/// Whether Ctrl-C, SIGTERM or SIGHUP arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Notes the VMM process to kill on an interrupt.
pub fn watch_vmm(pid: u32) {
    VMM_PID.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
}

/// Forgets the VMM process; call before reaping it.
pub fn forget_vmm() {
    VMM_PID.store(0, Ordering::SeqCst);
}

/// Makes the calling child process die with its parent: to be called between fork and exec
/// (in a `pre_exec` closure) with `parent`, the parent's pid read before the fork.
///
/// `PR_SET_PDEATHSIG` sends SIGKILL when the thread that forked the child ends, whatever ends it
/// (SIGKILL included). If the parent died before the request took effect, the child has already
/// been adopted by another process: `getppid()` differs from `parent`, and this fails, so the
/// child never runs. Only async-signal-safe calls are made.
pub fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    bulwark_confine::die_with_parent(parent)
}
