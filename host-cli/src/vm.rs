//! Starting a VM for a call and talking to its agent over vsock.
//!
//! A VM gets its artifact (the call's precompiled module) in one of two ways: at start
//! ([`Vm::start`], for `bulwark run`), or after it booted ([`Vm::start_waiting`], then
//! [`Vm::wait_listening`] and [`Vm::provide_artifact`], for a warm pool that boots VMs before
//! the call is known). Either way the VMM maps the cache entry's descriptor read-only into the
//! guest; the artifact never crosses vsock.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_abi::vsock::handshake::{self, HandshakeError};
use bulwark_proto::call::{AGENT_PORT, Reply, Request, Response};
use bulwark_proto::frame::{self, MAX_RESPONSE_FRAME, ReadError};

use crate::cache::Entry;
use crate::cancel::Cancel;

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
///
/// A `Vm` is `Send`: it may be used and dropped on another thread than the one that started it
/// (that thread must live as long as the VM, though: see [`Vm::start_waiting`]).
pub struct Vm {
    child: Child,
    dir: PathBuf,
    uds: PathBuf,
    /// Killed by [`Vm::end_without_waiting`]: not to be waited for.
    abandoned: bool,
    /// The call's cancel token, which kills this VMM when cancelled ([`Vm::watch`]); told to
    /// forget it before it is reaped.
    watched: Option<Cancel>,
    /// Started waiting for its artifact: the socket to send it on, until it is mapped.
    artifact_socket: Option<UnixStream>,
    /// A connection to the agent, handshake done ([`Vm::wait_listening`]), for the next call.
    agent: Option<UnixStream>,
    /// Started with `--reusable` ([`Vm::start_reusable`]): its socket path stays (each call
    /// after a reset connects again), and its artifact socket stays open for commands.
    reusable: bool,
    /// A reusable VM's artifact socket once its artifact is mapped: where
    /// [`Vm::snapshot`] and [`Vm::reset`] send their commands.
    control: Option<UnixStream>,
    /// Whether its snapshot was taken ([`Vm::snapshot`]): only then can it be reset.
    snapshotted: bool,
    /// Resets that succeeded: how many calls it served before the one it is ready for now.
    resets: u64,
    /// Its RAM in MiB.
    mem_mib: u64,
}

/// A `Vm` moves between threads (the pool's spawner starts it, a caller's thread uses it).
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<Vm>()
};

/// How the VMM gets its artifact.
enum ArtifactSource<'a> {
    /// At spawn: the cache entry's descriptor is its standard input.
    AtStart(&'a Entry),
    /// Later: its standard input is this end of a socketpair (see [`Vm::provide_artifact`]);
    /// with `reusable`, the VMM also takes snapshot and reset commands there.
    Later(UnixStream, bool),
}

