//! Starting a VM for a call and talking to its agent over vsock.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_abi::vsock::handshake::{self, HandshakeError};
use bulwark_proto::call::{AGENT_PORT, Request, Response};
use bulwark_proto::frame::{self, MAX_RESPONSE_FRAME, ReadError};

use crate::cache::Entry;

/// A file next to the running executable, or in the source tree's `build/` when running from
/// `target/<profile>/` (for the guest image); `env` overrides both.
pub fn locate(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    beside_executable(Path::new(name))?.map_err(|[a, b]| {
        anyhow::anyhow!(
            "cannot find {name} (looked in {} and {}); run `make guest` or set {env}",
            a.display(),
            b.display()
        )
    })
}

/// `rel` beside the running executable, else under `build/` of the checkout whose
/// `target/<profile>/` holds it: the first of the two that is a file, or both places looked in.
pub fn beside_executable(rel: &Path) -> anyhow::Result<Result<PathBuf, [PathBuf; 2]>> {
    let exe = std::env::current_exe().context("cannot find the bulwark executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    let candidates = [dir.join(rel), dir.join("../../build").join(rel)];
    // `build/` is looked in only when the executable really is a checkout's build output
    // (`<checkout>/target/<profile>/`): anywhere else `../../build` could be anybody's.
    let in_checkout = dir
        .parent()
        .is_some_and(|t| t.file_name().is_some_and(|n| n == "target"))
        && dir.join("../../Cargo.toml").is_file();
    let usable = if in_checkout { 2 } else { 1 };
    Ok(match candidates[..usable].iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(candidates),
    })
}

/// A running VM with a private directory for its vsock socket; killed and cleaned up on drop.
pub struct Vm {
    child: Child,
    dir: PathBuf,
    uds: PathBuf,
    /// Killed by [`Vm::end_without_waiting`]: not to be waited for.
    abandoned: bool,
}

/// The socket's file name in the VM's private directory.
const SOCKET_NAME: &str = "vsock.sock";
/// Longest path a Unix socket can have: `sun_path` holds 108 bytes, the last one a NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Most bytes the VMM appends to the socket path: `.<pid>.tmp` while it binds (a pid has at
/// most 7 digits) and `_<port>` for a connection the guest opens (a port has at most 10).
const SOCKET_SUFFIX: usize = 12;
/// How long a call waits, once its connection failed or closed, for the VMM to exit and say why.
const DEATH_GRACE: Duration = Duration::from_secs(1);

impl Vm {
    /// Starts `bulwark-vmm` with the guest image, a vsock device and `artifact` mapped into the
    /// guest's artifact window: the VMM gets the verified entry's descriptor as its standard
    /// input (read-only), never a path.
    ///
    /// The VMM dies with this process, however it ends (`PR_SET_PDEATHSIG`, which follows the
    /// thread that spawns it: call this from a thread that lives as long as the call).
    /// With `report`, the VMM runs with `--timings`, for [`Vm::stop_with_report`].
    pub fn start(
        mem_mib: u64,
        artifact: &Entry,
        deadline: Instant,
        report: bool,
    ) -> anyhow::Result<Self> {
        let vmm = locate("BULWARK_VMM", "bulwark-vmm")?;
        let guest = locate("BULWARK_GUEST", "bulwark-guest.elf")?;
        let dir = socket_dir()?;
        let uds = dir.join(SOCKET_NAME);
        let timeout = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let mut cmd = Command::new(&vmm);
        cmd.arg("--mem-mib")
            .arg(mem_mib.to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--timeout")
            .arg(format!("{:.3}", timeout.as_secs_f64()))
            .args(report.then_some("--timings"))
            .arg("--artifact-from-stdin")
            .arg("--artifact-offset")
            .arg(artifact.offset.to_string())
            .arg("--artifact-len")
            .arg(artifact.len.to_string())
            .arg(&guest)
            .stdin(Stdio::from(
                artifact
                    .file
                    .try_clone()
                    .context("cannot pass the compiled module to the VMM")?,
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The VMM dies with this process whatever ends it: it sets its own parent-death signal
        // first thing (no pre_exec hook here, so the VMM is spawned rather than forked).
        cmd.arg("--parent-pid").arg(std::process::id().to_string());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("cannot start {}", vmm.display()));
            }
        };
        crate::interrupt::watch_vmm(child.id());
        let vm = Self {
            child,
            dir,
            uds,
            abandoned: false,
        };
        Ok(vm)
    }

    /// Why the VMM ended, if it has (its one-line report).
    pub fn failure(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let err = self.take_stderr();
        let line = err
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("bulwark-vmm: ");
        Some(format!("the VM ended ({status}): {line}"))
    }

