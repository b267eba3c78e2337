//! A new user namespace: the process keeps its user ID, but loses every capability it had over
//! the host's resources (root included), which now belong to a namespace it is not in.

use crate::LayerState;

/// Moves this process into a new, unprivileged user namespace (`unshare(CLONE_NEWUSER)`).
///
/// Must be called while the process has a single thread. No uid or gid map is written: inside,
/// the process runs as the overflow user, so it owns nothing; its open descriptors (`/dev/kvm`,
/// sockets, guest memory) keep working. Hosts that forbid unprivileged user namespaces (a
/// sysctl, an AppArmor or SELinux policy, a container's seccomp profile) get
/// [`LayerState::Unavailable`] with the reason.
pub fn enter_user_namespace() -> LayerState {
    // SAFETY: unshare with a flag only changes this process's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0 {
        return LayerState::Active(String::new());
    }
    let e = std::io::Error::last_os_error();
    let why = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "the host forbids unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone, AppArmor or a container profile)".to_owned()
        }
        Some(libc::ENOSPC) => "user.max_user_namespaces is reached or 0".to_owned(),
        Some(libc::EINVAL) => "the process already has several threads (a Bulwark bug)".to_owned(),
        _ => format!("unshare(CLONE_NEWUSER) failed: {e}"),
    };
    LayerState::Unavailable(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_child;

    #[test]
    fn the_namespace_is_new_and_descriptors_survive() {
        let before = std::fs::read_link("/proc/self/ns/user").unwrap();
        let status = in_child(|| {
            let file = std::fs::File::open("/proc/self/status");
            match enter_user_namespace() {
                LayerState::Active(_) => {}
                // A host without user namespaces: nothing more to check.
                LayerState::Unavailable(_) => return 0,
                LayerState::Off => return 20,
            }
            let after = std::fs::read_link("/proc/self/ns/user");
            if after.ok().as_ref() == Some(&before) {
                return 21;
            }
            // A descriptor opened before still reads.
            use std::io::Read;
            let mut s = String::new();
            match file.and_then(|mut f| f.read_to_string(&mut s)) {
                Ok(_) if s.contains("Name:") => 0,
                _ => 22,
            }
        });
        assert_eq!(status, 0, "child status {status:#x}");
    }
}
