//! `bulwark mcp`: a Model Context Protocol server over stdio (the official Rust SDK, `rmcp`).
//!
//! Tools: `run_python` and `run_javascript` (each only when its pinned runtime is on this
//! machine, see `lang`), and one tool per registered module (`--tools DIR`, see [`manifest`]).
//! A registered module gets the call's arguments, the JSON object, as its standard input (JSON
//! text, no trailing newline) and no arguments besides `argv[0]`; the module checks them itself
//! (the server does not validate them against the manifest's schema). Every call runs in a
//! fresh micro-VM with `bulwark run`'s default limits and `--timeout`.
//!
//! Standard output is the MCP channel: nothing else is written there. Messages go to stderr.

mod manifest;
mod result;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, JsonObject, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::call::{self, CallError, CallSpec, Finished};
use crate::cancel::{self, Cancel};
use crate::cli::McpArgs;
use crate::lang::{self, Lang};
use crate::serve::pool::{self, Runtime};
use crate::vm::HeapPages;
use manifest::Registered;
use result::RunResult;

/// Most calls running at once; more wait for a free slot (cancellable while they wait).
const MAX_CONCURRENT_CALLS: usize = 8;

/// Most arguments a language call passes to the program.
const MAX_CODE_ARGS: usize = 1024;

/// Most bytes of a language call's arguments, all together.
const MAX_CODE_ARGS_BYTES: usize = 1 << 20;

/// RAM of a pooled VM, in MiB (as `bulwark serve`'s default).
const POOL_MEM_MIB: u64 = 1024;

/// How long shutdown waits for cancelled calls to end before the process exits anyway (their
/// VMMs die with it).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A program, its arguments and its standard input (the arguments of `run_python` and
/// `run_javascript`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CodeInput {
    /// The program's source code.
    code: String,
    /// Arguments for the program (Python's `sys.argv[1:]`, JavaScript's `scriptArgs[1:]`).
    #[serde(default)]
    args: Vec<String>,
    /// Text for the program's standard input.
    #[serde(default)]
    stdin: String,
}

/// What a tool runs.
#[derive(Clone, Debug)]
enum Kind {
    /// Code in a language runtime.
    Code(Lang),
    /// A registered module, its arguments on stdin.
    Module(Registered),
}

impl Kind {
    /// The pool its calls take a VM from.
    fn runtime(&self) -> Runtime {
        match self {
            Kind::Code(Lang::Python) => Runtime::Python,
            Kind::Code(Lang::Js) => Runtime::Javascript,
            Kind::Module(_) => Runtime::Wasm,
        }
    }
}

/// The server: its tools, their limits, and the calls in flight.
#[derive(Clone)]
struct Server {
    /// The tools as listed, in order.
    listed: Arc<Vec<Tool>>,
    /// What each tool name runs.
    kinds: Arc<HashMap<String, Kind>>,
    /// Each call's wall-clock limit.
    timeout: Duration,
    /// Calls in flight.
    calls: Arc<Calls>,
    /// The VMs booted ahead of calls, per runtime.
    pool: Arc<pool::Pool>,
}

/// The calls in flight: their cancel tokens, and the slots that bound how many run at once.
struct Calls {
    running: Arc<cancel::Running>,
    slots: tokio::sync::Semaphore,
}

/// One call's place in [`Calls`]: dropping it (the call finished, or its request went away)
/// cancels the call's token and forgets it.
struct Running {
    cancel: Cancel,
    _entered: cancel::Entered,
}

