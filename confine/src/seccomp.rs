//! Seccomp allow-lists, built with `seccompiler`: a system call that is not on the list kills
//! the whole process with SIGSYS.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

use crate::ConfineError;

/// A compiled filter, ready to install.
pub type Filter = BpfProgram;

/// One allow-list entry: a system call number and the argument rules of which one must match
/// (an empty list allows every call of it).
pub type SyscallRules = (i64, Vec<SeccompRule>);

/// Allows every call of `syscall`.
pub fn allow(syscall: libc::c_long) -> SyscallRules {
    (syscall, Vec::new())
}

/// Allows `syscall` when argument `arg` (a 32-bit or 64-bit value) equals one of `values`.
pub fn allow_if(
    syscall: libc::c_long,
    arg: u8,
    len: seccompiler::SeccompCmpArgLen,
    values: &[u64],
) -> Result<SyscallRules, ConfineError> {
    let rules = values
        .iter()
        .map(|&v| {
            let condition = seccompiler::SeccompCondition::new(
                arg,
                len.clone(),
                seccompiler::SeccompCmpOp::Eq,
                v,
            )
            .map_err(|e| ConfineError::Filter(e.to_string()))?;
            SeccompRule::new(vec![condition]).map_err(|e| ConfineError::Filter(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((syscall, rules))
}

/// What any Rust program of ours needs once it is running, whatever its job: memory, futexes,
/// time, signal return and masks, random bytes for hash maps, writing to the descriptors it
/// holds, closing them, and exiting.
pub fn runtime_essentials() -> Vec<SyscallRules> {
    [
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_mprotect,
        libc::SYS_futex,
        libc::SYS_clock_gettime,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(allow)
    .collect()
}

/// Compiles an allow-list. Entries for the same call are merged (any of their rules allows it;
/// an entry without rules allows it unconditionally).
pub fn compile(entries: impl IntoIterator<Item = SyscallRules>) -> Result<Filter, ConfineError> {
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, list) in entries {
        let slot = rules.entry(nr).or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), list.is_empty()) {
            (_, true) => *slot = None,
            (Some(existing), false) => existing.extend(list),
            (None, false) => {}
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, list)| (nr, list.unwrap_or_default()))
        .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| ConfineError::Filter(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| ConfineError::Filter(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| ConfineError::Filter(e.to_string()))
}

/// Installs `filter` on the calling thread (threads it spawns later inherit it). Sets
/// no_new_privs first, as the kernel requires.
pub fn install(filter: &Filter) -> Result<(), ConfineError> {
    seccompiler::apply_filter(filter).map_err(|e| ConfineError::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_child;

    #[test]
    fn a_call_off_the_list_kills_the_process_with_sigsys() {
        let status = in_child(|| {
            let filter = compile([
                allow(libc::SYS_exit_group),
                allow(libc::SYS_exit),
                allow(libc::SYS_getpid),
            ]);
            let Ok(filter) = filter else { return 40 };
            if install(&filter).is_err() {
                return 41;
            }
            // SAFETY: getpid is allowed and has no arguments.
            unsafe { libc::getpid() };
            // SAFETY: getppid is off the list: the filter kills the process here.
            unsafe { libc::getppid() };
            42
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn argument_rules_allow_only_the_listed_values() {
        let status = in_child(|| {
            let filter = compile([
                allow(libc::SYS_exit_group),
                allow_if(
                    libc::SYS_prctl,
                    0,
                    seccompiler::SeccompCmpArgLen::Dword,
                    &[libc::PR_GET_DUMPABLE as u64],
                )
                .unwrap_or((0, Vec::new())),
            ]);
            let Ok(filter) = filter else { return 50 };
            if install(&filter).is_err() {
                return 51;
            }
            // SAFETY: an allowed prctl query.
            unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            // SAFETY: a prctl with another option: the filter kills the process here.
            unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            52
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
