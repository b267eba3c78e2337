//! Test services on vsock: an echo server, and a client that connects to the host.

use alloc::vec;

use bulwark_abi::vsock::{GUEST_GREETING, HOST_TEST_PORT};

use crate::virtio::vsock::{Stream, StreamError, Vsock};

/// Moves what `stream` received back to its sender, never reading more than can be sent at
/// once (so nothing piles up in the guest). Returns `false` once the stream is finished: the
/// peer closed its side and everything was echoed, or it was reset.
fn echo_some(vs: &mut Vsock, stream: Stream, buf: &mut [u8], progress: &mut bool) -> bool {
    loop {
        let room = vs.send_capacity(stream).min(buf.len());
        if room == 0 {
            // No credit yet: still check whether the stream ended or was reset.
            return match vs.recv(stream, &mut []) {
                Ok(0) if vs.send_capacity(stream) == 0 => true,
                Err(StreamError::Reset) => false,
                _ => true,
            };
        }
        match vs.recv(stream, &mut buf[..room]) {
            Ok(0) => {
                // Everything was echoed: end our direction too, then forget the stream.
                vs.shutdown(stream);
                vs.close(stream);
                return false;
            }
            Ok(n) => {
                // `n` is within the credit, so the whole of it is queued.
                if vs.send(stream, &buf[..n]).is_err() {
                    vs.close(stream);
                    return false;
                }
                *progress = true;
            }
            Err(StreamError::WouldBlock) => return true,
            Err(StreamError::Reset) => {
                vs.close(stream);
                return false;
            }
        }
    }
}

/// Serves echo on `port` for any number of concurrent connections, forever.
pub fn echo_server(vs: &mut Vsock, port: u32) -> ! {
    vs.listen(port);
    let mut open = vec::Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(s) = vs.accept() {
            open.push(s);
        }
        let mut progress = false;
        let mut i = 0;
        while i < open.len() {
            if echo_some(vs, open[i], &mut buf, &mut progress) {
                i += 1;
            } else {
                open.swap_remove(i);
            }
        }
        if progress {
            vs.poll();
        } else {
            vs.wait();
        }
    }
}

/// Connects to host port [`HOST_TEST_PORT`], writes the greeting, then echoes until the host
/// closes. Returns whether it all worked.
pub fn connect_test(vs: &mut Vsock) -> Result<(), StreamError> {
    let stream = vs.connect(HOST_TEST_PORT)?;
    let mut greeting = GUEST_GREETING;
    while !greeting.is_empty() {
        match vs.send(stream, greeting) {
            Ok(n) => greeting = &greeting[n..],
            Err(StreamError::WouldBlock) => vs.wait(),
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut progress = false;
        if !echo_some(vs, stream, &mut buf, &mut progress) {
            // `echo_some` closed the stream once the host had shut its side.
            vs.flush();
            return Ok(());
        }
        if !progress {
            vs.wait();
        }
    }
}
