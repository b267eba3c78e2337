//! The tool-call protocol between the host and the guest agent (vsock port [`AGENT_PORT`]).
//!
//! One request and one response per connection. Everything in a request is hostile to the
//! agent: sizes are capped by the frame limit and checked again where used.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::tree::{Entry, SharedDir};

/// Guest port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Version of this protocol; a request of another version is refused
/// ([`Outcome::Refused`]). Version 3: [`Outcome::Refused`] and [`Outcome::AgentFailed`] replace
/// the one `Error` outcome. Version 4: the artifact is mapped by the VMM, never sent
/// ([`Artifact`]). Version 5: a call may ask for its output as the tool writes it
/// ([`Request::stream`], [`Reply`]).
pub const PROTOCOL_VERSION: u32 = 5;
/// Most shared directories one call may carry ([`Request::dirs`]): the agent refuses a request
/// with more, and the host refuses such a call before it starts a VM.
pub const MAX_SHARED_DIRS: usize = 64;

/// The module to run: the artifact the VMM mapped into this VM's artifact window
/// (`bulwark_abi::layout::ARTIFACT_START`, its length in the boot info). No artifact bytes cross
/// vsock: the request only names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// SHA-256 of the source module (the agent keeps the loaded module under it).
    pub digest: [u8; 32],
    /// The artifact's length in bytes; the agent refuses the call unless the window holds
    /// exactly this many.
    pub size: u64,
}

/// Per-call limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most bytes all the tool's linear memories may hold together.
    pub max_memory: u64,
    /// Most bytes kept of stdout, and of stderr; the rest is dropped and flagged.
    pub max_output: u64,
    /// Fuel to run with (None: unmetered).
    pub fuel: Option<u64>,
    /// Most bytes of file data in the shared directories, all together; a write past it fails
    /// with ENOSPC.
    pub max_dir_bytes: u64,
    /// Most files and directories in the shared directories, all together; creating one more
    /// fails with ENOSPC.
    pub max_dir_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory: 256 << 20,
            max_output: 16 << 20,
            fuel: None,
            max_dir_bytes: 64 << 20,
            max_dir_entries: 10_000,
        }
    }
}

/// A tool call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What to run.
    pub artifact: Artifact,
    /// argv, program name first.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// All of standard input.
    #[serde(with = "serde_bytes")]
    pub stdin: Vec<u8>,
    /// Directories to preopen for the tool, with their contents; at most [`MAX_SHARED_DIRS`].
    pub dirs: Vec<SharedDir>,
    /// Limits.
    pub limits: Limits,
    /// Seed for the tool's `random_get` (the guest has no entropy source of its own).
    pub random_seed: [u8; 32],
    /// Host wall-clock time at the call, nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    /// Send the output while the tool runs: the connection then carries [`Reply`] frames, the
    /// output first and [`Reply::Done`] last, instead of one [`Response`].
    pub stream: bool,
}

/// What the agent sends on the connection of a call with [`Request::stream`]: output frames as
/// the tool writes, then exactly one [`Reply::Done`]. Output past `Limits::max_output` (each
/// stream in total) is dropped, never sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Bytes the tool wrote to stdout, following those sent before.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Bytes the tool wrote to stderr, following those sent before.
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The answer; its `stdout` and `stderr` are empty (every byte kept was sent before).
    Done(Response),
}

/// How the tool ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// `_start` returned (code 0) or the tool called `proc_exit(code)`.
    Exited(i32),
    /// The tool trapped: the message and the Wasm backtrace.
    Trap(String),
    /// Fuel ran out.
    OutOfFuel,
    /// The agent refused the call, and none of the tool ran: the request is malformed, of
    /// another protocol version or over one of the agent's limits, or the module cannot be
    /// loaded, linked or instantiated (an artifact the VM cannot load, an unknown import, no
    /// `_start`, memories or tables over the store's caps). `bulwark run` exits 126.
    Refused(String),
    /// The agent itself failed while serving the call (it could not set up the store, collect
    /// the shared directories or encode its answer). `bulwark run` exits 125.
    AgentFailed(String),
}

/// Time the agent spent on each step, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Deserializing the artifact (0 when cached).
    pub load_us: u64,
    /// Creating the store and instance.
    pub instantiate_us: u64,
    /// Running `_start`.
    pub run_us: u64,
}

impl Response {
    /// An answer with `outcome` and nothing else yet (no output, no timings).
    pub fn new(outcome: Outcome) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            outcome,
            stdout: Vec::new(),
            stderr: Vec::new(),
            output_truncated: false,
            fuel_consumed: None,
            dirs: Vec::new(),
            timings: Timings::default(),
        }
    }
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// How the tool ended.
    pub outcome: Outcome,
    /// What it wrote to stdout (up to the limit).
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (up to the limit).
    #[serde(with = "serde_bytes")]
    pub stderr: Vec<u8>,
    /// stdout or stderr went over `max_output`.
    pub output_truncated: bool,
    /// Fuel consumed, when metered.
    pub fuel_consumed: Option<u64>,
    /// What each shared directory holds after the call, in the request's order (files the tool
    /// did not change are [`crate::tree::Node::Unchanged`]).
    pub dirs: Vec<Vec<Entry>>,
    /// Step timings.
    pub timings: Timings,
}
