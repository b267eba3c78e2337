//! Time from the TSC, whose frequency the VMM puts in boot info.

use core::fmt;

/// Reads the time-stamp counter.
pub fn now() -> u64 {
    // SAFETY: rdtsc is unprivileged (CR4.TSD is clear) and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Converts TSC ticks to time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    tsc_khz: u64,
}

/// A span of TSC ticks, printed in milliseconds (or a note if the frequency is unknown).
pub struct Elapsed {
    ticks: u64,
    tsc_khz: u64,
}

impl Clock {
    /// A clock for a TSC running at `tsc_khz` kHz (0 if unknown).
    pub fn new(tsc_khz: u64) -> Self {
        Self { tsc_khz }
    }

    /// Time since the TSC read `start`.
    pub fn since(&self, start: u64) -> Elapsed {
        Elapsed {
            ticks: now().wrapping_sub(start),
            tsc_khz: self.tsc_khz,
        }
    }

    /// TSC ticks in one millisecond, or 0 if the frequency is unknown.
    pub fn ticks_per_ms(&self) -> u64 {
        self.tsc_khz
    }

    /// `ticks` in microseconds, or 0 if the frequency is unknown.
    pub fn micros(&self, ticks: u64) -> u64 {
        match self.tsc_khz {
            0 => 0,
            khz => ticks.saturating_mul(1000) / khz,
        }
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tsc_khz == 0 {
            return write!(f, "{} TSC ticks (no TSC frequency)", self.ticks);
        }
        let nanos = self.ticks.saturating_mul(1_000_000) / self.tsc_khz;
        write!(f, "{}.{:03} ms", nanos / 1_000_000, (nanos / 1000) % 1000)
    }
}
