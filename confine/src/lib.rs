//! Confinement of a Bulwark process once its set-up is done: the layers the VMM (and the compile
//! worker) put on themselves between "build" and "run", so that what they do not need, they
//! cannot do.
//!
//! Each layer is a function that either applies it or says why it could not. Layers that depend
//! on the host (a user namespace, Landlock) are best effort and report
//! [`LayerState::Unavailable`] with the reason; the ones every Linux has (no_new_privs,
//! rlimits, seccomp) are hard requirements and fail with a [`ConfineError`].
//!
//! Order matters and is the caller's: enter the namespace while the process has one thread,
//! then no_new_privs, rlimits and Landlock (inherited by threads spawned later), then a seccomp
//! filter per thread, last, because it forbids the calls the other layers make.

mod filesystem;
mod namespace;
mod process;
mod seccomp;

pub use filesystem::{abi_version as landlock_abi, deny_filesystem};
pub use namespace::enter_user_namespace;
pub use process::{Rlimits, die_with_parent, no_new_privs, not_dumpable, set_rlimits};
pub use seccomp::{Filter, SyscallRules, allow, allow_if, compile, install, runtime_essentials};

/// Re-exported so callers can write argument conditions.
pub use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// Errors from applying a layer that must not fail.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A `prctl` or `setrlimit` call failed.
    #[error("{what} failed: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The seccomp filter could not be built (a bug in its allow-list).
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    /// The kernel refused the seccomp filter.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

impl ConfineError {
    fn last_os(what: &'static str) -> Self {
        Self::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// What a best-effort layer came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerState {
    /// On, with a detail (for example the Landlock ABI version).
    Active(String),
    /// The host does not offer it; the reason.
    Unavailable(String),
    /// Turned off on purpose.
    Off,
}

impl LayerState {
    /// Whether the layer is on.
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Active(_))
    }
}

impl std::fmt::Display for LayerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Active(detail) if detail.is_empty() => f.write_str("on"),
            Self::Active(detail) => write!(f, "on ({detail})"),
            Self::Unavailable(why) => write!(f, "unavailable ({why})"),
            Self::Off => f.write_str("off"),
        }
    }
}

#[cfg(test)]
/// Runs `f` in a forked child and returns its exit status: the layers are irreversible, so
/// they are tried on a throwaway process.
pub(crate) fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `f` (plain syscalls in these tests) and then `_exit`, never
    // returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child we just forked; `status` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    status
}
