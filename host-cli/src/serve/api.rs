//! The HTTP API's types and handlers: `/v1/runs`, `/v1/modules`, `/v1/health`, `/v1/pool` and
//! the OpenAPI document generated from these types.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bulwark_proto::call::Outcome;
use bulwark_proto::tree::{self, Entry, Node, SharedDir};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use utoipa::{OpenApi, ToSchema};

use super::modules::{Store, StoreError, StoreStatus, parse_digest};
use super::pool::{Pool, PoolStatus, ReuseStatus, Runtime, RuntimeStatus};
use crate::call::{self, CallError, CallLimits, CallSpec, Finished};
use crate::cancel::{Cancel, Running};
use crate::compile::hex;
use crate::lang::{self, Lang};
use crate::vm::OutputStream;

/// Where a run's `files` are, for the tool.
pub const WORK_DIR: &str = "/work";
/// Most files (and directories) a run may send or ask back.
const MAX_FILES: usize = 10_000;
/// Longest `tenant`, in bytes.
pub const MAX_TENANT: usize = 128;

/// What every handler shares.
pub struct App {
    /// Uploaded modules.
    pub store: Store,
    /// The warm pool.
    pub pool: Pool,
    /// One permit per call (or upload) that may run at once.
    pub permits: Arc<Semaphore>,
    /// The most a call may ask for.
    pub caps: Caps,
    /// The calls (and uploads) running now, to cancel when the server must stop at once.
    pub running: Arc<Running>,
}

/// The largest limits a call may ask for (`bulwark serve --max-timeout` and friends): the
/// server is shared, so no one call may claim it whole.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Wall-clock time.
    pub timeout: Duration,
    /// Linear memory, bytes.
    pub max_memory: u64,
    /// Output, bytes of each stream.
    pub max_output: u64,
    /// `/work`, bytes in and out.
    pub max_files_size: u64,
}

impl Caps {
    /// Refuses `limits` past these caps, naming the flag that sets the cap.
    fn check(&self, limits: &CallLimits) -> Result<(), Reject> {
        let over = |what: &str, asked: String, cap: String, flag: &str| {
            bad(format!(
                "limits.{what} {asked} is over this server's {cap} (bulwark serve --{flag})"
            ))
        };
        if limits.timeout > self.timeout {
            return Err(over(
                "timeout_ms",
                limits.timeout.as_millis().to_string(),
                format!("{} ms", self.timeout.as_millis()),
                "max-timeout",
            ));
        }
        for (what, asked, cap, flag) in [
            (
                "max_memory",
                limits.max_memory,
                self.max_memory,
                "max-memory",
            ),
            (
                "max_output",
                limits.max_output,
                self.max_output,
                "max-output",
            ),
            (
                "max_files_size",
                limits.max_dir_size,
                self.max_files_size,
                "max-files-size",
            ),
        ] {
            if asked > cap {
                return Err(over(what, asked.to_string(), format!("{cap} bytes"), flag));
            }
        }
        Ok(())
    }
}

/// The language of a run's `code`.
#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// CPython 3.12: `code` runs as `python -c CODE`.
    Python,
    /// QuickJS-NG: `code` runs as `qjs --std -e CODE`.
    Javascript,
}

/// A file the tool finds under `/work`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileIn {
    /// Path under `/work`: relative, `/` between components, no `.` or `..`.
    pub path: String,
    /// The file's contents as text.
    pub content: Option<String>,
    /// The file's contents, base64 (instead of `content`).
    pub content_base64: Option<String>,
}

/// The limits of a run; each missing one is `bulwark run`'s default.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunLimits {
    /// Wall-clock time in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
    /// Largest linear memory in bytes (default 256 MiB).
    pub max_memory: Option<u64>,
    /// Most bytes kept of stdout, and of stderr (default 16 MiB).
    pub max_output: Option<u64>,
    /// A fuel budget (default: none).
    pub fuel: Option<u64>,
    /// Most bytes of `/work`, in and out (default 64 MiB).
    pub max_files_size: Option<u64>,
    /// Most entries of `/work`, in and out.
    pub max_files: Option<u32>,
}

