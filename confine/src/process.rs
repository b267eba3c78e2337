//! Process attributes: no_new_privs, not dumpable, resource limits.

use crate::ConfineError;

/// `PR_SET_NO_NEW_PRIVS`: nothing this process or its threads exec can gain privileges (set-uid
/// bits, file capabilities). Required before an unprivileged seccomp filter or Landlock domain.
pub fn no_new_privs() -> Result<(), ConfineError> {
    // SAFETY: prctl with integer arguments only; it changes this thread's flags and nothing in
    // our memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(ConfineError::last_os("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    Ok(())
}

/// `PR_SET_DUMPABLE 0`: no core dump of guest memory, and other processes of the same user
/// cannot ptrace this one or read its memory through `/proc`.
pub fn not_dumpable() -> Result<(), ConfineError> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(ConfineError::last_os("prctl(PR_SET_DUMPABLE)"));
    }
    Ok(())
}

/// Asks the kernel to SIGKILL this process when its parent (the thread that forked it) ends,
/// whatever ends it, and checks that the parent is still `parent`: if it died before the
/// request took effect, this process was already adopted by another one and this fails with
/// `ESRCH`. Makes only async-signal-safe calls, so it may run between fork and exec.
pub fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's own death signal; getppid has
    // no preconditions. Both are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Resource limits to set (soft and hard alike, so they cannot be raised again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimits {
    /// Core file size: 0, no core dumps.
    pub core: u64,
    /// Largest file the process may write, in bytes; `None` leaves it alone (a process whose
    /// standard error is a large log file would die of SIGXFSZ on its next write).
    pub file_size: Option<u64>,
    /// One more than the highest file descriptor number it may open.
    pub open_files: u64,
    /// Processes (and threads) of this user; `None` leaves it alone. Set it once every thread
    /// the process needs exists: the kernel counts all of the user's processes.
    pub processes: Option<u64>,
    /// Address space in bytes; `None` leaves it alone.
    pub address_space: Option<u64>,
}

/// Sets `limits` on this process.
pub fn set_rlimits(limits: &Rlimits) -> Result<(), ConfineError> {
    let mut set: Vec<(libc::__rlimit_resource_t, u64, &'static str)> = vec![
        (libc::RLIMIT_CORE, limits.core, "setrlimit(RLIMIT_CORE)"),
        (
            libc::RLIMIT_NOFILE,
            limits.open_files,
            "setrlimit(RLIMIT_NOFILE)",
        ),
    ];
    if let Some(n) = limits.file_size {
        set.push((libc::RLIMIT_FSIZE, n, "setrlimit(RLIMIT_FSIZE)"));
    }
    if let Some(n) = limits.processes {
        set.push((libc::RLIMIT_NPROC, n, "setrlimit(RLIMIT_NPROC)"));
    }
    if let Some(n) = limits.address_space {
        set.push((libc::RLIMIT_AS, n, "setrlimit(RLIMIT_AS)"));
    }
    for (resource, value, what) in set {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we pass by reference and changes only this
        // process's limits.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(ConfineError::last_os(what));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_child;

    #[test]
    fn limits_and_flags_hold_in_the_process() {
        let status = in_child(|| {
            let limits = Rlimits {
                core: 0,
                file_size: Some(4096),
                open_files: 16,
                processes: None,
                address_space: None,
            };
            if no_new_privs().is_err() || not_dumpable().is_err() || set_rlimits(&limits).is_err() {
                return 10;
            }
            // SAFETY: prctl queries with integer arguments.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            // SAFETY: as above.
            let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            if nnp != 1 || dumpable != 0 {
                return 11;
            }
            let mut got = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the struct we own.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut got) };
            if got.rlim_cur != 16 || got.rlim_max != 16 {
                return 12;
            }
            // Raising a hard limit again is refused.
            let higher = libc::rlimit {
                rlim_cur: 32,
                rlim_max: 32,
            };
            // SAFETY: as above.
            let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &higher) } == 0;
            // Root may raise it (CAP_SYS_RESOURCE); anyone else must not.
            // SAFETY: geteuid has no arguments.
            if raised && unsafe { libc::geteuid() } != 0 {
                return 13;
            }
            0
        });
        assert_eq!(status, 0, "child status {status:#x}");
    }
}
