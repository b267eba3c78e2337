//! The agent server: tool calls on vsock port `AGENT_PORT`, one request and one response per
//! connection, one call at a time. A malformed or oversized request is refused
//! ([`Outcome::Refused`]) and its connection closed; the server keeps serving.

use alloc::format;
use alloc::vec;

use bulwark_proto::call::{AGENT_PORT, Outcome, Request, Response};
use bulwark_proto::frame::{self, MAX_REQUEST_FRAME, PREFIX};

use crate::agent::Agent;
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

/// Writes all of `data`, waiting for credit as needed.
fn write_all(vs: &mut Vsock, s: Stream, mut data: &[u8]) -> Result<(), StreamError> {
    while !data.is_empty() {
        match vs.send(s, data) {
            Ok(n) => data = &data[n..],
            Err(StreamError::WouldBlock) => vs.wait(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Serves calls forever.
pub fn serve(vs: &mut Vsock, agent: &mut Agent) -> ! {
    vs.listen(AGENT_PORT);
    loop {
        let Some(s) = vs.accept() else {
            vs.wait();
            continue;
        };
        let response = match read_request(vs, s) {
            Ok(req) => agent.call(req),
            Err(message) => Response::new(Outcome::Refused(message)),
        };
        let bytes = frame::encode(&response).unwrap_or_else(|e| {
            let failed = Outcome::AgentFailed(format!("cannot encode the response: {e}"));
            frame::encode(&Response::new(failed)).unwrap_or(vec![0; PREFIX])
        });
        let _ = write_all(vs, s, &bytes);
        vs.shutdown(s);
        vs.close(s);
        vs.flush();
    }
}