/// `POST /v1/runs`: one tool call, in a VM no other call has run in (with `bulwark serve
/// --reuse` and a `tenant`: at most an earlier call of the same tenant and module, see
/// `tenant`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// A module uploaded before (`POST /v1/modules`), by its SHA-256 in hex.
    pub module: Option<String>,
    /// A module given inline, base64 (binary Wasm or text); it is stored as an upload is.
    pub module_base64: Option<String>,
    /// Run `code` in this language's runtime instead of a module.
    pub language: Option<Language>,
    /// The program, with `language`.
    pub code: Option<String>,
    /// Arguments (after `argv[0]`; for code, after the program).
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Standard input as text.
    pub stdin: Option<String>,
    /// Standard input, base64 (instead of `stdin`).
    pub stdin_base64: Option<String>,
    /// Files the tool finds under `/work` (it may change them; nothing is written anywhere).
    #[serde(default)]
    pub files: Vec<FileIn>,
    /// Paths under `/work` to send back as the tool left them (a directory: all under it;
    /// `.`: everything), when it exits 0.
    #[serde(default)]
    pub return_files: Vec<String>,
    /// The call's limits.
    #[serde(default)]
    pub limits: RunLimits,
    /// The tenant the call runs for: an opaque name (1 to 128 bytes, no control characters)
    /// that the API's caller, such as an agent platform, sets per tenant of its own. Only with
    /// `bulwark serve --reuse` does it matter: the call may then get a VM kept from an earlier
    /// call of the same tenant, module and memory size, reset to its snapshot in between (every
    /// page that call wrote restored, vCPU and devices too; a VM is never kept after a trap,
    /// timeout, cut output or error). Without `--reuse`, a call with a tenant runs exactly as
    /// one without: in a VM of its own.
    pub tenant: Option<String>,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// The tool exited (`exit` is its code).
    Exited,
    /// The tool trapped (`message` says how).
    Trapped,
    /// The tool used all its fuel.
    OutOfFuel,
    /// The guest refused the module (it cannot be instantiated).
    Refused,
    /// The time limit ran out; the VM was killed.
    TimedOut,
    /// The call was cancelled (the server is stopping).
    Cancelled,
    /// Bulwark failed, or refused the call's limits (`message` says what).
    Failed,
}

/// A file (or directory or link) the tool left under `/work`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FileOut {
    /// Path under `/work`.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: &'static str,
    /// A file's contents, when they are UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A file's contents, base64, when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// A link's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Where a run's time went, in microseconds.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct RunTimings {
    /// To a compiled module (a cache hit included).
    pub compile: u64,
    /// Getting a VM: a pooled one, or a fresh start.
    pub vm_start: u64,
    /// The call inside the VM, request to answer.
    pub call: u64,
    /// The whole call.
    pub total: u64,
    /// In the guest: loading the module.
    pub guest_load: u64,
    /// In the guest: instantiating it.
    pub guest_instantiate: u64,
    /// In the guest: running it.
    pub guest_run: u64,
}

/// The answer to `POST /v1/runs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunResponse {
    /// How the run ended.
    pub status: RunStatus,
    /// `bulwark run`'s exit status for it: the tool's code, or 123-134 (`bulwark run --help`).
    pub exit_code: u8,
    /// The tool's own exit code, when it exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<i32>,
    /// The trap, refusal or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Standard output (invalid UTF-8 replaced; see `stdout_base64`).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced; see `stderr_base64`).
    pub stderr: String,
    /// Standard output exactly, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    /// Standard error exactly, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    /// Output past `max_output` was dropped.
    pub output_truncated: bool,
    /// The `return_files` the tool left (only when it exited 0).
    pub files: Vec<FileOut>,
    /// Fuel used, with a fuel budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel_consumed: Option<u64>,
    /// Where the time went.
    pub timings_us: RunTimings,
    /// The VM had served an earlier call of the same `tenant` and module (`bulwark serve
    /// --reuse`), and was reset to its snapshot since.
    pub reused: bool,
}

