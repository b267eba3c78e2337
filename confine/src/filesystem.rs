//! Landlock: no file-system access at all, no TCP, no abstract Unix sockets or signals outside
//! the process's own domain.
//!
//! Landlock checks rights when a file is opened, so the descriptors opened before (`/dev/kvm`,
//! the console file, sockets) keep working; every path lookup after it is refused.

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use crate::LayerState;

/// The newest Landlock ABI this code knows; the kernel's own is used when older.
const NEWEST: ABI = ABI::V10;

/// Denies this thread, and the threads it spawns later, every file-system access and TCP
/// `bind`/`connect`, and scopes abstract Unix sockets and signals to the process's domain.
///
/// `unix_connect_dir`: a directory under which `connect` to path-named Unix sockets stays
/// allowed (the VMM's outbound vsock connections), on kernels whose Landlock restricts that
/// (ABI 9+); older kernels never restrict it. Best effort: a kernel without Landlock gives
/// [`LayerState::Unavailable`], one with an older ABI enforces what it knows and says which.
pub fn deny_filesystem(unix_connect_dir: Option<&std::path::Path>) -> LayerState {
    let result = (|| {
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(NEWEST))?
            .handle_access(AccessNet::from_all(NEWEST))?
            .scope(Scope::AbstractUnixSocket | Scope::Signal)?
            .create()?;
        if let Some(fd) = unix_connect_dir.and_then(|dir| PathFd::new(dir).ok()) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::ResolveUnix))?;
        }
        ruleset.restrict_self()
    })();
    match result {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => LayerState::Active(format!("ABI {}", abi_version())),
            RulesetStatus::PartiallyEnforced => LayerState::Active(format!(
                "ABI {}: all this kernel can restrict; newer ABIs add more",
                abi_version()
            )),
            RulesetStatus::NotEnforced => {
                LayerState::Unavailable("the kernel has no Landlock (or it is disabled)".into())
            }
        },
        Err(e) => LayerState::Unavailable(format!("Landlock failed: {e}")),
    }
}

/// The kernel's Landlock ABI version (0: none).
pub fn abi_version() -> i64 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI version; it reads and writes no memory.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    }
    .max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_child;

    #[test]
    fn files_opened_before_work_and_no_path_opens_after() {
        let status = in_child(|| {
            let before = std::fs::File::open("/proc/self/status");
            match deny_filesystem(None) {
                LayerState::Active(_) => {}
                LayerState::Unavailable(_) => return 0,
                LayerState::Off => return 30,
            }
            if before.is_err() {
                return 31;
            }
            match std::fs::File::open("/etc/hostname") {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                _ => return 32,
            }
            match std::fs::File::create("/tmp/bulwark-confine-landlock-probe") {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => 0,
                _ => 33,
            }
        });
        assert_eq!(status, 0, "child status {status:#x}");
    }
}
