//! `bulwark serve`: tool calls over HTTP (axum on tokio), from a warm pool of VMs.
//!
//! The API listens on a Unix socket (mode 0600, in a directory only we may write) unless TCP is
//! asked for, and then every request must carry the bearer token. At most `--max-concurrent`
//! calls run at once (one more is answered 429 with `Retry-After`); request bodies are capped.
//! Ctrl-C or SIGTERM stops taking connections, lets the calls in flight finish (each within its
//! own deadline, which the server caps), then destroys the pool's VMs; a second one cancels
//! the calls still running.

mod api;
mod modules;
pub(crate) mod pool;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use crate::cli::{PoolPages, ServeArgs};
use crate::vm::HeapPages;

/// Shortest bearer token accepted.
const MIN_TOKEN_LEN: usize = 32;

/// Runs `bulwark serve` until Ctrl-C or SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    if args.max_concurrent == 0 {
        bail!("--max-concurrent 0 would refuse every call: give 1 or more");
    }
    let token = match (&args.listen, &args.token_file) {
        (Some(_), Some(file)) => Some(read_token(file)?),
        (None, Some(_)) => bail!("--token-file is for --listen (TCP); a Unix socket needs none"),
        _ => None,
    };
    // Listen first: the socket is bound under a strict umask, before any other thread (the
    // pool's) creates files.
    let listener = match args.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            Listener::Tcp(l, addr)
        }
        None => {
            let path = match &args.socket {
                Some(p) => p.clone(),
                None => default_socket()?,
            };
            Listener::Unix(bind_unix(&path)?, path)
        }
    };
    let served = serve_on(args, token, &listener);
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    served
}

/// Where the API listens.
enum Listener {
    /// TCP, at this address.
    Tcp(std::net::TcpListener, std::net::SocketAddr),
    /// A Unix socket, at this path.
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Starts the pool and serves the API on `listener` until Ctrl-C or SIGTERM.
fn serve_on(args: &ServeArgs, token: Option<String>, listener: &Listener) -> anyhow::Result<()> {
    let store = modules::Store::open(args.max_store)?;
    let language = |target| pool::RuntimePolicy {
        target,
        pages: HeapPages::Huge,
    };
    let pool = pool::Pool::start(
        [
            pool::RuntimePolicy {
                target: args.pool,
                pages: match args.pool_pages {
                    PoolPages::Small => HeapPages::Small,
                    PoolPages::Huge => HeapPages::Huge,
                },
            },
            language(args.pool_python),
            language(args.pool_javascript),
        ],
        args.pool_mem_mib,
        pool::ReusePolicy {
            enabled: args.reuse,
            max_idle: args.reuse_idle,
            ttl: args.reuse_ttl,
            max_rss: args.reuse_max_rss,
        },
    )?;
    let app = Arc::new(api::App {
        store,
        pool,
        permits: Arc::new(tokio::sync::Semaphore::new(args.max_concurrent)),
        caps: api::Caps {
            timeout: args.max_timeout,
            max_memory: args.max_memory,
            max_output: args.max_output,
            max_files_size: args.max_files_size,
        },
        running: Arc::default(),
    });
    let body_limit = usize::try_from(args.max_body).unwrap_or(usize::MAX);
    let mut router = Router::new()
        .route("/v1/runs", post(api::runs))
        .route("/v1/modules", post(api::modules))
        .route("/v1/health", get(api::health))
        .route("/v1/pool", get(api::pool))
        .route("/v1/openapi.json", get(api::openapi))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            api::slot_free,
        ))
        .with_state(Arc::clone(&app));
    if let Some(token) = token {
        router = router.layer(middleware::from_fn_with_state(Arc::new(token), bearer));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bulwark-serve")
        .build()
        .context("cannot start the server's runtime")?;
    let served = runtime.block_on(async {
        match listener {
            Listener::Tcp(l, addr) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l.try_clone()?)?;
                eprintln!(
                    "bulwark serve: listening on http://{addr} (bearer token required); {}{}",
                    pool_note(args),
                    reuse_note(args)
                );
                axum::serve(l, router)
                    .with_graceful_shutdown(shutdown(Arc::clone(&app.running)))
                    .await
                    .context("the server failed")
            }
            Listener::Unix(l, path) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l.try_clone()?)?;
                eprintln!(
                    "bulwark serve: listening on {} (curl --unix-socket {} http://localhost/v1/health); {}{}",
                    path.display(),
                    path.display(),
                    pool_note(args),
                    reuse_note(args)
                );
                axum::serve(l, router)
                    .with_graceful_shutdown(shutdown(Arc::clone(&app.running)))
                    .await
                    .context("the server failed")
            }
        }
    });
    eprintln!("bulwark serve: stopped; destroying the pool's VMs and the kept ones");
    app.pool.stop();
    served
}