/// The answer to `POST /v1/modules`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModuleStored {
    /// The module's SHA-256 in hex: name it as `module` in a run.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it was new here.
    pub new: bool,
}

/// `GET /v1/health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: &'static str,
    /// Bulwark's version.
    pub version: &'static str,
    /// Calls that may start now.
    pub free_slots: usize,
    /// The module store.
    pub store: StoreStatus,
}

/// An error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// What was wrong, and what to do.
    pub error: String,
}

/// An error answer with `status`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Answers 429 at once, before a call's body is read, when every call slot is taken (the
/// handler takes its slot for real; this only spares a busy server reading bodies it would
/// refuse anyway).
pub async fn slot_free(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let takes_a_slot = req.method() == axum::http::Method::POST;
    if takes_a_slot && app.permits.available_permits() == 0 {
        return busy();
    }
    next.run(req).await
}

/// 429 with `Retry-After`: every call slot is taken.
fn busy() -> Response {
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "every call slot is taken (--max-concurrent): retry shortly",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Cancels its call when dropped before [`CancelOnDrop::disarm`]: a client that goes away
/// drops the handler's future, and its call stops.
struct CancelOnDrop(Option<Cancel>);

impl CancelOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.cancel();
        }
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Bulwark",
        description = "Runs untrusted WebAssembly tools, Python and JavaScript in KVM micro-VMs."
    ),
    paths(runs, modules, health, pool),
    components(schemas(
        RunRequest,
        RunResponse,
        FileIn,
        FileOut,
        RunLimits,
        RunStatus,
        RunTimings,
        Language,
        ModuleStored,
        Health,
        StoreStatus,
        ApiError,
        PoolStatus,
        RuntimeStatus,
        Runtime,
        ReuseStatus
    ))
)]
pub struct ApiDoc;

/// `GET /v1/openapi.json`.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Whether the server is up.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health(State(app): State<Arc<App>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        free_slots: app.permits.available_permits(),
        store: app.store.status(),
    })
}

/// The warm pool's state.
#[utoipa::path(get, path = "/v1/pool", responses((status = 200, body = PoolStatus)))]
pub async fn pool(State(app): State<Arc<App>>) -> Json<PoolStatus> {
    Json(app.pool.status())
}

/// Uploads a module (binary Wasm or text, the request body); it is compiled for the guest now.
#[utoipa::path(post, path = "/v1/modules", request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses((status = 201, body = ModuleStored), (status = 200, body = ModuleStored, description = "already stored"),
              (status = 422, body = ApiError, description = "not a module the guest can run"),
              (status = 429, body = ApiError)))]
pub async fn modules(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let Ok(permit) = Arc::clone(&app.permits).try_acquire_owned() else {
        return busy();
    };
    let cancel = Cancel::new();
    let guard = CancelOnDrop(Some(cancel.clone()));
    let size = body.len() as u64;
    let worker = Arc::clone(&app);
    let stored = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = worker.running.enter(&cancel);
        worker.store.put(&body, &cancel)
    })
    .await;
    guard.disarm();
    match stored {
        Ok(Ok((digest, new))) => (
            if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(ModuleStored {
                digest: hex(&digest),
                size,
                new,
            }),
        )
            .into_response(),
        Ok(Err(StoreError::Module(m))) => error(StatusCode::UNPROCESSABLE_ENTITY, m),
        Ok(Err(StoreError::Bulwark(m))) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the upload failed: {e}"),
        ),
    }
}