    /// Why the VMM ended, waiting up to [`DEATH_GRACE`] for it to end: a connection that fails
    /// or closes is most often the VMM going down, and its own report says why.
    fn failure_after_grace(&mut self) -> Option<String> {
        let until = Instant::now() + DEATH_GRACE;
        loop {
            if let Some(why) = self.failure() {
                return Some(why);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The error for a connection that failed with `e` while `doing` something: the VMM's
    /// report if it ends within [`DEATH_GRACE`], else the I/O error.
    fn lost(&mut self, e: std::io::Error, doing: &str) -> anyhow::Error {
        match self.failure_after_grace() {
            Some(why) => anyhow::anyhow!("{why}"),
            None => anyhow::Error::new(e).context(format!("{doing} (the VM's vsock socket)")),
        }
    }

    /// The error for a connection the VM closed: the VMM's report if it ends within
    /// [`DEATH_GRACE`], else `otherwise`.
    fn closed(&mut self, otherwise: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{}",
            self.failure_after_grace()
                .unwrap_or_else(|| otherwise.to_owned())
        )
    }

    /// Connects to the agent, sends `req` and returns its response (a frame of at most
    /// `max_answer` bytes: the call's own outputs and directories), all before `deadline`.
    /// `Ok(None)` means the deadline passed.
    pub fn call(
        &mut self,
        req: &Request,
        max_answer: u32,
        deadline: Instant,
    ) -> anyhow::Result<Option<Response>> {
        // The VMM renames its socket into place once it listens, so until then the path is not
        // there (a refusal would mean a socket nobody listens on any more: the VMM is ending).
        // Keep trying until it is there, or until the VMM dies.
        let mut s = loop {
            match UnixStream::connect(&self.uds) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(self.lost(e, "cannot connect")),
            }
            if let Some(why) = self.failure() {
                bail!("{why}");
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        // Connected: the path has done its work (a guest may not open connections to the host
        // here), so its directory goes now, and nothing is left behind when the call ends.
        let _ = std::fs::remove_dir_all(&self.dir);
        let remaining = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        s.set_read_timeout(Some(remaining()))?;
        s.set_write_timeout(Some(remaining()))?;
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        match handshake::connect(&mut s, AGENT_PORT) {
            Ok(_) => {}
            Err(HandshakeError::Io(e)) if timed_out(&e) => return Ok(None),
            Err(HandshakeError::Io(e)) => return Err(self.lost(e, "doing the vsock handshake")),
            Err(HandshakeError::Closed { .. }) => {
                return Err(self.closed("the guest agent refused the connection"));
            }
            Err(e @ HandshakeError::BadAnswer { .. }) => return Err(e.into()),
        }
        let request =
            frame::encode(req).map_err(|e| anyhow::anyhow!("cannot encode the request: {e}"))?;
        s.set_write_timeout(Some(remaining()))?;
        if let Err(e) = s.write_all(&request) {
            return if timed_out(&e) {
                Ok(None)
            } else {
                Err(self.lost(e, "sending the request"))
            };
        }
        s.set_read_timeout(Some(remaining()))?;
        let response: Response = match frame::read(&mut s, max_answer.min(MAX_RESPONSE_FRAME)) {
            Ok(r) => r,
            Err(ReadError::Prefix(e) | ReadError::Body(e)) if timed_out(&e) => return Ok(None),
            Err(ReadError::Prefix(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.closed("the VM closed the connection"));
            }
            Err(ReadError::Prefix(e) | ReadError::Body(e)) => {
                return Err(self.lost(e, "reading the answer"));
            }
            Err(e) => bail!("bad answer from the VM: {e}"),
        };
        Ok(Some(response))
    }
}

impl Vm {
    /// The VMM's peak resident set size so far in KiB (`VmHWM` in its /proc status), if it can
    /// be read: guest RAM the guest touched, the artifact pages it read, and the VMM's own.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Asks the VMM to stop (SIGTERM), waits up to [`DEATH_GRACE`] for it to end, and returns
    /// what its `--timings` line says of the VM (see [`Vm::start`]'s `report`). The VMM is
    /// killed if it does not end in time.
    pub fn stop_with_report(mut self) -> VmmReport {
        crate::interrupt::forget_vmm();
        // Only a VMM still running (not reaped by an earlier `try_wait`) is signalled.
        if matches!(self.child.try_wait(), Ok(None))
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill(2) on our own child, which `try_wait` just found not yet exited, so
            // it is not reaped and the pid is still the VMM's.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let until = Instant::now() + DEATH_GRACE;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = self.take_stderr();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.abandoned = true;
        VmmReport::parse(&err)
    }

    /// What the VMM wrote to its standard error (bytes that are not UTF-8 replaced, so one odd
    /// byte cannot lose the report).
    fn take_stderr(&mut self) -> String {
        let mut err = Vec::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_end(&mut err);
        }
        String::from_utf8_lossy(&err).into_owned()
    }

    /// Kills the VMM and returns at once, without waiting for it to be torn down (its guest
    /// memory unmapped, its KVM VM destroyed: about a millisecond): for a process that exits
    /// right after the call, whose end lets the init process reap the VMM. The socket's
    /// directory is removed.
    pub fn end_without_waiting(mut self) {
        crate::interrupt::forget_vmm();
        let _ = self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.abandoned = true;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.abandoned {
            return;
        }
        crate::interrupt::forget_vmm();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the VMM's `--timings` line says of the VM's run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmReport {
    /// Every VM exit, as KVM counts them (most never reach the VMM).
    pub exits: Option<u64>,
    /// Page faults KVM fixed: the guest's first touches of its pages.
    pub page_faults: Option<u64>,
}

impl VmmReport {
    /// The figures of the last `--timings` line in the VMM's standard error.
    fn parse(stderr: &str) -> Self {
        let number_before = |line: &str, marker: &str| {
            let head = &line[..line.find(marker)?];
            head.rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        };
        let line = stderr
            .lines()
            .rev()
            .find(|l| l.contains("exits counted by KVM"))
            .unwrap_or("");
        Self {
            exits: number_before(line, " exits counted by KVM"),
            page_faults: number_before(line, " page faults fixed by KVM"),
        }
    }
}

/// A new directory only we can use, under the system temp dir.
pub fn private_dir() -> anyhow::Result<PathBuf> {
    private_dir_in(&std::env::temp_dir())
}

/// A new directory only we can use, under `base`.
fn private_dir_in(base: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "bulwark-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot create a private directory in {}", base.display())
}

/// Whether the VMM's socket paths in `dir` fit a Unix socket address.
fn socket_fits(dir: &Path) -> bool {
    dir.join(SOCKET_NAME).as_os_str().len() + SOCKET_SUFFIX <= MAX_SOCKET_PATH
}

/// A private directory for a VM's socket: under the system temp dir (`$TMPDIR`), or, when that
/// path is too long for a Unix socket, under `/run/user/<uid>` or `/tmp`.
fn socket_dir() -> anyhow::Result<PathBuf> {
    let temp = std::env::temp_dir();
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let fallbacks = [
        PathBuf::from(format!("/run/user/{uid}")),
        PathBuf::from("/tmp"),
    ];
    for (i, base) in std::iter::once(&temp).chain(&fallbacks).enumerate() {
        // The directory's name is at most 27 bytes ("bulwark-<pid>-<8 hex>-<2 digits>"); skip
        // bases that cannot fit before creating anything.
        if !socket_fits(&base.join("bulwark-4194304-ffffffff-99")) {
            continue;
        }
        match private_dir_in(base) {
            Ok(dir) if socket_fits(&dir) => return Ok(dir),
            Ok(dir) => {
                let _ = std::fs::remove_dir(&dir);
            }
            // The temp dir's own errors are the user's to see; a fallback that cannot be used
            // (no /run/user here) is skipped.
            Err(e) if i == 0 => return Err(e),
            Err(_) => {}
        }
    }
    bail!(
        "the temp directory {} is too long for the VM's Unix socket (a socket path holds at most {MAX_SOCKET_PATH} bytes), and neither {} nor /tmp can be used instead: set TMPDIR to a shorter directory",
        temp.display(),
        fallbacks[0].display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_or_fall_back_to_a_short_directory() {
        assert!(socket_fits(Path::new("/tmp/bulwark-4194304-ffffffff-99")));
        let long = format!("/tmp/{}", "d".repeat(80));
        assert!(!socket_fits(Path::new(&long)));
        let dir = socket_dir().unwrap();
        assert!(socket_fits(&dir), "{}", dir.display());
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn the_vmm_report_gives_kvms_counts_or_none() {
        let err = "bulwark-vmm: stopped by SIGTERM, the vCPU at RIP 0x1\n\
                   bulwark-vmm: stopped by SIGTERM, the vCPU at RIP 0x1; setup 2.69 ms, guest \
                   ran 304.53 ms, total 309.20 ms, 1 VM exits, 99 exits counted by KVM, 14 page \
                   faults fixed by KVM, peak RSS 8136 KiB\n";
        assert_eq!(
            VmmReport::parse(err),
            VmmReport {
                exits: Some(99),
                page_faults: Some(14)
            }
        );
        let unknown = "x; 3 VM exits, ? exits counted by KVM, ? page faults fixed by KVM, y";
        assert_eq!(VmmReport::parse(unknown), VmmReport::default());
        assert_eq!(VmmReport::parse(""), VmmReport::default());
    }
}
