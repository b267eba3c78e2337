//! Streaming a call's output while the tool runs ([`Request::stream`]): the connection carries
//! [`Reply::Stdout`] and [`Reply::Stderr`] frames as the tool writes, then one [`Reply::Done`]
//! whose `stdout` and `stderr` are empty.
//!
//! # When output is sent
//! The guest has no timer interrupt: it can only send while the tool is in a host call. The
//! rule:
//! - at every `fd_write` (and `fd_pwrite`), `fd_read`, `clock_time_get` and `sched_yield`, the
//!   unsent output of **both** streams is sent (stdout first) when the previous send was at
//!   least 1 ms ago (the guest's TSC clock; the first output of a call goes at once), or when
//!   either stream has [`CHUNK`] bytes or more unsent;
//! - before `poll_oneoff` (which may sleep) everything unsent is sent, whenever it was last;
//! - at the end of the call, whatever ended it (exit, trap, fuel, a failure after some output),
//!   everything unsent is sent, then `Done`.
//!
//! So output written within 1 ms of a previous send waits for the next of those calls or the
//! end of the call: a tool that writes and then computes without a host call for a long time
//! holds that output until it makes one. A tool that writes many small pieces in a tight loop
//! sends one frame per stream about every millisecond (more often only when [`CHUNK`] bytes
//! pile up first), so the cost of sending (a frame and one VM exit) stays small however it
//! writes. With no known TSC frequency every write sends.
//!
//! `--max-output` caps each stream over the whole call: bytes sent count toward it, bytes past
//! it are dropped (never sent) and `Done` says `output_truncated` ([`bulwark_wasi::Output`]).
//!
//! Sending waits for the host's credit, so a host that stops reading stops the tool at its next
//! send (its wall-clock deadline still applies). A send that fails (the host closed the
//! connection) ends the call with [`HostGone`]: nobody is left to read the answer, and the
//! agent goes on to the next connection.
//!
//! [`Request::stream`]: bulwark_proto::call::Request::stream

use alloc::rc::Rc;
use core::cell::RefCell;

use bulwark_proto::call::{Outcome, Reply, Response};
use bulwark_proto::frame;
use bulwark_wasi::Output;

use crate::clock::{self, Clock};
use crate::virtio::vsock::{Stream, StreamError, Vsock};

/// Unsent bytes of one stream that are sent at the next write, however recent the last send.
pub const CHUNK: usize = 64 << 10;

/// The host closed a streaming call's connection: the error that ends the tool's run.
#[derive(Debug)]
pub struct HostGone;

impl core::fmt::Display for HostGone {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "the host closed the call's connection while the tool ran"
        )
    }
}

impl core::error::Error for HostGone {}

/// When to send at a host call (see the module's rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// When the last send was at least 1 ms ago, or a stream has [`CHUNK`] bytes unsent.
    Due,
    /// Now, if anything is unsent.
    Now,
}

/// A streaming call's connection, as the tool's host calls reach it. The server keeps the
/// other handle of the vsock driver and does not touch it while the call runs, so the driver
/// is only ever borrowed here during a call.
pub struct Link {
    vs: Rc<RefCell<Vsock>>,
    s: Stream,
    /// TSC ticks in 1 ms (0: unknown frequency, every write sends).
    ticks_per_ms: u64,
    /// TSC at the last send (None: nothing sent yet).
    last_send: Option<u64>,
    /// A send failed: the host is gone.
    broken: bool,
}

impl Link {
    /// The link of the call on stream `s` of the driver `vs`.
    pub fn new(vs: Rc<RefCell<Vsock>>, s: Stream, clock: Clock) -> Self {
        Self {
            vs,
            s,
            ticks_per_ms: clock.ticks_per_ms(),
            last_send: None,
            broken: false,
        }
    }

    /// Whether the rule says to send now at a host call.
    fn due(&self, when: When, stdout: &Output, stderr: &Output) -> bool {
        let (out, err) = (stdout.pending(), stderr.pending());
        if out == 0 && err == 0 {
            return false;
        }
        if when == When::Now || out >= CHUNK || err >= CHUNK {
            return true;
        }
        self.last_send
            .is_none_or(|t| clock::now().wrapping_sub(t) >= self.ticks_per_ms)
    }

    /// Sends the unsent output of both streams (stdout first) if `when` says so. Fails once the
    /// host is gone; the caller ends the call.
    pub fn send(
        &mut self,
        when: When,
        stdout: &mut Output,
        stderr: &mut Output,
    ) -> Result<(), HostGone> {
        if self.broken {
            return Err(HostGone);
        }
        if !self.due(when, stdout, stderr) {
            return Ok(());
        }
        // The server holds no borrow while a call runs; if it ever did, this send waits for a
        // later host call or the end of the call.
        let Ok(mut vs) = self.vs.try_borrow_mut() else {
            return Ok(());
        };
        let sent = send_output(&mut vs, self.s, stdout.take(), stderr.take());
        vs.flush();
        self.last_send = Some(clock::now());
        if sent.is_err() {
            self.broken = true;
            return Err(HostGone);
        }
        Ok(())
    }
}

/// Sends `stdout`, then `stderr`, each as one frame if not empty.
fn send_output(
    vs: &mut Vsock,
    s: Stream,
    stdout: alloc::vec::Vec<u8>,
    stderr: alloc::vec::Vec<u8>,
) -> Result<(), StreamError> {
    if !stdout.is_empty() {
        send_reply(vs, s, &Reply::Stdout(stdout))?;
    }
    if !stderr.is_empty() {
        send_reply(vs, s, &Reply::Stderr(stderr))?;
    }
    Ok(())
}

/// Sends one reply frame. A reply that cannot be encoded (it never happens: postcard encodes
/// any of them) breaks the stream like a closed connection.
fn send_reply(vs: &mut Vsock, s: Stream, reply: &Reply) -> Result<(), StreamError> {
    let bytes = frame::encode(reply).map_err(|_| StreamError::Reset)?;
    write_all(vs, s, &bytes)
}

/// Ends a streaming call: sends what is left of its output (`response.stdout` and `stderr`,
/// the bytes not streamed yet), then `Done` with both emptied.
pub fn finish(vs: &mut Vsock, s: Stream, mut response: Response) -> Result<(), StreamError> {
    let stdout = core::mem::take(&mut response.stdout);
    let stderr = core::mem::take(&mut response.stderr);
    send_output(vs, s, stdout, stderr)?;
    let done = frame::encode(&Reply::Done(response)).or_else(|e| {
        let failed = Outcome::AgentFailed(alloc::format!("cannot encode the answer: {e}"));
        frame::encode(&Reply::Done(Response::new(failed)))
    });
    match done {
        Ok(bytes) => write_all(vs, s, &bytes),
        Err(_) => Err(StreamError::Reset),
    }
}

/// Writes all of `data`, waiting for credit as needed.
pub fn write_all(vs: &mut Vsock, s: Stream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        match vs.send(s, data) {
            Ok(n) => data = &data[n..],
            Err(StreamError::WouldBlock) => vs.wait(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
