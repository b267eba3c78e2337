//! Arguments, environment, clocks, random numbers and `poll_oneoff`.

use alloc::vec::Vec;

use crate::fd::Desc;
use crate::mem::{read_array, slice, slice_mut, write_bytes, write_strings, write_u32, write_u64};
use crate::types::{Event, SUBCLOCK_ABSTIME, Subscription, SubscriptionKind, clockid, eventtype};
use crate::{Errno, Host, WasiCtx};

/// Resolution reported for both clocks: one microsecond (the guest's clock counts in them).
pub const CLOCK_RESOLUTION_NS: u64 = 1000;

impl<H: Host> WasiCtx<H> {
    /// `args_sizes_get`.
    pub fn args_sizes_get(&mut self, mem: &mut [u8], argc: u32, size: u32) -> Result<(), Errno> {
        let (n, bytes) = crate::mem::sizes(&self.args);
        write_u32(mem, argc, n)?;
        write_u32(mem, size, bytes)
    }

    /// `args_get`.
    pub fn args_get(&mut self, mem: &mut [u8], ptrs: u32, buf: u32) -> Result<(), Errno> {
        write_strings(mem, &self.args, ptrs, buf)
    }

    /// `environ_sizes_get`.
    pub fn environ_sizes_get(
        &mut self,
        mem: &mut [u8],
        count: u32,
        size: u32,
    ) -> Result<(), Errno> {
        let (n, bytes) = crate::mem::sizes(&self.env);
        write_u32(mem, count, n)?;
        write_u32(mem, size, bytes)
    }

    /// `environ_get`.
    pub fn environ_get(&mut self, mem: &mut [u8], ptrs: u32, buf: u32) -> Result<(), Errno> {
        write_strings(mem, &self.env, ptrs, buf)
    }

    /// `clock_res_get`: the CPU-time clocks are EBADF, as wasmtime-wasi answers; unknown ids
    /// EINVAL.
    pub fn clock_res_get(&mut self, mem: &mut [u8], id: u32, out: u32) -> Result<(), Errno> {
        match id {
            clockid::REALTIME | clockid::MONOTONIC => write_u64(mem, out, CLOCK_RESOLUTION_NS),
            clockid::PROCESS_CPUTIME | clockid::THREAD_CPUTIME => Err(Errno::BadF),
            _ => Err(Errno::Inval),
        }
    }

    /// `clock_time_get`: the CPU-time clocks are EBADF, as wasmtime-wasi answers.
    pub fn clock_time_get(
        &mut self,
        mem: &mut [u8],
        id: u32,
        _precision: u64,
        out: u32,
    ) -> Result<(), Errno> {
        let now = match id {
            clockid::REALTIME => self.host.realtime_ns(),
            clockid::MONOTONIC => self.host.monotonic_ns(),
            clockid::PROCESS_CPUTIME | clockid::THREAD_CPUTIME => return Err(Errno::BadF),
            _ => return Err(Errno::Inval),
        };
        write_u64(mem, out, now)
    }

    /// `sock_accept`, `sock_recv`, `sock_send`, `sock_shutdown`: there are no sockets, so
    /// EBADF for a descriptor that is not open and ENOTSOCK for one that is (wasmtime-wasi's
    /// answers).
    pub fn sock(&mut self, fd: u32) -> Result<(), Errno> {
        self.fds.get(fd)?;
        Err(Errno::NotSock)
    }

    /// `random_get`.
    pub fn random_get(&mut self, mem: &mut [u8], buf: u32, len: u32) -> Result<(), Errno> {
        let out = slice_mut(mem, buf, len)?;
        self.host.random(out);
        Ok(())
    }