/// Runs one call. With `Accept: application/x-ndjson` the answer streams: one JSON line per
/// chunk of output as the tool writes it (`{"stdout": "…"}` or `{"stderr": "…"}`, or
/// `stdout_base64`/`stderr_base64` for a chunk that is not UTF-8), then one line with the
/// outcome (a `RunResponse`, whose `stdout` and `stderr` are then empty).
#[utoipa::path(post, path = "/v1/runs", request_body = RunRequest,
    responses((status = 200, body = RunResponse, description = "the call ran, or ended (see status); with Accept: application/x-ndjson, output lines and then this"),
              (status = 400, body = ApiError, description = "the request is malformed"),
              (status = 404, body = ApiError, description = "no module with that digest"),
              (status = 429, body = ApiError, description = "every call slot is taken")))]
pub async fn runs(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(req): Json<RunRequest>,
) -> Response {
    let Ok(permit) = Arc::clone(&app.permits).try_acquire_owned() else {
        return busy();
    };
    let cancel = Cancel::new();
    let guard = CancelOnDrop(Some(cancel.clone()));
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON));
    if streaming {
        return stream_run(app, req, cancel, guard, permit).await;
    }
    let worker = Arc::clone(&app);
    let answer = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = worker.running.enter(&cancel);
        run_blocking(&worker, req, &cancel)
    })
    .await;
    guard.disarm();
    match answer {
        Ok(r) => r,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the call failed: {e}"),
        ),
    }
}

/// The media type of a streamed run.
const NDJSON: &str = "application/x-ndjson";
/// Lines a streamed run may have waiting for a slow client before the call waits too (and the
/// tool with it, once the guest's vsock buffers are full).
const STREAM_BACKLOG: usize = 64;

