//! Ctrl-C, SIGTERM and SIGHUP during `bulwark run`: the call stops at once and everything it made
//! is cleaned up on the normal path out.
//!
//! The handler (on a thread of the `ctrlc` crate, whose `termination` feature adds SIGTERM and
//! SIGHUP to SIGINT) cancels the call's token (`cancel`), which kills the running VMM, if there
//! is one, so a call blocked reading the VM's answer sees the connection close instead of waiting
//! for its deadline. The VM's socket directory and any scratch copies are removed by their
//! owners' `Drop` on the way out; an in-process call polls the token.
//!
//! What no handler can catch (SIGKILL, a crash) still takes the VMM along: it is started with
//! `PR_SET_PDEATHSIG` = SIGKILL (see `vm::Vm::start`), so it never outlives `bulwark`.

use std::sync::OnceLock;

use crate::cancel::Cancel;

/// The token of the process's one call, cancelled by the handler.
static CALL: OnceLock<Cancel> = OnceLock::new();

/// Installs the handler for SIGINT, SIGTERM and SIGHUP, which cancels the returned token (the
/// same one every time). Failing to install it is not fatal: the call then simply cannot be
/// interrupted early (the VMM still dies with this process).
pub fn install() -> Cancel {
    let cancel = CALL.get_or_init(Cancel::new).clone();
    let handler = cancel.clone();
    let _ = ctrlc::set_handler(move || handler.cancel());
    cancel
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
