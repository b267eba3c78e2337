//! Confinement of the compile worker (`bulwark compile - -o -`): Cranelift parses and compiles
//! an untrusted module, so the process that does it gets nothing else to work with.
//!
//! Before it reads a byte of the module the worker enters a user namespace (where the host
//! allows it), sets no_new_privs and not-dumpable, caps its rlimits (no core, no file writes,
//! no new processes, few descriptors; the caller already capped its address space), denies
//! itself the file system and TCP with Landlock, and installs a seccomp allow-list: reading
//! standard input, writing standard output and error, memory, futexes, exit. Any other system
//! call kills it with SIGSYS.

use anyhow::Context;
use bulwark_confine::{self as confine, Rlimits, allow};

/// Confines the calling process for compiling. It must have a single thread.
pub fn compile_worker() -> anyhow::Result<()> {
    // Best effort: a host without unprivileged user namespaces still gets every other layer.
    let _ = confine::enter_user_namespace();
    confine::no_new_privs()?;
    confine::not_dumpable()?;
    confine::set_rlimits(&Rlimits {
        core: 0,
        // The worker writes only to pipes; a regular file would mean something went wrong.
        file_size: Some(0),
        // Standard input, output and error, and a few for the runtime.
        open_files: 8,
        processes: Some(0),
        address_space: None,
    })?;
    let _ = confine::deny_filesystem(None);
    let mut list = confine::runtime_essentials();
    list.push(allow(libc::SYS_read));
    let filter = confine::compile(list)?;
    confine::install(&filter).context("seccomp")?;
    Ok(())
}