/// A streamed run: the request is checked first (a bad one is answered as without streaming),
/// then the answer's body carries the output lines and the outcome line. A client that goes
/// away drops the body, which cancels the call.
async fn stream_run(
    app: Arc<App>,
    req: RunRequest,
    cancel: Cancel,
    guard: CancelOnDrop,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BACKLOG);
    let (spec_tx, spec_rx) = tokio::sync::oneshot::channel::<Option<Response>>();
    let worker = Arc::clone(&app);
    let call_cancel = cancel.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _running = worker.running.enter(&call_cancel);
        let Prepared {
            spec,
            wanted,
            tenant,
            runtime,
        } = match spec_of(&worker, req, &call_cancel) {
            Ok(s) => {
                let _ = spec_tx.send(None);
                s
            }
            Err(r) => {
                let _ = spec_tx.send(Some(r.into_response()));
                return;
            }
        };
        let sent = spec
            .files
            .first()
            .map(|d| d.entries.clone())
            .unwrap_or_default();
        // A client that stops reading may hold the call up to its deadline, not past it.
        let until = std::time::Instant::now() + spec.limits.timeout;
        let mut sink = |which: OutputStream, bytes: &[u8]| {
            let chunk = OutputLine::new(which, bytes);
            if !send_until(&tx, json_line(&chunk), until) {
                // The client is gone, or reads too slowly: the call ends.
                call_cancel.cancel();
            }
        };
        let vms = worker.pool.for_call(runtime, tenant);
        let result = call::call_streaming(spec, &call_cancel, &vms, &mut sink);
        let outcome = match result {
            Ok(finished) => finished_response(finished, &sent, &wanted),
            Err(e) => failed_response(&e),
        };
        log_run(&worker, &outcome, true);
        let _ = send_until(
            &tx,
            json_line(&outcome),
            std::time::Instant::now() + FINAL_LINE_WAIT,
        );
    });
    match spec_rx.await {
        Ok(None) => {}
        Ok(Some(refused)) => {
            guard.disarm();
            return refused;
        }
        Err(_) => {
            guard.disarm();
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the call failed to start",
            );
        }
    }
    let body = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let Some(next) = rx.recv().await else {
            // All sent: the call is over, nothing to cancel.
            guard.disarm();
            return None;
        };
        Some((Ok::<_, std::convert::Infallible>(next), (rx, guard)))
    });
    let mut r = Response::new(axum::body::Body::from_stream(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    r
}

/// How long the outcome line of a streamed run waits for a slow client.
const FINAL_LINE_WAIT: Duration = Duration::from_secs(10);

/// Queues `line` for the client, waiting for room until `until` at the latest; whether it was
/// queued (false: the client is gone or did not read in time).
fn send_until(
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    line: Bytes,
    until: std::time::Instant,
) -> bool {
    use tokio::sync::mpsc::error::TrySendError;
    let mut line = line;
    loop {
        match tx.try_send(line) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(back)) => {
                if std::time::Instant::now() >= until {
                    return false;
                }
                line = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// One streamed chunk of output.
#[derive(Serialize)]
struct OutputLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_base64: Option<String>,
}

impl OutputLine {
    fn new(which: OutputStream, bytes: &[u8]) -> Self {
        let (text, exact) = match std::str::from_utf8(bytes) {
            Ok(t) => (Some(t.to_owned()), None),
            Err(_) => (None, Some(BASE64.encode(bytes))),
        };
        match which {
            OutputStream::Stdout => Self {
                stdout: text,
                stdout_base64: exact,
                stderr: None,
                stderr_base64: None,
            },
            OutputStream::Stderr => Self {
                stdout: None,
                stdout_base64: None,
                stderr: text,
                stderr_base64: exact,
            },
        }
    }
}

/// The server's log line for a finished run, with the pool's state.
fn log_run(app: &App, r: &RunResponse, streamed: bool) {
    let pool = app.pool.status();
    let reuse = &pool.reuse;
    let reuse = if reuse.enabled {
        format!(
            "; reuse {} idle, {} hits, {} resets (last {} µs), {} reset failures, {} not kept, {} evicted, {} expired",
            reuse.idle,
            reuse.hits,
            reuse.resets,
            reuse.last_reset_us.unwrap_or(0),
            reuse.reset_failures,
            reuse.not_kept,
            reuse.evicted,
            reuse.expired
        )
    } else {
        String::new()
    };
    eprintln!(
        "bulwark serve: run{} {:?} exit {} in {} µs (vm {} µs, {}); pool {}/{} ready, {} hits, {} misses, {} failures{reuse}",
        if streamed { " (streamed)" } else { "" },
        r.status,
        r.exit_code,
        r.timings_us.total,
        r.timings_us.vm_start,
        if r.reused { "reused" } else { "fresh" },
        pool.ready,
        pool.target,
        pool.hits,
        pool.misses,
        pool.failures
    );
}

/// `v` as one line of JSON.
fn json_line<T: Serialize>(v: &T) -> Bytes {
    let mut bytes = serde_json::to_vec(v)
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot encode a line: {e}\"}}").into_bytes());
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A request refused before its call started: the status and what was wrong.
struct Reject(StatusCode, String);

impl Reject {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// A bad request's answer.
fn bad(message: impl Into<String>) -> Reject {
    Reject(StatusCode::BAD_REQUEST, message.into())
}

/// Decodes base64 `field`.
fn base64(field: &str, value: &str) -> Result<Vec<u8>, Reject> {
    BASE64
        .decode(value)
        .map_err(|e| bad(format!("{field} is not base64: {e}")))
}

/// The call a request asks for, or the answer for a bad one.
fn spec_of(app: &App, req: RunRequest, cancel: &Cancel) -> Result<Prepared, Reject> {
    if let Some(tenant) = &req.tenant {
        check_tenant(tenant)?;
    }
    let runtime = match req.language {
        None => Runtime::Wasm,
        Some(Language::Python) => Runtime::Python,
        Some(Language::Javascript) => Runtime::Javascript,
    };
    let mut spec = match (&req.module, &req.module_base64, req.language, req.code) {
        (Some(digest), None, None, None) => {
            let digest = parse_digest(digest)
                .ok_or_else(|| bad("module is not a SHA-256 in lowercase hex (64 digits)"))?;
            app.store.touch(&digest);
            if !app.store.has(&digest) {
                return Err(Reject(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no module {} here: upload it with POST /v1/modules",
                        hex(&digest)
                    ),
                ));
            }
            let mut spec = CallSpec::new(app.store.path(&digest));
            spec.expect_sha256 = Some(digest);
            spec
        }
        (None, Some(inline), None, None) => {
            let bytes = base64("module_base64", inline)?;
            let (digest, _) = app.store.put(&bytes, cancel).map_err(|e| match e {
                StoreError::Module(m) => Reject(StatusCode::UNPROCESSABLE_ENTITY, m),
                StoreError::Bulwark(m) => Reject(StatusCode::INTERNAL_SERVER_ERROR, m),
            })?;
            let mut spec = CallSpec::new(app.store.path(&digest));
            spec.expect_sha256 = Some(digest);
            spec
        }
        (None, None, Some(language), Some(code)) => {
            let lang = match language {
                Language::Python => Lang::Python,
                Language::Javascript => Lang::Js,
            };
            lang::code_spec(lang, code, &req.args).map_err(|e| {
                Reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{language:?} is not available on this server: {e:#}"),
                )
            })?
        }
        _ => {
            return Err(bad(
                "give exactly one of: module (a digest), module_base64, or language with code",
            ));
        }
    };
    if spec.pinned_sha256.is_none() {
        spec.program = Some("tool".into());
        spec.args = req.args;
    }
    for (name, value) in &req.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(bad(format!(
                "env {name:?}: a name is not empty and holds no `=` or NUL; a value holds no NUL"
            )));
        }
    }
    spec.env = req.env.into_iter().collect();
    spec.stdin = match (req.stdin, req.stdin_base64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64("stdin_base64", &b64)?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => return Err(bad("give stdin or stdin_base64, not both")),
    };
    let defaults = CallLimits::default();
    let l = req.limits;
    spec.limits = CallLimits {
        timeout: l.timeout_ms.map_or(defaults.timeout, Duration::from_millis),
        max_memory: l.max_memory.unwrap_or(defaults.max_memory),
        max_output: l.max_output.unwrap_or(defaults.max_output),
        fuel: l.fuel,
        max_dir_size: l.max_files_size.unwrap_or(defaults.max_dir_size),
        max_dir_files: l.max_files.unwrap_or(defaults.max_dir_files),
        mem_mib: None,
    };
    app.caps.check(&spec.limits)?;
    if !req.files.is_empty() || !req.return_files.is_empty() {
        spec.files = vec![work_dir(req.files)?];
    }
    for path in &req.return_files {
        if path != "." {
            tree::check_path(path).map_err(|e| bad(format!("return_files {path:?}: {e}")))?;
        }
    }
    if req.return_files.len() > MAX_FILES {
        return Err(bad(format!("return_files names over {MAX_FILES} paths")));
    }
    Ok(Prepared {
        spec,
        wanted: req.return_files,
        tenant: req.tenant,
        runtime,
    })
}

