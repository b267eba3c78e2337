//! Helpers for Bulwark's end-to-end tests and benchmarks: finding the built artifacts, checking
//! that `/dev/kvm` works, and running the VMM.
//!
//! The guest image and the precompiled self-test are built by `images/build.sh` (run by
//! `make test`) into `build/` at the repository root, or `$BULWARK_BUILD_DIR`.

pub mod bench;
pub mod http;
pub mod waiting;
pub mod wat;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The directory `images/build.sh` writes into.
pub fn build_dir() -> PathBuf {
    std::env::var_os("BULWARK_BUILD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build"))
}

/// A file in the build directory; panics with what to run if it is missing.
pub fn built(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make guest` (images/build.sh) first",
        path.display()
    );
    path
}

/// The guest ELF image.
pub fn guest_image() -> PathBuf {
    built("bulwark-guest.elf")
}

/// The precompiled Wasm self-test module.
pub fn selftest_module() -> PathBuf {
    built("selftest.cwasm")
}

/// The value the self-test's `run` export must return, from `images/selftest.expected`.
pub fn selftest_expected() -> i64 {
    let path = repo_root().join("images/selftest.expected");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} does not hold a number: {e}", path.display()))
}

/// A binary of this workspace built by the same cargo invocation as the running test (it sits
/// next to the test's `deps` directory), or the path in the environment variable `env`.
pub fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it (`cargo build -p bulwark-vmm`) or set {env}",
        path.display()
    );
    path
}

/// The `bulwark-vmm` binary.
pub fn vmm_binary() -> PathBuf {
    workspace_binary("bulwark-vmm", "BULWARK_VMM")
}

/// Whether tests that need `/dev/kvm` can run. Under CI (`CI=true`) a missing or unusable
/// `/dev/kvm` fails the test; elsewhere the test is skipped with a loud message.
pub fn kvm_available() -> bool {
    let problem = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => return true,
        Err(e) => format!("/dev/kvm is not usable: {e}"),
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {problem}: the end-to-end tests need KVM");
    }
    eprintln!("\n*** SKIPPED: {problem}. This test boots a real VM and needs /dev/kvm. ***\n");
    false
}

/// Runs `bulwark-vmm` with `args` and returns its output.
pub fn run_vmm<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(vmm_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start bulwark-vmm: {e}"))
}

/// Standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulwark-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A guest in its vsock-connect test mode: the VMM process (stderr piped, `--timings` on) and
/// the connection the guest opened to host port `HOST_TEST_PORT`, after its greeting was read
/// and checked.
pub fn start_connecting_guest(test: &str) -> (std::process::Child, std::os::unix::net::UnixStream) {
    use bulwark_abi::vsock::{GUEST_GREETING, HOST_TEST_PORT};
    use std::io::Read;
    let uds = scratch_dir(test).join("vsock.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_{HOST_TEST_PORT}", uds.display()))
            .unwrap_or_else(|e| panic!("cannot listen for the guest: {e}"));
    let child = Command::new(vmm_binary())
        .args([
            "--guest-test",
            "vsock-connect",
            "--vsock-guest-connect",
            "--timings",
            "--timeout",
            "300",
            "--vsock-uds",
        ])
        .arg(&uds)
        .arg(guest_image())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start bulwark-vmm: {e}"));
    let (mut conn, _) = listener
        .accept()
        .unwrap_or_else(|e| panic!("the guest never connected: {e}"));
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut greeting = vec![0u8; GUEST_GREETING.len()];
    conn.read_exact(&mut greeting)
        .unwrap_or_else(|e| panic!("no greeting from the guest: {e}"));
    assert_eq!(greeting, GUEST_GREETING);
    (child, conn)
}

/// The `bulwark` binary.
pub fn bulwark_binary() -> PathBuf {
    workspace_binary("bulwark", "BULWARK_CLI")
}

/// Runs `bulwark run ARGS` with `stdin` as standard input, a compile cache private to this test
/// binary, and the built guest image when there is one (only `--isolation vm` needs it).
pub fn bulwark_run(args: &[&str], stdin: &[u8]) -> Output {
    bulwark_command("run", args, stdin, &[])
}

/// Runs `bulwark COMMAND ARGS` from the repository root with `stdin` as standard input, `env`
/// added to its environment, a compile cache private to this test binary, and the built guest
/// image when there is one (only `--isolation vm` needs it).
pub fn bulwark_command(
    command: &str,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &std::ffi::OsStr)],
) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new(bulwark_binary());
    let guest = build_dir().join("bulwark-guest.elf");
    if guest.is_file() {
        cmd.env("BULWARK_GUEST", guest);
    }
    let cache = std::env::temp_dir().join(format!("bulwark-test-cache-{}", std::process::id()));
    let mut child = cmd
        .arg(command)
        .args(args)
        .current_dir(repo_root())
        .env("BULWARK_CACHE_DIR", cache)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
    if let Some(mut input) = child.stdin.take() {
        // A tool that exits without reading all of stdin closes the pipe: not an error here.
        let _ = input.write_all(stdin);
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("bulwark did not finish: {e}"))
}

/// The `bulwark-vmm` processes whose parent is `pid` (from /proc).
pub fn vmm_children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // pid (comm) state ppid ...
            let end = stat.rfind(')')?;
            let comm = &stat[stat.find('(')? + 1..end];
            let ppid: u32 = stat.get(end + 2..)?.split(' ').nth(1)?.parse().ok()?;
            (comm.starts_with("bulwark-vmm") && ppid == pid).then_some(child)
        })
        .collect()
}

/// A call request for the artifact at `artifact` (named by digest `[digest; 32]`, its size
/// read from the file), with `args` as argv, default limits and nothing else.
pub fn agent_request(
    artifact: &Path,
    digest: u8,
    args: Vec<String>,
) -> bulwark_proto::call::Request {
    let size = std::fs::metadata(artifact)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", artifact.display()))
        .len();
    bulwark_proto::call::Request {
        version: bulwark_proto::call::PROTOCOL_VERSION,
        artifact: bulwark_proto::call::Artifact {
            digest: [digest; 32],
            size,
        },
        args,
        env: Vec::new(),
        stdin: Vec::new(),
        dirs: Vec::new(),
        limits: bulwark_proto::call::Limits::default(),
        random_seed: [0; 32],
        realtime_ns: 0,
        stream: false,
    }
}

/// A connection to the guest agent through the VMM's vsock socket `uds`, after the `CONNECT`
/// handshake: retried for up to 20 s while the socket is not there yet, reads time out after
/// `read_timeout`.
pub fn connect_agent(
    uds: &Path,
    read_timeout: std::time::Duration,
) -> std::os::unix::net::UnixStream {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no vsock socket: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    s.set_read_timeout(Some(read_timeout))
        .unwrap_or_else(|e| panic!("cannot set a read timeout: {e}"));
    bulwark_abi::vsock::handshake::connect(&mut s, bulwark_proto::call::AGENT_PORT)
        .unwrap_or_else(|e| panic!("the agent refused the connection: {e}"));
    s
}