    /// `poll_oneoff`: clock subscriptions are waited for through [`Host::wait_ns`] (no
    /// spinning; the host's deadline bounds the call); descriptor subscriptions are ready at
    /// once (stdin is all there, files and stdout/stderr never block), so when any is present
    /// nothing waits. A descriptor that cannot be polled is EBADF for the call, and a CPU-time
    /// clock EINVAL, as wasmtime-wasi answers.
    pub fn poll_oneoff(
        &mut self,
        mem: &mut [u8],
        subs: u32,
        events: u32,
        count: u32,
        nevents: u32,
    ) -> Result<(), Errno> {
        if count == 0 {
            return Err(Errno::Inval);
        }
        let size = u32::try_from(Subscription::SIZE).map_err(|_| Errno::Fault)?;
        // Subscriptions in and events out count against the call's copy budget first, as in
        // wasmtime-wasi (ENOMEM).
        let arrays = u64::try_from(Subscription::SIZE + Event::SIZE).map_err(|_| Errno::Fault)?;
        if u64::from(count) * arrays > crate::mem::HOSTCALL_FUEL {
            return Err(Errno::NoMem);
        }
        // The whole array must be in memory before anything is decoded or kept.
        slice(mem, subs, count.checked_mul(size).ok_or(Errno::Fault)?)?;
        // (userdata, event type, monotonic deadline for clocks, bytes ready for reads): what
        // the answer needs, smaller than the subscriptions themselves, and reserved fallibly so
        // a huge count in a huge memory is ENOMEM, never an allocation failure of the guest.
        let mut pending: Vec<(u64, u8, u64, u64)> = Vec::new();
        pending
            .try_reserve_exact(usize::try_from(count).map_err(|_| Errno::NoMem)?)
            .map_err(|_| Errno::NoMem)?;
        let mut deadline: Option<u64> = None;
        let now = self.host.monotonic_ns();
        for i in 0..count {
            let at = i
                .checked_mul(size)
                .and_then(|off| subs.checked_add(off))
                .ok_or(Errno::Fault)?;
            let sub = Subscription::decode(&read_array(mem, at)?)?;
            match sub.kind {
                SubscriptionKind::Clock {
                    id, timeout, flags, ..
                } => {
                    let absolute = flags & SUBCLOCK_ABSTIME != 0;
                    let at = match id {
                        clockid::MONOTONIC if absolute => timeout,
                        clockid::REALTIME if absolute => {
                            now.saturating_add(timeout.saturating_sub(self.host.realtime_ns()))
                        }
                        clockid::MONOTONIC | clockid::REALTIME => now.saturating_add(timeout),
                        _ => return Err(Errno::Inval),
                    };
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                    pending.push((sub.userdata, eventtype::CLOCK, at, 0));
                }
                SubscriptionKind::FdRead(fd) => {
                    let ready = match self.fds.get(fd)? {
                        Desc::Stdin => self.stdin.len().saturating_sub(self.stdin_pos) as u64,
                        Desc::File(f) => self.fs.stat(f.ino)?.size.saturating_sub(f.pos),
                        _ => return Err(Errno::BadF),
                    };
                    pending.push((sub.userdata, eventtype::FD_READ, 0, ready));
                }
                SubscriptionKind::FdWrite(fd) => {
                    match self.fds.get(fd)? {
                        Desc::Stdout | Desc::Stderr | Desc::File(_) => {}
                        _ => return Err(Errno::BadF),
                    }
                    pending.push((sub.userdata, eventtype::FD_WRITE, 0, 0));
                }
            }
        }
        let fd_ready = pending.iter().any(|p| p.1 != eventtype::CLOCK);
        if let (Some(at), false) = (deadline, fd_ready) {
            loop {
                let now = self.host.monotonic_ns();
                if now >= at {
                    break;
                }
                self.host.wait_ns(at - now);
            }
        }
        let now = self.host.monotonic_ns();
        let mut n = 0u32;
        let event_size = u32::try_from(Event::SIZE).map_err(|_| Errno::Fault)?;
        for (userdata, kind, at, nbytes) in pending {
            if kind == eventtype::CLOCK && at > now {
                continue;
            }
            let ev = Event {
                userdata,
                error: 0,
                kind,
                nbytes,
                flags: 0,
            };
            let ptr = n
                .checked_mul(event_size)
                .and_then(|off| events.checked_add(off))
                .ok_or(Errno::Fault)?;
            write_bytes(mem, ptr, &ev.encode())?;
            n += 1;
        }
        write_u32(mem, nevents, n)
    }
}