/// A run's call, checked: the spec, the `return_files`, the tenant.
struct Prepared {
    spec: CallSpec,
    wanted: Vec<String>,
    tenant: Option<String>,
    /// Which pool serves the call.
    runtime: Runtime,
}

/// Refuses a `tenant` that is empty, longer than [`MAX_TENANT`] bytes, or holds a control
/// character.
fn check_tenant(tenant: &str) -> Result<(), Reject> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT || tenant.chars().any(char::is_control) {
        return Err(bad(format!(
            "tenant must be 1 to {MAX_TENANT} bytes with no control characters"
        )));
    }
    Ok(())
}

/// The `/work` tree of a run's `files`: each file, after the directories that hold it.
fn work_dir(files: Vec<FileIn>) -> Result<SharedDir, Reject> {
    if files.len() > MAX_FILES {
        return Err(bad(format!("over {MAX_FILES} files")));
    }
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for f in files {
        tree::check_path(&f.path).map_err(|e| bad(format!("files {:?}: {e}", f.path)))?;
        let bytes = match (f.content, f.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => base64("content_base64", &b64)?,
            _ => {
                return Err(bad(format!(
                    "files {:?}: give content or content_base64",
                    f.path
                )));
            }
        };
        let mut parent = String::new();
        let parts: Vec<&str> = f.path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match nodes.get(&parent) {
                None => {
                    nodes.insert(parent.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => {
                    return Err(bad(format!(
                        "files: {parent:?} is both a file and a directory"
                    )));
                }
            }
        }
        if nodes.insert(f.path.clone(), Node::File(bytes)).is_some() {
            return Err(bad(format!(
                "files: {:?} is given twice, or is also a directory",
                f.path
            )));
        }
    }
    // Parents sort before their children ("a" < "a/b"), as a tree lists them.
    Ok(SharedDir {
        guest_path: WORK_DIR.into(),
        entries: nodes
            .into_iter()
            .map(|(path, node)| Entry { path, node })
            .collect(),
    })
}

/// Runs the call a request asks for, on a blocking thread.
fn run_blocking(app: &App, req: RunRequest, cancel: &Cancel) -> Response {
    let Prepared {
        spec,
        wanted,
        tenant,
        runtime,
    } = match spec_of(app, req, cancel) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let sent = spec
        .files
        .first()
        .map(|d| d.entries.clone())
        .unwrap_or_default();
    let result = call::call(spec, cancel, &app.pool.for_call(runtime, tenant));
    let body = match result {
        Ok(finished) => finished_response(finished, &sent, &wanted),
        Err(e) => failed_response(&e),
    };
    log_run(app, &body, false);
    (StatusCode::OK, Json(body)).into_response()
}

fn text_and_exact(bytes: Vec<u8>) -> (String, Option<String>) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, None),
        Err(e) => {
            let exact = BASE64.encode(e.as_bytes());
            (
                String::from_utf8_lossy(e.as_bytes()).into_owned(),
                Some(exact),
            )
        }
    }
}

