//! The agent server: tool calls on vsock port `AGENT_PORT`, one request and one response per
//! connection, one call at a time. A malformed or oversized request gets an error answer and
//! its connection is closed; the server keeps serving.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use bulwark_proto::call::{AGENT_PORT, Outcome, Request, Response};
use bulwark_proto::frame::{self, MAX_REQUEST_FRAME, PREFIX};

use crate::agent::Agent;
use crate::virtio::vsock::{Stream, StreamError, Vsock};

/// Reads exactly `buf.len()` bytes, waiting as needed.
fn read_exact(vs: &mut Vsock, s: Stream, buf: &mut [u8]) -> Result<(), StreamError> {
    let mut at = 0;
    while at < buf.len() {
        match vs.recv(s, &mut buf[at..]) {
            Ok(0) => return Err(StreamError::Reset),
            Ok(n) => at += n,
            Err(StreamError::WouldBlock) => vs.wait(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

fn error_response(message: alloc::string::String) -> Response {
    Response::new(Outcome::Error(message))
}

/// Reads one request frame; an `Err` is the message for the error answer.
fn read_request(vs: &mut Vsock, s: Stream) -> Result<Request, alloc::string::String> {
    let mut prefix = [0u8; PREFIX];
    read_exact(vs, s, &mut prefix).map_err(|e| format!("reading the request: {e:?}"))?;
    let len = frame::body_len(prefix, MAX_REQUEST_FRAME).map_err(|e| format!("{e}"))?;
    let mut body = Vec::new();
    body.try_reserve_exact(len)
        .map_err(|_| format!("no memory for a {len}-byte request"))?;
    body.resize(len, 0);
    read_exact(vs, s, &mut body).map_err(|e| format!("reading the request: {e:?}"))?;
    frame::decode(&body).map_err(|e| format!("{e}"))
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
            Err(message) => error_response(message),
        };
        let bytes = frame::encode(&response).unwrap_or_else(|e| {
            frame::encode(&error_response(format!("cannot encode the response: {e}")))
                .unwrap_or(vec![0; PREFIX])
        });
        let _ = write_all(vs, s, &bytes);
        vs.shutdown(s);
        vs.close(s);
        vs.flush();
    }
}
