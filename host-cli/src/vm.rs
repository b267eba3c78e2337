//! Starting a VM for a call and talking to its agent over vsock.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulwark_proto::call::{AGENT_PORT, Request, Response};
use bulwark_proto::frame::{self, MAX_RESPONSE_FRAME, PREFIX};

/// A file next to the running executable, or in the source tree's `build/` when running from
/// `target/<profile>/` (for the guest image); `env` overrides both.
pub fn locate(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the bulwark executable")?;
    let dir = exe.parent().context("the executable has no directory")?;
    let candidates = [dir.join(name), dir.join("../../build").join(name)];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "cannot find {name} (looked in {} and {}); run `make guest` or set {env}",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// A running VM with a private directory for its vsock socket; killed and cleaned up on drop.
pub struct Vm {
    child: Child,
    dir: PathBuf,
    uds: PathBuf,
}

impl Vm {
    /// Starts `bulwark-vmm` with the guest image and a vsock device.
    pub fn start(mem_mib: u64, deadline: Instant) -> anyhow::Result<Self> {
        let vmm = locate("BULWARK_VMM", "bulwark-vmm")?;
        let guest = locate("BULWARK_GUEST", "bulwark-guest.elf")?;
        let dir = private_dir()?;
        let uds = dir.join("vsock.sock");
        let timeout = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let child = Command::new(&vmm)
            .arg("--mem-mib")
            .arg(mem_mib.to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--timeout")
            .arg(format!("{:.3}", timeout.as_secs_f64()))
            .arg(&guest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", vmm.display()))?;
        crate::interrupt::watch_vmm(child.id());
        let vm = Self { child, dir, uds };
        Ok(vm)
    }

    /// Why the VMM ended, if it has (its one-line report).
    pub fn failure(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let line = err
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("bulwark-vmm: ");
        Some(format!("the VM ended ({status}): {line}"))
    }

    /// Connects to the agent, sends `req` and returns its response, all before `deadline`.
    /// `Ok(None)` means the deadline passed.
    pub fn call(&mut self, req: &Request, deadline: Instant) -> anyhow::Result<Option<Response>> {
        // The VMM creates the socket, then listens on it: until it listens, a connection is
        // refused (or the path is not there yet). Keep trying until then, or until it dies.
        let mut s = loop {
            match UnixStream::connect(&self.uds) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => return Err(e).context("cannot connect to the VM's vsock socket"),
            }
            if let Some(why) = self.failure() {
                bail!("{why}");
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(200));
        };
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
        writeln!(s, "CONNECT {AGENT_PORT}")?;
        let mut line = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            match s.read(&mut byte) {
                Ok(0) => bail!(
                    self.failure()
                        .unwrap_or_else(|| "the guest agent refused the connection".into())
                ),
                Ok(_) => line.push(byte[0]),
                Err(e) if timed_out(&e) => return Ok(None),
                Err(e) => return Err(e).context("reading the vsock handshake"),
            }
            if line.len() > 32 {
                bail!("bad vsock handshake from the VM");
            }
        }
        if !line.starts_with(b"OK ") {
            bail!(
                "bad vsock handshake from the VM: {}",
                String::from_utf8_lossy(&line)
            );
        }
        let request =
            frame::encode(req).map_err(|e| anyhow::anyhow!("cannot encode the request: {e}"))?;
        s.set_write_timeout(Some(remaining()))?;
        if let Err(e) = s.write_all(&request) {
            return if timed_out(&e) {
                Ok(None)
            } else {
                Err(e).context("sending the request")
            };
        }
        let mut prefix = [0u8; PREFIX];
        s.set_read_timeout(Some(remaining()))?;
        match s.read_exact(&mut prefix) {
            Ok(()) => {}
            Err(e) if timed_out(&e) => return Ok(None),
            Err(_) => bail!(
                self.failure()
                    .unwrap_or_else(|| "the VM closed the connection".into())
            ),
        }
        let len =
            frame::body_len(prefix, MAX_RESPONSE_FRAME).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut body = vec![0u8; len];
        s.set_read_timeout(Some(remaining()))?;
        match s.read_exact(&mut body) {
            Ok(()) => {}
            Err(e) if timed_out(&e) => return Ok(None),
            Err(e) => return Err(e).context("reading the response"),
        }
        let response: Response =
            frame::decode(&body).map_err(|e| anyhow::anyhow!("bad response from the VM: {e}"))?;
        Ok(Some(response))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        crate::interrupt::forget_vmm();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory only we can use, under the system temp dir.
pub fn private_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
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