fn finished_response(f: Finished, sent: &[Entry], wanted: &[String]) -> RunResponse {
    let exit_code = f.exit_code();
    let r = f.response;
    let (status, exit, message) = match r.outcome {
        Outcome::Exited(code) => (RunStatus::Exited, Some(code), None),
        Outcome::Trap(m) => (RunStatus::Trapped, None, Some(m)),
        Outcome::OutOfFuel => (RunStatus::OutOfFuel, None, Some("all fuel consumed".into())),
        Outcome::Refused(m) => (RunStatus::Refused, None, Some(m)),
        Outcome::AgentFailed(m) => (RunStatus::Failed, None, Some(m)),
    };
    let (stdout, stdout_base64) = text_and_exact(r.stdout);
    let (stderr, stderr_base64) = text_and_exact(r.stderr);
    let files = f
        .files
        .into_iter()
        .next()
        .map(|after| returned(after, sent, wanted))
        .unwrap_or_default();
    RunResponse {
        status,
        exit_code,
        exit,
        message,
        stdout,
        stderr,
        stdout_base64,
        stderr_base64,
        output_truncated: r.output_truncated,
        files,
        fuel_consumed: r.fuel_consumed,
        timings_us: RunTimings {
            compile: f.timings.compile_us,
            vm_start: f.timings.vm_start_us,
            call: f.timings.call_us,
            total: f.timings.total_us,
            guest_load: r.timings.load_us,
            guest_instantiate: r.timings.instantiate_us,
            guest_run: r.timings.run_us,
        },
        reused: f.timings.reused,
    }
}