/// The pools, in words, for the log.
fn pool_note(args: &ServeArgs) -> String {
    format!(
        "pools of {} Wasm VMs ({} pages), {} Python, {} JavaScript",
        args.pool,
        match args.pool_pages {
            PoolPages::Small => "small",
            PoolPages::Huge => "huge",
        },
        args.pool_python,
        args.pool_javascript
    )
}

/// What the start-up line says of reuse.
fn reuse_note(args: &ServeArgs) -> String {
    if args.reuse {
        format!(
            "; reuse on for calls with a tenant (at most {} kept idle, each at most {:?})",
            args.reuse_idle, args.reuse_ttl
        )
    } else {
        String::new()
    }
}

/// Resolves when Ctrl-C or SIGTERM arrives. A second one cancels the calls still running
/// (their VMs are killed), so the server ends at once.
async fn shutdown(running: Arc<crate::cancel::Running>) {
    stop_signal().await;
    eprintln!(
        "bulwark serve: stopping: no new connections; finishing the calls in flight (Ctrl-C or SIGTERM again cancels them)"
    );
    tokio::spawn(async move {
        stop_signal().await;
        let n = running.cancel_all();
        eprintln!("bulwark serve: cancelled the {n} calls still running");
    });
}

/// Resolves at the next Ctrl-C or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Refuses a request without `Authorization: Bearer <token>` (compared in constant time).
async fn bearer(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        next.run(req).await
    } else {
        let mut r = api::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        r
    }
}

/// Whether `a` and `b` are equal, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token in `file`: one line, at least [`MIN_TOKEN_LEN`] characters, in a file others
/// cannot read.
fn read_token(file: &Path) -> anyhow::Result<String> {
    let f = crate::compile::open_regular_nofollow(file)
        .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", file.display()))?;
    let meta = f.metadata()?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "the token file {} may be read by others (mode {:o}): `chmod 600 {}`",
            file.display(),
            meta.mode() & 0o7777,
            file.display()
        );
    }
    let mut text = String::new();
    use std::io::Read;
    (&f).take(4096)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read the token file {}", file.display()))?;
    let token = text.trim().to_owned();
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "the token in {} must be one word of at least {MIN_TOKEN_LEN} characters (for example `openssl rand -hex 32`)",
            file.display()
        );
    }
    Ok(token)
}

/// `$XDG_RUNTIME_DIR/bulwark.sock`, else `/tmp/bulwark-<uid>/bulwark.sock`.
fn default_socket() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Ok(PathBuf::from(dir).join("bulwark.sock"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = PathBuf::from(format!("/tmp/bulwark-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    // Anyone may create that name in /tmp first: it must be a real directory of ours that
    // nobody else may enter (a link, or someone else's directory, could hand our socket to
    // them).
    let meta =
        std::fs::symlink_metadata(&dir).with_context(|| format!("cannot use {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        bail!(
            "{} is not a private directory of yours (a link, someone else's, or open to others): remove it, or give --socket in a directory of your own",
            dir.display()
        );
    }
    Ok(dir.join("bulwark.sock"))
}

/// Binds the API's Unix socket at `path`: its directory must be ours and writable by nobody
/// else (or sticky, as /tmp), a stale socket of ours is replaced, anything else there is
/// refused; the socket is made mode 0600.
fn bind_unix(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot use the socket's directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "the socket's directory {} is not a directory (a link?): give --socket in a directory of your own",
            dir.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let others_write = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
    if meta.uid() != me && meta.uid() != 0 || others_write {
        bail!(
            "the socket's directory {} is not private to you (owner {}, mode {:o}): others could replace the socket; use a directory of your own",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.uid() == me => {
            // A socket nobody answers on is a stale one of ours: replace it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use: another bulwark serve is listening there",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket of yours: choose another --socket",
            path.display()
        ),
        Err(_) => {}
    }
    // Created 0600 from the start (the umask covers the moment between bind and chmod).
    // SAFETY: umask has no preconditions; nothing else creates files while the server starts.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; the previous mask is put back.
    unsafe { libc::umask(old_mask) };
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
