//! A minimal HTTP/1.1 client for `bulwark serve`'s API in tests and benchmarks: one request per
//! connection (`Connection: close`), over its Unix socket or TCP. Enough for JSON in and out;
//! no chunked bodies, no keep-alive.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// An answer: status, headers (names in lowercase) and body.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request over `stream` and reads the whole answer.
pub fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let sent = stream
        .write_all(req.as_bytes())
        .and_then(|()| stream.write_all(body));
    match sent {
        // A server may answer before it reads the body (429 when it is full) and close the
        // connection: what it said is still there to read.
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        other => other?,
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

/// One request to the API at the Unix socket `socket`, with `content_type` when there is a body.
pub fn unix(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<Answer> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    exchange(
        stream,
        method,
        path,
        &[("Content-Type", content_type)],
        body,
    )
}

/// A JSON request to the API at `socket`.
pub fn json(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> std::io::Result<Answer> {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    unix(socket, method, path, "application/json", &bytes)
}

/// Standard base64 of `bytes` (for `module_base64` and friends).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A streamed answer's lines as they arrive (`Accept: application/x-ndjson`): each line with the
/// time it was read. The body must be chunked (as a streamed body is); the status must be 200.
pub fn stream_lines(
    socket: &Path,
    path: &str,
    body: &serde_json::Value,
) -> std::io::Result<Vec<(std::time::Instant, String)>> {
    use std::io::BufRead;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes())?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut r = std::io::BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(bad(format!("status line {line:?}")));
    }
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        return Err(bad("the streamed body is not chunked".into()));
    }
    let mut lines = Vec::new();
    let mut pending = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim(), 16)
            .map_err(|e| bad(format!("chunk size {line:?}: {e}")))?;
        if size == 0 {
            break;
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk)?;
        chunk.truncate(size);
        let now = std::time::Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(&pending[..end]).into_owned();
            lines.push((now, text));
            pending.drain(..=end);
        }
    }
    Ok(lines)
}

/// A running `bulwark serve`, killed (SIGKILL) on drop if still running.
pub struct Server {
    /// The server process.
    pub child: std::process::Child,
    /// Its API socket.
    pub socket: std::path::PathBuf,
    /// Its log (standard error).
    pub log: std::path::PathBuf,
}

impl Server {
    /// Starts `bulwark serve --socket SOCKET ARGS` with the compile cache `cache` and the built
    /// guest image, its log in `log` beside the socket, and waits until it answers. Unless
    /// `args` name them, the Python and JavaScript pools are off (`--pool-python 0
    /// --pool-javascript 0`): a test that runs no language code boots no VM for them.
    pub fn start(socket: &Path, cache: &Path, args: &[&str]) -> Self {
        Self::start_with_env(socket, cache, args, &[])
    }

    /// [`Server::start`], with the environment variables `env` set for the server.
    pub fn start_with_env(
        socket: &Path,
        cache: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = args.to_vec();
        for flag in ["--pool-python", "--pool-javascript"] {
            if !args.contains(&flag) {
                args.extend([flag, "0"]);
            }
        }
        let log = socket.with_extension("log");
        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let child = std::process::Command::new(crate::bulwark_binary())
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(&args)
            .current_dir(crate::repo_root())
            .env("BULWARK_GUEST", crate::guest_image())
            .env("BULWARK_CACHE_DIR", cache)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bulwark serve: {e}"));
        let server = Self {
            child,
            socket: socket.to_owned(),
            log,
        };
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(socket).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "bulwark serve did not listen on {}: {}",
                socket.display(),
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new private (0700) directory for a server's socket, `name` in the system temp dir.
pub fn socket_dir(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("bw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("cannot make {} private: {e}", dir.display()));
    dir
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar\xff"), "Zm9vYmFy/w==");
    }
}