/// What backs the guest heap of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapPages {
    /// Transparent huge pages where the kernel gives them: fewer faults for a tool that
    /// touches much memory (CPython), but the first touch of each 2 MiB zeroes all of it.
    Huge,
    /// 4 KiB pages (`bulwark-vmm --small-pages`): a call that touches little memory starts
    /// faster (a hello call's instantiation here: ~0.2 ms instead of ~0.6 ms).
    Small,
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
/// Bytes of the artifact message to a VMM started with `--artifact-later`: offset and length,
/// u64 little-endian each (the descriptor rides along, SCM_RIGHTS).
const LATE_HEADER_LEN: usize = 16;
/// Longest answer line the VMM sends to it (`OK\n` or `ERR <reason>\n`).
const MAX_LATE_ANSWER: usize = 512;
/// Bytes of a command to a reusable VMM (sent on the artifact socket once the artifact is
/// mapped, no descriptor): the command's name in ASCII, NUL-padded to 8 bytes, then 8 zeros.
const COMMAND_LEN: usize = 16;
/// The command that takes a reusable VM's snapshot.
const SNAPSHOT: [u8; 8] = *b"SNAPSHOT";
/// The command that resets a reusable VM to its snapshot.
const RESET: [u8; 8] = *b"RESET\0\0\0";
/// The environment variable that makes reusable VMs check each reset against a full copy of
/// their RAM (`--verify-reset`): `1` turns it on (a test aid; it costs a copy of all RAM).
pub const VERIFY_RESET_ENV: &str = "BULWARK_VERIFY_RESET";

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
        let timeout = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let vmm = locate("BULWARK_VMM", "bulwark-vmm")?;
        let guest = locate("BULWARK_GUEST", "bulwark-guest.elf")?;
        Self::spawn(
            &vmm,
            &guest,
            mem_mib,
            ArtifactSource::AtStart(artifact),
            Some(timeout),
            report,
            HeapPages::Huge,
        )
    }

    /// Spawns the VMM: a vsock device in a private directory, `artifact` as its standard input,
    /// `timeout` if any, its heap on `pages`.
    fn spawn(
        vmm: &Path,
        guest: &Path,
        mem_mib: u64,
        artifact: ArtifactSource<'_>,
        timeout: Option<Duration>,
        report: bool,
        pages: HeapPages,
    ) -> anyhow::Result<Self> {
        let dir = socket_dir()?;
        let uds = dir.join(SOCKET_NAME);
        let mut cmd = Command::new(vmm);
        cmd.arg("--mem-mib")
            .arg(mem_mib.to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .args(report.then_some("--timings"))
            .args((pages == HeapPages::Small).then_some("--small-pages"));
        if let Some(timeout) = timeout {
            cmd.arg("--timeout")
                .arg(format!("{:.3}", timeout.as_secs_f64()));
        }
        let reusable = matches!(artifact, ArtifactSource::Later(_, true));
        let stdin = match artifact {
            ArtifactSource::AtStart(entry) => {
                cmd.arg("--artifact-from-stdin")
                    .arg("--artifact-offset")
                    .arg(entry.offset.to_string())
                    .arg("--artifact-len")
                    .arg(entry.len.to_string());
                match entry.file.try_clone() {
                    Ok(file) => Stdio::from(file),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e).context("cannot pass the compiled module to the VMM");
                    }
                }
            }
            ArtifactSource::Later(socket, reusable) => {
                cmd.arg("--artifact-later");
                if reusable {
                    cmd.arg("--reusable");
                    if std::env::var_os(VERIFY_RESET_ENV).is_some_and(|v| v == "1") {
                        cmd.arg("--verify-reset");
                    }
                }
                Stdio::from(std::os::fd::OwnedFd::from(socket))
            }
        };
        cmd.arg(guest)
            .stdin(stdin)
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
        Ok(Self {
            child,
            dir,
            uds,
            abandoned: false,
            watched: None,
            artifact_socket: None,
            agent: None,
            reusable,
            control: None,
            snapshotted: false,
            resets: 0,
            mem_mib,
        })
    }

    /// Connects to the VMM's vsock socket, waiting for it to appear; `None` if `deadline`
    /// passed first.
    fn connect_socket(&mut self, deadline: Instant) -> anyhow::Result<Option<UnixStream>> {
        // The VMM renames its socket into place once it listens, so until then the path is not
        // there (a refusal would mean a socket nobody listens on any more: the VMM is ending).
        // Keep trying until it is there, or until the VMM dies.
        let s = loop {
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
        Ok(Some(s))
    }

    /// Removes the VM's socket directory: once a connection to the agent is made, the path has
    /// done its work (a guest may not open connections to the host here), and nothing is left
    /// behind when the call ends.
    /// A reusable VM keeps its path until it ends: after each reset the next call connects
    /// again.
    fn remove_socket_dir(&self) {
        if !self.reusable {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Why the VMM ended, if it has (its one-line report).
    pub fn failure(&mut self) -> Option<String> {
        // `try_wait` reaps a VMM that ended: the cancel token must not hold its pid then (it
        // could name another process next). It is told again if the VMM still runs.
        if let Some(cancel) = &self.watched {
            cancel.forget_vmm();
        }
        let waited = self.child.try_wait();
        if let (Some(cancel), Ok(None)) = (&self.watched, &waited) {
            cancel.watch_vmm(self.child.id());
        }
        let status = waited.ok()??;
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
    ///
    /// With `req.stream`, the agent sends the output as the tool writes it: each chunk goes to
    /// `sink` (at most `max_output` bytes of each stream in all, whatever the guest sends; more
    /// is dropped and the answer flagged truncated), and the answer's own stdout and stderr are
    /// empty.
    pub fn call(
        &mut self,
        req: &Request,
        max_answer: u32,
        deadline: Instant,
        sink: &mut dyn FnMut(OutputStream, &[u8]),
    ) -> anyhow::Result<Option<Response>> {
        let remaining = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let mut s = match self.agent.take() {
            // Connected and handshaken already (`wait_listening`).
            Some(s) => s,
            None => {
                let Some(mut s) = self.connect_socket(deadline)? else {
                    return Ok(None);
                };
                self.remove_socket_dir();
                s.set_read_timeout(Some(remaining()))?;
                s.set_write_timeout(Some(remaining()))?;
                match handshake::connect(&mut s, AGENT_PORT) {
                    Ok(_) => {}
                    Err(HandshakeError::Io(e)) if timed_out(&e) => return Ok(None),
                    Err(HandshakeError::Io(e)) => {
                        return Err(self.lost(e, "doing the vsock handshake"));
                    }
                    Err(HandshakeError::Closed { .. }) => {
                        return Err(self.closed("the guest agent refused the connection"));
                    }
                    Err(e @ HandshakeError::BadAnswer { .. }) => return Err(e.into()),
                }
                s
            }
        };
        let request =
            frame::encode(req).map_err(|e| anyhow::anyhow!("cannot encode the request: {e}"))?;
        if let Err(e) = (Until {
            s: &mut s,
            deadline,
        })
        .write_all(&request)
        {
            return if timed_out(&e) {
                Ok(None)
            } else {
                Err(self.lost(e, "sending the request"))
            };
        }
        let max = max_answer.min(MAX_RESPONSE_FRAME);
        if !req.stream {
            return self.read_frame::<Response>(&mut s, max, deadline);
        }
        // Output frames, then the answer. Each stream's total is held to the call's cap here
        // too: the guest's frames are its word.
        let cap = req.limits.max_output;
        let mut sent = [0u64; 2];
        let mut over = false;
        loop {
            let Some(reply) = self.read_frame::<Reply>(&mut s, max, deadline)? else {
                return Ok(None);
            };
            let (which, bytes) = match reply {
                Reply::Stdout(b) => (OutputStream::Stdout, b),
                Reply::Stderr(b) => (OutputStream::Stderr, b),
                Reply::Done(response) => {
                    let mut response = response;
                    // An answer that carries output after all: passed on as the rest.
                    for (which, bytes) in [
                        (OutputStream::Stdout, std::mem::take(&mut response.stdout)),
                        (OutputStream::Stderr, std::mem::take(&mut response.stderr)),
                    ] {
                        over |= pass_on(sink, which, &bytes, &mut sent, cap);
                    }
                    response.output_truncated |= over;
                    return Ok(Some(response));
                }
            };
            over |= pass_on(sink, which, &bytes, &mut sent, cap);
        }
    }

    /// Reads one frame of at most `max` bytes before `deadline`; `Ok(None)`: the deadline
    /// passed.
    fn read_frame<T: serde::de::DeserializeOwned>(
        &mut self,
        s: &mut UnixStream,
        max: u32,
        deadline: Instant,
    ) -> anyhow::Result<Option<T>> {
        match frame::read(&mut Until { s, deadline }, max) {
            Ok(r) => Ok(Some(r)),
            Err(ReadError::Prefix(e) | ReadError::Body(e)) if timed_out(&e) => Ok(None),
            Err(ReadError::Prefix(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.closed("the VM closed the connection"))
            }
            Err(ReadError::Prefix(e) | ReadError::Body(e)) => {
                Err(self.lost(e, "reading the answer"))
            }
            Err(e) => bail!("bad answer from the VM: {e}"),
        }
    }
}

/// The VM's connection, read and written only until `deadline`: every read and write gets the
/// time left, so a guest that sends (or takes) a byte at a time cannot stretch a call past
/// it. A pooled VMM has no timeout of its own: this is what ends its call.
struct Until<'a> {
    s: &'a mut UnixStream,
    deadline: Instant,
}

impl Until<'_> {
    fn time_left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.time_left()?;
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

impl Write for Until<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.time_left()?;
        self.s.set_write_timeout(Some(left))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// Which output stream a chunk of streamed output belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    /// The tool's stdout.
    Stdout,
    /// The tool's stderr.
    Stderr,
}

/// Passes `bytes` of `which` on to `sink`, as far as the stream's total stays within `cap`
/// (`sent` counts each stream); whether any byte was dropped.
fn pass_on(
    sink: &mut dyn FnMut(OutputStream, &[u8]),
    which: OutputStream,
    bytes: &[u8],
    sent: &mut [u64; 2],
    cap: u64,
) -> bool {
    let total = &mut sent[which as usize];
    let room = usize::try_from(cap.saturating_sub(*total)).unwrap_or(usize::MAX);
    let kept = &bytes[..bytes.len().min(room)];
    if !kept.is_empty() {
        sink(which, kept);
    }
    *total = total.saturating_add(kept.len() as u64);
    kept.len() < bytes.len()
}

/// The warm pool's way to a VM: boot first, artifact later.
impl Vm {
    /// Starts `bulwark-vmm` with the guest image and a vsock device but no artifact yet, for a
    /// warm pool: the guest boots to "agent listening" ([`Vm::wait_listening`] tells when) and
    /// gets its artifact later, from [`Vm::provide_artifact`]. The VMM has no timeout: whoever
    /// holds the `Vm` ends it (dropping it kills the VMM).
    ///
    /// The VMM dies with this process (`PR_SET_PDEATHSIG`), but that signal follows the
    /// *thread* that spawns it: call this from a thread that lives as long as the VM (the
    /// pool's permanent spawner thread), never from a short-lived one, or the VM is killed
    /// when that thread ends. The `Vm` itself may then be used on any thread.
    /// A call that takes it registers it with its cancel token ([`Vm::watch`]).
    /// With `report`, the VMM runs with `--timings`, for [`Vm::stop_with_report`]; the guest
    /// heap is on `pages`.
    pub fn start_waiting(mem_mib: u64, report: bool, pages: HeapPages) -> anyhow::Result<Self> {
        let vmm = locate("BULWARK_VMM", "bulwark-vmm")?;
        let guest = locate("BULWARK_GUEST", "bulwark-guest.elf")?;
        Self::start_waiting_with(&vmm, &guest, mem_mib, report, false, pages)
    }

    /// [`Vm::start_waiting`] for a VM that can serve several calls of one tenant and module:
    /// the VMM runs with `--reusable` (and `--verify-reset` when [`VERIFY_RESET_ENV`] is `1`).
    /// Its life: [`Vm::provide_artifact`], [`Vm::snapshot`] (before any connection to the
    /// agent), then [`Vm::wait_listening`] and [`Vm::call`]; after each call that ended
    /// cleanly, [`Vm::reset`] and again [`Vm::wait_listening`] and [`Vm::call`].
    ///
    /// The same rule as [`Vm::start_waiting`]: call it from a thread that lives as long as the
    /// VM.
    pub fn start_reusable(mem_mib: u64) -> anyhow::Result<Self> {
        let vmm = locate("BULWARK_VMM", "bulwark-vmm")?;
        let guest = locate("BULWARK_GUEST", "bulwark-guest.elf")?;
        // A reusable VM's heap is on small pages whatever is asked: a reset restores pages.
        Self::start_waiting_with(&vmm, &guest, mem_mib, false, true, HeapPages::Small)
    }

    /// [`Vm::start_waiting`] with the VMM and guest image given; `reusable`: see
    /// [`Vm::start_reusable`].
    fn start_waiting_with(
        vmm: &Path,
        guest: &Path,
        mem_mib: u64,
        report: bool,
        reusable: bool,
        pages: HeapPages,
    ) -> anyhow::Result<Self> {
        let (ours, theirs) =
            UnixStream::pair().context("cannot create the socket to give the VMM its artifact")?;
        let mut vm = Self::spawn(
            vmm,
            guest,
            mem_mib,
            ArtifactSource::Later(theirs, reusable),
            None,
            report,
            pages,
        )?;
        vm.artifact_socket = Some(ours);
        Ok(vm)
    }

    /// Gives a VM started with [`Vm::start_waiting`] its artifact: sends the VMM the entry's
    /// range and descriptor and waits, until `deadline`, for its answer. When this returns
    /// `Ok`, the artifact is mapped and a call naming it may be sent ([`Vm::call`]).
    ///
    /// Fails with the VMM's reason if it refuses (the VM is unchanged then), with its report
    /// if it died, or if this VM was not started waiting or already has its artifact.
    pub fn provide_artifact(&mut self, entry: &Entry, deadline: Instant) -> anyhow::Result<()> {
        let Some(socket) = self.artifact_socket.as_mut() else {
            bail!("this VM takes no artifact now: it was started with one, or already has one");
        };
        let mut header = [0u8; LATE_HEADER_LEN];
        header[..8].copy_from_slice(&entry.offset.to_le_bytes());
        header[8..].copy_from_slice(&entry.len.to_le_bytes());
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let sent = socket
            .set_write_timeout(Some(remaining))
            .and_then(|()| send_with_descriptor(socket, &header, entry.file.as_fd()));
        if let Err(e) = sent {
            return Err(self.lost(e, "sending the artifact to the VMM"));
        }
        let answer = match read_answer(socket, deadline) {
            Ok(Some(answer)) => answer,
            Ok(None) => {
                return Err(self.closed("the VMM closed its artifact socket without answering"));
            }
            Err(e) if timed_out(&e) => {
                bail!("the VMM did not answer in time when given the artifact");
            }
            Err(e) => return Err(self.lost(e, "reading the VMM's answer to the artifact")),
        };
        let line = String::from_utf8_lossy(&answer);
        let line = line.lines().next().unwrap_or("");
        if line == "OK" {
            // Mapped: a VM takes one artifact, so the socket has done its work, unless the VM
            // is reusable: it then carries the snapshot and reset commands.
            let socket = self.artifact_socket.take();
            if self.reusable {
                self.control = socket;
            }
            return Ok(());
        }
        match line.strip_prefix("ERR ") {
            Some(reason) => bail!("the VMM refused the artifact: {reason}"),
            None => bail!("the VMM gave an unexpected answer to the artifact: {line:?}"),
        }
    }

    /// Takes a reusable VM's snapshot (its memory, vCPU and device state), to which each
    /// [`Vm::reset`] returns it; answers the pages of guest RAM saved. Send it after
    /// [`Vm::provide_artifact`] and before the first [`Vm::wait_listening`] or [`Vm::call`]: the
    /// VMM takes it when the guest next waits idle with no connection. A VM snapshots once.
    ///
    /// Any failure (a refusal, no answer by `deadline`, the VMM gone) leaves the VM unusable
    /// for commands: kill it.
    pub fn snapshot(&mut self, deadline: Instant) -> anyhow::Result<u64> {
        if self.snapshotted {
            bail!("this VM has its snapshot already");
        }
        if self.agent.is_some() {
            bail!("a snapshot must be taken before anything connects to the agent");
        }
        let line = self.command(SNAPSHOT, "snapshot", deadline)?;
        let pages = parse_ok(&line, "snapshot", 1).ok_or_else(|| {
            anyhow::anyhow!("the VMM gave an unexpected answer to SNAPSHOT: {line:?}")
        })?;
        self.snapshotted = true;
        Ok(pages[0])
    }

    /// Resets a reusable VM to its snapshot once its call is over: its connection to the agent
    /// (if any is left) is dropped first, then the VMM restores every page the call wrote,
    /// the vCPU and the devices; afterwards the guest is as at the snapshot (agent listening,
    /// artifact mapped), ready for [`Vm::wait_listening`] and the next [`Vm::call`].
    ///
    /// Any failure (a refusal, no answer by `deadline`, the VMM gone) means the VM must be
    /// killed, never used again; it takes no further command.
    pub fn reset(&mut self, deadline: Instant) -> anyhow::Result<ResetStats> {
        if !self.snapshotted {
            bail!("this VM has no snapshot to reset to");
        }
        // The VMM drops any connection left, but the host's end must not outlive the reset.
        self.agent = None;
        let line = self.command(RESET, "reset", deadline)?;
        let figures = parse_ok(&line, "reset", 4).ok_or_else(|| {
            anyhow::anyhow!("the VMM gave an unexpected answer to RESET: {line:?}")
        })?;
        self.resets += 1;
        Ok(ResetStats {
            pages_written: figures[0],
            pages_copied: figures[1],
            pages_zeroed: figures[2],
            micros: figures[3],
        })
    }

    /// Whether this VM has its snapshot: it can be reset and serve another call.
    pub fn is_snapshotted(&self) -> bool {
        self.snapshotted
    }

    /// How many times this VM was reset: more than 0 means the call it serves now is not its
    /// first.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The VM's RAM in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// Sends a reusable VM's command `name` and returns its answer line (without `\n`) when it
    /// starts with `OK `. The socket is given back only then: after any failure, or an
    /// `ERR`, the VM takes no more commands.
    fn command(&mut self, name: [u8; 8], what: &str, deadline: Instant) -> anyhow::Result<String> {
        let Some(mut socket) = self.control.take() else {
            bail!(
                "this VM takes no commands: it is not reusable, has no artifact yet, or a command failed before"
            );
        };
        let mut message = [0u8; COMMAND_LEN];
        message[..8].copy_from_slice(&name);
        let sent = (Until {
            s: &mut socket,
            deadline,
        })
        .write_all(&message);
        match sent {
            Ok(()) => {}
            Err(e) if timed_out(&e) => bail!("the VMM did not take the {what} command in time"),
            Err(e) => return Err(self.lost(e, &format!("sending the {what} command to the VMM"))),
        }
        let answer = match read_answer(&mut socket, deadline) {
            Ok(Some(answer)) => answer,
            Ok(None) => {
                return Err(self.closed(&format!(
                    "the VMM closed its command socket without answering {what}"
                )));
            }
            Err(e) if timed_out(&e) => bail!("the VMM did not answer {what} in time"),
            Err(e) => return Err(self.lost(e, &format!("reading the VMM's answer to {what}"))),
        };
        // One line, and nothing after it: a command gets one answer.
        let text = String::from_utf8_lossy(&answer);
        let Some(line) = text.strip_suffix('\n').filter(|l| !l.contains('\n')) else {
            bail!("the VMM gave an unexpected answer to {what}: {text:?}");
        };
        if let Some(reason) = line.strip_prefix("ERR ") {
            bail!("the VMM refused to {what}: {reason}");
        }
        if !line.starts_with("OK ") {
            bail!("the VMM gave an unexpected answer to {what}: {line:?}");
        }
        self.control = Some(socket);
        Ok(line.to_owned())
    }

    /// Waits until the guest's agent accepts a connection (the VM is booted and listening),
    /// at most until `deadline`, and keeps that connection, handshake done, for the next
    /// [`Vm::call`]. The VM's socket directory is removed once connected (a reusable VM's only
    /// when it ends: its next call, after a reset, connects again).
    pub fn wait_listening(&mut self, deadline: Instant) -> anyhow::Result<()> {
        if self.agent.is_some() {
            return Ok(());
        }
        loop {
            match self.connect_agent(deadline)? {
                Some(s) => {
                    self.agent = Some(s);
                    return Ok(());
                }
                None if Instant::now() >= deadline => {
                    bail!("the VM's agent was not listening in time")
                }
                // Refused: the guest is not listening yet.
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// One attempt at a connection to the agent, handshake done: `None` if the agent refused
    /// it (not listening yet) or `deadline` passed.
    fn connect_agent(&mut self, deadline: Instant) -> anyhow::Result<Option<UnixStream>> {
        let Some(mut s) = self.connect_socket(deadline)? else {
            return Ok(None);
        };
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(remaining))?;
        s.set_write_timeout(Some(remaining))?;
        match handshake::connect(&mut s, AGENT_PORT) {
            Ok(_) => {
                self.remove_socket_dir();
                Ok(Some(s))
            }
            Err(HandshakeError::Io(e)) if timed_out(&e) => Ok(None),
            Err(HandshakeError::Io(e)) => Err(self.lost(e, "doing the vsock handshake")),
            Err(HandshakeError::Closed { .. }) => match self.failure() {
                Some(why) => bail!("{why}"),
                None => Ok(None),
            },
            Err(e @ HandshakeError::BadAnswer { .. }) => Err(e.into()),
        }
    }
}

/// Whether `e` is a socket timeout.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Reads one answer line from the VMM's artifact (or command) socket before `deadline`: the
/// bytes up to and with the first `\n` (or [`MAX_LATE_ANSWER`] bytes without one);
/// `Ok(None)`: the VMM closed it first.
fn read_answer(socket: &mut UnixStream, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
    let mut answer = Vec::new();
    let mut until = Until {
        s: socket,
        deadline,
    };
    loop {
        let mut chunk = [0u8; MAX_LATE_ANSWER];
        let room = MAX_LATE_ANSWER - answer.len();
        match until.read(&mut chunk[..room]) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.contains(&b'\n') || answer.len() >= MAX_LATE_ANSWER {
                    return Ok(Some(answer));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The `count` numbers of an answer line `OK <word> <n>...`, if it is exactly that.
fn parse_ok(line: &str, word: &str, count: usize) -> Option<Vec<u64>> {
    let mut parts = line.split(' ');
    if parts.next() != Some("OK") || parts.next() != Some(word) {
        return None;
    }
    let numbers: Vec<u64> = parts.map(|p| p.parse().ok()).collect::<Option<_>>()?;
    (numbers.len() == count).then_some(numbers)
}

/// What one [`Vm::reset`] did, as the VMM reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Pages of guest RAM the call wrote.
    pub pages_written: u64,
    /// Pages copied back from the snapshot.
    pub pages_copied: u64,
    /// Pages made zero again (they were zero at the snapshot).
    pub pages_zeroed: u64,
    /// How long the reset took in the VMM, in microseconds.
    pub micros: u64,
}

/// Bytes of one descriptor in a control message.
const FD_LEN: u32 = 4;
const _: () = assert!(std::mem::size_of::<libc::c_int>() == FD_LEN as usize);

/// Sends `bytes` with `fd` attached (SCM_RIGHTS) in one message on `socket`.
fn send_with_descriptor(
    socket: &UnixStream,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let raw = fd.as_raw_fd();
    // Room for one control message holding one descriptor, 8-aligned as cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a length.
    let space = unsafe { libc::CMSG_SPACE(FD_LEN) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds `space` bytes, enough for one header and one int (checked
    // above); CMSG_FIRSTHDR returns its start, and CMSG_DATA the data inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(std::io::Error::other("no room for the descriptor"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_LEN) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
    }
    loop {
        // SAFETY: `msg` points to `iov` (over `bytes`, read only) and `control`, all alive
        // across the call; the descriptor is open (borrowed for this call).
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match usize::try_from(n) {
            Ok(n) if n == bytes.len() => return Ok(()),
            // A stream socket with room for 16 bytes takes them whole; less means it is full.
            Ok(_) => {
                return Err(std::io::Error::other(
                    "the VMM's socket took part of the message",
                ));
            }
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl Vm {
    /// The VMM's peak resident set size so far in KiB (`VmHWM` in its /proc status), if it can
    /// be read: guest RAM the guest touched, the artifact pages it read, and the VMM's own.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// The VMM's resident set now, in KiB (`None` once it has ended).
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// A size in kB from the VMM's `/proc/PID/status`, by its field name.
    fn status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Lets `cancel` kill this VM's VMM: cancelling the call then ends it at once (a call
    /// blocked reading the answer sees the connection close).
    pub fn watch(&mut self, cancel: &Cancel) {
        cancel.watch_vmm(self.child.id());
        self.watched = Some(cancel.clone());
    }

    /// Undoes [`Vm::watch`]: the call is over, and the VM outlives it (it is kept for reuse),
    /// so cancelling that call must no longer kill it.
    pub fn unwatch(&mut self) {
        if let Some(cancel) = self.watched.take() {
            cancel.forget_vmm();
        }
    }

    /// Asks the VMM to stop (SIGTERM), waits up to [`DEATH_GRACE`] for it to end, and returns
    /// what its `--timings` line says of the VM (see [`Vm::start`]'s `report`). The VMM is
    /// killed if it does not end in time.
    pub fn stop_with_report(mut self) -> VmmReport {
        if let Some(cancel) = self.watched.take() {
            cancel.forget_vmm();
        }
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

    /// Sends the VMM SIGKILL now and returns without waiting for it: dropping the `Vm` later
    /// reaps it (for a reaper thread, so that a VM whose call is over stops using the CPU at
    /// once, not when the reaper gets to it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Kills the VMM and returns at once, without waiting for it to be torn down (its guest
    /// memory unmapped, its KVM VM destroyed: about a millisecond): for a process that exits
    /// right after the call, whose end lets the init process reap the VMM. The socket's
    /// directory is removed.
    pub fn end_without_waiting(mut self) {
        if let Some(cancel) = self.watched.take() {
            cancel.forget_vmm();
        }
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
        if let Some(cancel) = self.watched.take() {
            cancel.forget_vmm();
        }
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

    /// The VMM and guest image built in this checkout, if they are there and `/dev/kvm` works
    /// (else the test says it is skipped).
    fn vm_parts() -> Option<(PathBuf, PathBuf)> {
        let exe = std::env::current_exe().ok()?;
        let vmm = exe.parent()?.parent()?.join("bulwark-vmm");
        let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/bulwark-guest.elf");
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if vmm.is_file() && guest.is_file() && kvm {
            Some((vmm, guest))
        } else {
            eprintln!(
                "*** SKIPPED: needs /dev/kvm, {} and {} (cargo build --release, make guest)",
                vmm.display(),
                guest.display()
            );
            None
        }
    }

    /// `examples/hello.wat` compiled for the guest into a file at offset 0, as a cache entry.
    fn hello_entry(dir: &Path) -> Entry {
        let wat =
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello.wat"))
                .unwrap();
        let artifact = crate::compile::compile_bytes(
            &wat,
            crate::cli::Target::Guest,
            bulwark_engine::Metering::None,
        )
        .unwrap();
        let path = dir.join("hello.cwasm");
        std::fs::write(&path, &artifact).unwrap();
        Entry {
            file: std::fs::File::open(&path).unwrap(),
            offset: 0,
            len: artifact.len() as u64,
        }
    }

    fn hello_request(entry: &Entry) -> Request {
        Request {
            version: bulwark_proto::call::PROTOCOL_VERSION,
            artifact: bulwark_proto::call::Artifact {
                digest: [7; 32],
                size: entry.len,
            },
            args: vec!["hello".into()],
            env: Vec::new(),
            stdin: Vec::new(),
            dirs: Vec::new(),
            limits: bulwark_proto::call::Limits::default(),
            random_seed: [0; 32],
            realtime_ns: 0,
            stream: false,
        }
    }

    fn median(v: &mut [Duration]) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    /// The warm pool's path with real VMs: started waiting, listening, refused a bad artifact,
    /// given the real one, then called from another thread. Prints the median times of
    /// `start_waiting` to a handshake and of `provide_artifact` alone over 50 VMs
    /// (`cargo test --release -p bulwark-cli waiting -- --nocapture`); nothing is asserted of
    /// them.
    #[test]
    fn a_waiting_vm_takes_its_artifact_later_and_serves_a_call_from_another_thread() {
        let Some((vmm, guest)) = vm_parts() else {
            return;
        };
        let dir = private_dir().unwrap();
        let entry = hello_entry(&dir);
        let deadline = || Instant::now() + Duration::from_secs(20);

        let mut vm =
            Vm::start_waiting_with(&vmm, &guest, 256, false, false, HeapPages::Huge).unwrap();
        vm.wait_listening(deadline()).unwrap();
        let bad = Entry {
            file: entry.file.try_clone().unwrap(),
            offset: 0,
            len: entry.len + 1,
        };
        let e = vm.provide_artifact(&bad, deadline()).unwrap_err();
        assert!(
            e.to_string().contains("the VMM refused the artifact")
                && e.to_string().contains("inside the file"),
            "{e:#}"
        );
        vm.provide_artifact(&entry, deadline()).unwrap();
        let e = vm.provide_artifact(&entry, deadline()).unwrap_err();
        assert!(e.to_string().contains("takes no artifact now"), "{e:#}");
        let request = hello_request(&entry);
        let response = std::thread::spawn(move || {
            let r = vm.call(&request, MAX_RESPONSE_FRAME, deadline(), &mut |_, _| {});
            drop(vm);
            r
        })
        .join()
        .unwrap()
        .unwrap()
        .expect("an answer before the deadline");
        assert_eq!(
            response.outcome,
            bulwark_proto::call::Outcome::Exited(0),
            "{response:?}"
        );
        assert_eq!(response.stdout, b"hello from a Bulwark micro-VM\n");

        // A VM that was started with its artifact takes none later.
        let mut vm = Vm::spawn(
            &vmm,
            &guest,
            256,
            ArtifactSource::AtStart(&entry),
            Some(Duration::from_secs(30)),
            false,
            HeapPages::Huge,
        )
        .unwrap();
        let e = vm.provide_artifact(&entry, deadline()).unwrap_err();
        assert!(e.to_string().contains("takes no artifact now"), "{e:#}");
        let r = vm
            .call(
                &hello_request(&entry),
                MAX_RESPONSE_FRAME,
                deadline(),
                &mut |_, _| {},
            )
            .unwrap()
            .unwrap();
        assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
        drop(vm);

        let (mut ready, mut provide) = (Vec::new(), Vec::new());
        for i in 0..50 {
            let t0 = Instant::now();
            let mut vm =
                Vm::start_waiting_with(&vmm, &guest, 256, false, false, HeapPages::Huge).unwrap();
            vm.wait_listening(deadline()).unwrap();
            let t1 = Instant::now();
            vm.provide_artifact(&entry, deadline()).unwrap();
            let t2 = Instant::now();
            ready.push(t1 - t0);
            provide.push(t2 - t1);
            if i % 10 == 0 {
                let r = vm
                    .call(
                        &hello_request(&entry),
                        MAX_RESPONSE_FRAME,
                        deadline(),
                        &mut |_, _| {},
                    )
                    .unwrap()
                    .unwrap();
                assert_eq!(r.stdout, b"hello from a Bulwark micro-VM\n");
            }
        }
        eprintln!(
            "warm start over {} VMs: start_waiting to agent handshake median {:.2} ms (min {:.2}, max {:.2}); provide_artifact median {:.3} ms (min {:.3}, max {:.3})",
            ready.len(),
            median(&mut ready).as_secs_f64() * 1e3,
            ready[0].as_secs_f64() * 1e3,
            ready[ready.len() - 1].as_secs_f64() * 1e3,
            median(&mut provide).as_secs_f64() * 1e3,
            provide[0].as_secs_f64() * 1e3,
            provide[provide.len() - 1].as_secs_f64() * 1e3,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_peer_that_drips_its_answer_cannot_stretch_the_deadline() {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let dripper = std::thread::spawn(move || {
            // A 100-byte frame, one byte every 20 ms: 2 s in all, each byte well within any
            // per-read timeout.
            let _ = theirs.write_all(&100u32.to_le_bytes());
            for _ in 0..100 {
                if theirs.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let deadline = Instant::now() + Duration::from_millis(200);
        let r: Result<Response, _> = frame::read(
            &mut Until {
                s: &mut ours,
                deadline,
            },
            MAX_RESPONSE_FRAME,
        );
        match r {
            Err(ReadError::Body(e)) => assert!(timed_out(&e), "{e}"),
            other => panic!("the read went past its deadline: {other:?}"),
        }
        drop(ours);
        dripper.join().unwrap();
    }

    /// A reusable `Vm` whose "VMM" is `sleep` and whose command socket's other end is
    /// returned, to play the VMM's side of the command protocol.
    fn fake_reusable_vm() -> (Vm, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let child = Command::new("sleep")
            .arg("30")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let dir = private_dir().unwrap();
        let uds = dir.join(SOCKET_NAME);
        let vm = Vm {
            child,
            dir,
            uds,
            abandoned: false,
            watched: None,
            artifact_socket: None,
            agent: None,
            reusable: true,
            control: Some(ours),
            snapshotted: false,
            resets: 0,
            mem_mib: 2,
        };
        (vm, theirs)
    }

    /// Reads one command on the VMM's side and answers `answer`.
    fn answer_command(vmm: &mut UnixStream, expect: &[u8; 8], answer: &[u8]) {
        let mut command = [0u8; COMMAND_LEN];
        vmm.read_exact(&mut command).unwrap();
        assert_eq!(&command[..8], expect);
        assert_eq!(command[8..], [0; 8]);
        vmm.write_all(answer).unwrap();
    }

    #[test]
    fn snapshot_and_reset_speak_the_command_protocol() {
        let (mut vm, mut vmm) = fake_reusable_vm();
        let deadline = || Instant::now() + Duration::from_secs(5);
        let e = vm.reset(deadline()).unwrap_err();
        assert!(e.to_string().contains("no snapshot"), "{e:#}");
        let side = std::thread::spawn(move || {
            answer_command(&mut vmm, b"SNAPSHOT", b"OK snapshot 1234\n");
            answer_command(&mut vmm, b"RESET\0\0\0", b"OK reset 10 7 3 250\n");
            answer_command(&mut vmm, b"RESET\0\0\0", b"OK reset 1 1 0 9\n");
            answer_command(&mut vmm, b"RESET\0\0\0", b"ERR memory differs at 0x1000\n");
            vmm
        });
        assert_eq!(vm.snapshot(deadline()).unwrap(), 1234);
        assert!(vm.is_snapshotted());
        let e = vm.snapshot(deadline()).unwrap_err();
        assert!(e.to_string().contains("already"), "{e:#}");
        assert_eq!(
            vm.reset(deadline()).unwrap(),
            ResetStats {
                pages_written: 10,
                pages_copied: 7,
                pages_zeroed: 3,
                micros: 250
            }
        );
        assert_eq!(vm.reset(deadline()).unwrap().micros, 9);
        assert_eq!(vm.resets(), 2);
        let e = vm.reset(deadline()).unwrap_err();
        assert!(
            e.to_string()
                .contains("refused to reset: memory differs at 0x1000"),
            "{e:#}"
        );
        // After a refusal the VM takes no more commands: it is to be killed.
        let e = vm.reset(deadline()).unwrap_err();
        assert!(e.to_string().contains("takes no commands"), "{e:#}");
        assert_eq!(vm.resets(), 2);
        drop(side.join().unwrap());
    }

    #[test]
    fn a_bad_late_or_missing_answer_to_a_command_fails_it() {
        // Garbage, a second line, a wrong count, a wrong word: each refused.
        for answer in [
            &b"OK snapshot x\n"[..],
            b"OK snapshot 1\nOK\n",
            b"OK snapshot 1 2\n",
            b"OK reset 1\n",
            b"YES\n",
        ] {
            let (mut vm, mut vmm) = fake_reusable_vm();
            let answer = answer.to_vec();
            let side = std::thread::spawn(move || {
                answer_command(&mut vmm, b"SNAPSHOT", &answer);
                vmm
            });
            let e = vm
                .snapshot(Instant::now() + Duration::from_secs(5))
                .unwrap_err();
            assert!(e.to_string().contains("unexpected answer"), "{e:#}");
            assert!(!vm.is_snapshotted());
            drop(side.join().unwrap());
        }
        // No answer by the deadline.
        let (mut vm, vmm) = fake_reusable_vm();
        let started = Instant::now();
        let e = vm
            .snapshot(Instant::now() + Duration::from_millis(100))
            .unwrap_err();
        assert!(e.to_string().contains("in time"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(vmm);
        // The VMM closed the socket (the fake VMM process is still running, so this is not
        // its report).
        let (mut vm, vmm) = fake_reusable_vm();
        drop(vmm);
        let e = vm
            .snapshot(Instant::now() + Duration::from_secs(5))
            .unwrap_err();
        assert!(format!("{e:#}").contains("snapshot"), "{e:#}");
        assert!(!vm.is_snapshotted());
    }

    #[test]
    fn answer_lines_parse_only_in_their_exact_form() {
        assert_eq!(parse_ok("OK snapshot 5", "snapshot", 1), Some(vec![5]));
        assert_eq!(
            parse_ok("OK reset 1 2 3 4", "reset", 4),
            Some(vec![1, 2, 3, 4])
        );
        assert_eq!(parse_ok("OK reset 1 2 3", "reset", 4), None);
        assert_eq!(parse_ok("OK reset 1 2 3 4 5", "reset", 4), None);
        assert_eq!(parse_ok("OK snapshot -1", "snapshot", 1), None);
        assert_eq!(parse_ok("OK  snapshot 1", "snapshot", 1), None);
        assert_eq!(parse_ok("OK reset 1 2 3 4", "snapshot", 4), None);
        assert_eq!(parse_ok("ERR snapshot 1", "snapshot", 1), None);
    }

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
