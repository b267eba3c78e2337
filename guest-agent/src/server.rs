//! The agent server: tool calls on vsock port `AGENT_PORT`, one request per connection, one
//! call at a time. The answer is one `Response` frame, or, for a call that asks for streaming,
//! its output as the tool writes it and then `Reply::Done` ([`crate::stream`]). A malformed or
//! oversized request is refused ([`Outcome::Refused`]) and its connection closed; the server
//! keeps serving.

use alloc::format;
use alloc::rc::Rc;
use alloc::vec;
use core::cell::RefCell;

use bulwark_proto::call::{AGENT_PORT, Outcome, Request, Response};
use bulwark_proto::frame::{self, MAX_REQUEST_FRAME, PREFIX};

use crate::agent::Agent;
use crate::clock::Clock;
use crate::stream::{self, Link, write_all};
use crate::virtio::vsock::{Stream, StreamError, Vsock};

/// One accepted stream as a frame source: reads wait as needed.
struct Incoming<'a> {
    vs: &'a mut Vsock,
    s: Stream,
}

impl frame::Source for Incoming<'_> {
    type Error = StreamError;

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        let mut at = 0;
        while at < buf.len() {
            match self.vs.recv(self.s, &mut buf[at..]) {
                Ok(0) => return Err(StreamError::Reset),
                Ok(n) => at += n,
                Err(StreamError::WouldBlock) => self.vs.wait(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads one request frame; an `Err` is the message for the refusal.
fn read_request(vs: &mut Vsock, s: Stream) -> Result<Request, alloc::string::String> {
    frame::read(&mut Incoming { vs, s }, MAX_REQUEST_FRAME).map_err(|e| match e {
        frame::ReadError::Prefix(e) | frame::ReadError::Body(e) => {
            format!("reading the request: {e:?}")
        }
        frame::ReadError::Frame(e) => format!("{e}"),
        frame::ReadError::NoMemory(len) => format!("no memory for a {len}-byte request"),
    })
}

/// Serves calls forever. The driver is shared (one `Rc`) with the [`Link`] of a streaming
/// call, which alone uses it while the tool runs; the server borrows it only between calls.
pub fn serve(vs: Vsock, agent: &mut Agent, clock: Clock) -> ! {
    let vs = Rc::new(RefCell::new(vs));
    vs.borrow_mut().listen(AGENT_PORT);
    loop {
        let accepted = vs.borrow_mut().accept();
        let Some(s) = accepted else {
            vs.borrow_mut().wait();
            continue;
        };
        // Bound first, so that no borrow of the driver is alive while the call runs.
        let request = read_request(&mut vs.borrow_mut(), s);
        match request {
            Ok(req) if req.stream => {
                let link = Link::new(Rc::clone(&vs), s, clock);
                let response = agent.call(req, Some(link));
                // A host that left gets nothing; the next connection is served all the same.
                let _ = stream::finish(&mut vs.borrow_mut(), s, response);
            }
            Ok(req) => {
                let response = agent.call(req, None);
                answer(&mut vs.borrow_mut(), s, &response);
            }
            Err(message) => answer(
                &mut vs.borrow_mut(),
                s,
                &Response::new(Outcome::Refused(message)),
            ),
        }
        let mut vs = vs.borrow_mut();
        vs.shutdown(s);
        vs.close(s);
        vs.flush();
    }
}

/// Sends `response` as one frame (a call without streaming, or a request that does not
/// decode).
fn answer(vs: &mut Vsock, s: Stream, response: &Response) {
    let bytes = frame::encode(response).unwrap_or_else(|e| {
        let failed = Outcome::AgentFailed(format!("cannot encode the response: {e}"));
        frame::encode(&Response::new(failed)).unwrap_or(vec![0; PREFIX])
    });
    let _ = write_all(vs, s, &bytes);
}