/// The entries of `after` that `wanted` asks for, unchanged files with the bytes that were sent.
fn returned(after: Vec<Entry>, sent: &[Entry], wanted: &[String]) -> Vec<FileOut> {
    // Both lists can hold thousands of paths: looked up, never scanned per entry.
    let everything = wanted.iter().any(|w| w == ".");
    let wanted: std::collections::BTreeSet<&str> = wanted.iter().map(String::as_str).collect();
    // A path is asked for when it, or a directory above it, is named.
    let asked = |path: &str| {
        everything
            || wanted.contains(path)
            || path
                .match_indices('/')
                .any(|(at, _)| wanted.contains(&path[..at]))
    };
    let sent: BTreeMap<&str, &Node> = sent.iter().map(|e| (e.path.as_str(), &e.node)).collect();
    let file = |bytes: Vec<u8>| {
        let (text, exact) = text_and_exact(bytes);
        ("file", exact.is_none().then_some(text), exact, None)
    };
    after
        .into_iter()
        .filter(|e| asked(&e.path))
        .filter_map(|e| {
            let (kind, content, content_base64, target) = match e.node {
                Node::Dir => ("dir", None, None, None),
                Node::Symlink(t) => ("symlink", None, None, Some(t)),
                Node::File(b) => file(b),
                Node::Unchanged => match sent.get(e.path.as_str()) {
                    Some(Node::File(b)) => file(b.clone()),
                    _ => return None,
                },
            };
            Some(FileOut {
                path: e.path,
                kind,
                content,
                content_base64,
                target,
            })
        })
        .collect()
}

fn failed_response(e: &CallError) -> RunResponse {
    let reused = match e {
        CallError::TimedOut { timings, .. } => timings.reused,
        _ => false,
    };
    let (status, timings) = match e {
        CallError::TimedOut { timings, .. } => (RunStatus::TimedOut, Some(timings)),
        CallError::Cancelled => (RunStatus::Cancelled, None),
        CallError::Module(_) => (RunStatus::Refused, None),
        CallError::Refused(_) | CallError::Bulwark(_) => (RunStatus::Failed, None),
    };
    RunResponse {
        status,
        exit_code: e.exit_code(),
        exit: None,
        message: Some(e.to_string()),
        stdout: String::new(),
        stderr: String::new(),
        stdout_base64: None,
        stderr_base64: None,
        output_truncated: false,
        files: Vec::new(),
        fuel_consumed: None,
        timings_us: timings.map_or_else(RunTimings::default, |t| RunTimings {
            compile: t.compile_us,
            vm_start: t.vm_start_us,
            call: t.call_us,
            total: t.total_us,
            ..RunTimings::default()
        }),
        reused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, node: Node) -> Entry {
        Entry {
            path: path.into(),
            node,
        }
    }

    #[test]
    fn returned_files_are_the_named_paths_and_all_below_them() {
        let after = vec![
            entry("out", Node::Dir),
            entry("out/a.txt", Node::File(b"a".to_vec())),
            entry("outside.txt", Node::File(b"no".to_vec())),
            entry("in.txt", Node::Unchanged),
            entry("gone.txt", Node::Unchanged),
            entry("bin", Node::File(vec![0xff])),
        ];
        let sent = vec![entry("in.txt", Node::File(b"kept".to_vec()))];
        let paths = |wanted: &[&str]| -> Vec<String> {
            let wanted: Vec<String> = wanted.iter().map(|w| (*w).to_owned()).collect();
            returned(after.clone(), &sent, &wanted)
                .into_iter()
                .map(|f| f.path)
                .collect()
        };
        assert_eq!(paths(&["out"]), ["out", "out/a.txt"]);
        assert_eq!(paths(&["out/a.txt", "in.txt"]), ["out/a.txt", "in.txt"]);
        assert_eq!(
            paths(&["gone.txt"]),
            Vec::<String>::new(),
            "an unchanged file never sent"
        );
        assert_eq!(paths(&["."]).len(), 5);
        let all = returned(after.clone(), &sent, &[".".into()]);
        let kept = all.iter().find(|f| f.path == "in.txt").unwrap();
        assert_eq!(kept.content.as_deref(), Some("kept"));
        let bin = all.iter().find(|f| f.path == "bin").unwrap();
        assert_eq!(
            (bin.content.as_deref(), bin.content_base64.as_deref()),
            (None, Some("/w=="))
        );
    }
}