impl Calls {
    fn new() -> Self {
        Self {
            running: Arc::default(),
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS),
        }
    }

    fn start(&self) -> Running {
        let cancel = Cancel::new();
        Running {
            _entered: self.running.enter(&cancel),
            cancel,
        }
    }

    /// Cancels every call in flight and stops new ones from starting.
    fn cancel_all(&self) {
        self.slots.close();
        self.running.cancel_all();
    }

    /// Whether no call is in flight.
    fn idle(&self) -> bool {
        self.running.is_empty()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Runs `bulwark mcp`.
pub fn run(args: &McpArgs) -> anyhow::Result<()> {
    let registered = manifest::load(&args.tools)?;
    let langs: Vec<Lang> = [Lang::Python, Lang::Js]
        .into_iter()
        .filter(|l| lang::available(*l))
        .collect();
    // One pool per runtime that has a tool. A pooled VM has RAM to spare for any call of the
    // default limits, its input and in-memory files included (untouched RAM costs nothing).
    let target = |present: bool| pool::RuntimePolicy {
        target: if present { args.pool } else { 0 },
        pages: HeapPages::Huge,
    };
    let pool = pool::Pool::start(
        [
            pool::RuntimePolicy {
                pages: HeapPages::Small,
                ..target(!registered.is_empty())
            },
            target(langs.contains(&Lang::Python)),
            target(langs.contains(&Lang::Js)),
        ],
        POOL_MEM_MIB,
        pool::ReusePolicy {
            enabled: false,
            max_idle: 0,
            ttl: Duration::ZERO,
            max_rss: 0,
        },
    )?;
    let server = Server::new(&langs, registered, args.timeout, Arc::new(pool))?;
    let names: Vec<&str> = server.listed.iter().map(|t| t.name.as_ref()).collect();
    eprintln!(
        "bulwark mcp: serving {} tool{} on stdio: {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if names.is_empty() {
            "none (no language runtime found and no --tools)".to_owned()
        } else {
            names.join(", ")
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let calls = Arc::clone(&server.calls);
    let pool = Arc::clone(&server.pool);
    let served = runtime.block_on(serve(server));
    // Whatever ended the session, no call outlives it.
    calls.cancel_all();
    runtime.block_on(async {
        let until = Instant::now() + SHUTDOWN_GRACE;
        while !calls.idle() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Blocking threads still in a call are not waited for: their VMMs die with this process.
    runtime.shutdown_background();
    pool.stop();
    served
}

/// Serves MCP on stdin/stdout until the client closes the connection or a signal stops it.
async fn serve(server: Server) -> anyhow::Result<()> {
    let stdin = EofCancels {
        inner: tokio::io::stdin(),
        calls: Arc::clone(&server.calls),
    };
    let service = server
        .serve((stdin, tokio::io::stdout()))
        .await
        .context("the MCP session did not start")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    tokio::select! {
        quit = service.waiting() => {
            quit.context("the MCP session failed")?;
        }
        _ = tokio::signal::ctrl_c() => eprintln!("bulwark mcp: interrupted; stopping"),
        _ = term.recv() => eprintln!("bulwark mcp: SIGTERM; stopping"),
    }
    Ok(())
}

/// Standard input that cancels every call in flight at its end: a client that closed it can
/// read no answer, so its calls stop at once instead of running to their deadline.
struct EofCancels<R> {
    inner: R,
    calls: Arc<Calls>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EofCancels<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(())))
            && buf.filled().len() == before
            && buf.remaining() > 0
        {
            self.calls.cancel_all();
        }
        polled
    }
}

impl Server {
    fn new(
        langs: &[Lang],
        registered: Vec<Registered>,
        timeout: Duration,
        pool: Arc<pool::Pool>,
    ) -> anyhow::Result<Self> {
        let output_schema = Arc::new(schema_of::<RunResult>()?);
        let mut listed = Vec::new();
        let mut kinds = HashMap::new();
        let code_schema = Arc::new(schema_of::<CodeInput>()?);
        for &lang in langs {
            let (name, description) = match lang {
                Lang::Python => (
                    "run_python",
                    "Run Python 3.12 code (CPython, standard library only) in a fresh, isolated \
                     micro-VM with no network and no host files. Returns its standard output, \
                     standard error and exit code; an uncaught exception exits 1 with the \
                     traceback on standard error.",
                ),
                Lang::Js => (
                    "run_javascript",
                    "Run JavaScript code (QuickJS-NG, ES2023, with its std and os modules) in a \
                     fresh, isolated micro-VM with no network and no host files. Returns its \
                     standard output, standard error and exit code; print with console.log.",
                ),
            };
            listed.push(tool(name, description, &code_schema, &output_schema));
            kinds.insert(name.to_owned(), Kind::Code(lang));
        }
        for module in registered {
            let description = format!(
                "{} (Runs in a fresh, isolated micro-VM; the arguments reach it as JSON on \
                 standard input.)",
                module.description
            );
            listed.push(tool(
                &module.name,
                &description,
                &Arc::new(module.input_schema.clone()),
                &output_schema,
            ));
            kinds.insert(module.name.clone(), Kind::Module(module));
        }
        Ok(Self {
            listed: Arc::new(listed),
            kinds: Arc::new(kinds),
            timeout,
            calls: Arc::new(Calls::new()),
            pool,
        })
    }

    /// The call a tool request asks for, or why its arguments are refused.
    fn spec(&self, kind: &Kind, arguments: Option<JsonObject>) -> Result<CallSpec, String> {
        let mut spec = match kind {
            Kind::Code(lang) => {
                let input: CodeInput =
                    serde_json::from_value(Value::Object(arguments.unwrap_or_default()))
                        .map_err(|e| e.to_string())?;
                check_code_input(&input)?;
                let mut spec = lang::code_spec(*lang, input.code, &input.args)
                    .map_err(|e| format!("{e:#}"))?;
                spec.stdin = input.stdin.into_bytes();
                spec
            }
            Kind::Module(module) => {
                let mut spec = CallSpec::new(&module.module);
                let json = Value::Object(arguments.unwrap_or_default());
                spec.stdin = serde_json::to_vec(&json).map_err(|e| e.to_string())?;
                spec
            }
        };
        if spec.stdin.len() as u64 > call::MAX_STDIN {
            return Err(format!(
                "standard input is over the {} MiB a call may carry",
                call::MAX_STDIN >> 20
            ));
        }
        spec.limits.timeout = self.timeout;
        Ok(spec)
    }

    /// Runs `spec` on a blocking thread, cancelling it when the request is cancelled (by the
    /// client, or because the session ended).
    async fn run_call(
        &self,
        spec: CallSpec,
        runtime: Runtime,
        context: &RequestContext<RoleServer>,
    ) -> Result<Finished, CallError> {
        let ct = &context.ct;
        let _slot = tokio::select! {
            slot = self.calls.slots.acquire() => slot.map_err(|_| CallError::Cancelled)?,
            () = ct.cancelled() => return Err(CallError::Cancelled),
        };
        let running = self.calls.start();
        let cancel = running.cancel.clone();
        // A VM the call starts itself dies with the thread that started it (PR_SET_PDEATHSIG):
        // this blocking thread lives until the call returns. Pooled VMs are the pool's.
        let pool = Arc::clone(&self.pool);
        let mut task = tokio::task::spawn_blocking(move || {
            call::call(spec, &cancel, &pool.for_call(runtime, None))
        });
        let joined = tokio::select! {
            joined = &mut task => joined,
            () = ct.cancelled() => {
                running.cancel.cancel();
                task.await
            }
        };
        drop(running);
        joined.unwrap_or_else(|e| Err(CallError::Bulwark(format!("the call's thread failed: {e}"))))
    }
}

/// Checks a language call's arguments against the bounds.
fn check_code_input(input: &CodeInput) -> Result<(), String> {
    if input.code.len() as u64 > lang::MAX_SCRIPT {
        return Err(format!(
            "\"code\" is {} bytes, over the {} MiB limit",
            input.code.len(),
            lang::MAX_SCRIPT >> 20
        ));
    }
    let args_bytes: usize = input.args.iter().map(String::len).sum();
    if input.args.len() > MAX_CODE_ARGS || args_bytes > MAX_CODE_ARGS_BYTES {
        return Err(format!(
            "\"args\" may hold at most {MAX_CODE_ARGS} arguments and {} KiB",
            MAX_CODE_ARGS_BYTES >> 10
        ));
    }
    if input.code.contains('\0') || input.args.iter().any(|a| a.contains('\0')) {
        return Err("\"code\" and \"args\" cannot hold NUL characters".into());
    }
    Ok(())
}

/// The JSON Schema of `T`, as an object (without the Rust type's name as its title).
fn schema_of<T: JsonSchema>() -> anyhow::Result<JsonObject> {
    match serde_json::to_value(schemars::schema_for!(T)) {
        Ok(Value::Object(mut map)) => {
            map.remove("title");
            Ok(map)
        }
        Ok(_) => anyhow::bail!("a built-in tool's JSON Schema is not an object"),
        Err(e) => Err(e).context("cannot make a built-in tool's JSON Schema"),
    }
}

/// A listed tool. Every tool runs sandboxed: it changes nothing outside its VM and reaches no
/// network, which its annotations say.
fn tool(
    name: &str,
    description: &str,
    input_schema: &Arc<JsonObject>,
    output_schema: &Arc<JsonObject>,
) -> Tool {
    let mut tool = Tool::new(
        name.to_owned(),
        description.to_owned(),
        Arc::clone(input_schema),
    )
    .with_raw_output_schema(Arc::clone(output_schema));
    tool.annotations = Some(
        ToolAnnotations::new()
            .read_only(true)
            .destructive(false)
            .open_world(false),
    );
    tool
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("bulwark", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Each tool runs untrusted code in a fresh, isolated micro-VM (no network, no \
                 host files). A result's structuredContent holds exit_code, outcome, stdout, \
                 stderr and output_truncated; isError is set for anything but exit code 0.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(
            self.listed.as_ref().clone(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.listed.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let Some(kind) = self.kinds.get(request.name.as_ref()) else {
            return Err(McpError::invalid_params(
                format!("no tool named {:?}", request.name),
                None,
            ));
        };
        let result = match self.spec(kind, request.arguments) {
            Ok(spec) => RunResult::of(&self.run_call(spec, kind.runtime(), &context).await),
            Err(message) => RunResult::invalid_arguments(message),
        };
        Ok(result.into_tool_result().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_input_is_strict_and_bounded() {
        let parse = |v: Value| serde_json::from_value::<CodeInput>(v).map_err(|e| e.to_string());
        let input = parse(serde_json::json!({"code": "print(1)"})).unwrap();
        assert!(input.args.is_empty() && input.stdin.is_empty());
        assert!(
            parse(serde_json::json!({"code": "x", "extra": 1}))
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            parse(serde_json::json!({"args": []}))
                .unwrap_err()
                .contains("missing field `code`")
        );
        let too_many = CodeInput {
            code: String::new(),
            args: vec![String::new(); MAX_CODE_ARGS + 1],
            stdin: String::new(),
        };
        assert!(check_code_input(&too_many).is_err());
        let nul = CodeInput {
            code: "a\0b".into(),
            args: Vec::new(),
            stdin: String::new(),
        };
        assert!(check_code_input(&nul).is_err());
    }

    #[test]
    fn the_schemas_are_objects() {
        let code = schema_of::<CodeInput>().unwrap();
        assert_eq!(code["type"], "object");
        assert_eq!(code["required"], serde_json::json!(["code"]));
        let out = schema_of::<RunResult>().unwrap();
        assert_eq!(out["type"], "object");
        assert!(out["properties"]["outcome"].is_object());
    }
}
