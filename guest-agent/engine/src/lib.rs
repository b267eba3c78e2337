//! The wasmtime engine configuration of Bulwark, in one place.
//!
//! The host precompiles modules with Cranelift for the guest; the guest deserializes them. wasmtime
//! refuses an artifact whose engine settings differ from the runtime's, so both sides build their
//! `Config` from [`shared_config`] here. The host adds the compilation target with
//! [`compiler_config`] (feature `compiler`); the guest adds its platform hooks.

#![no_std]
use alloc::format;
use alloc::string::ToString;

use bulwark_proto::call::Outcome;
use wasmtime::Config;

extern crate alloc;

/// The wasmtime version both sides are pinned to (`=48.0.8` in the workspace manifest).
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Whether compiled code meters fuel: one engine configuration, and one artifact, per variant.
///
/// Fuel instrumentation costs about 0.3x native time on compute-bound code, so only calls that
/// give a fuel budget run code compiled with it. wasmtime records the setting in the artifact
/// and refuses to load it into an engine of the other variant, so an artifact compiled without
/// metering can never run a call that asked for fuel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metering {
    /// No fuel instrumentation: the call has no fuel budget.
    None,
    /// Fuel instrumentation compiled in: the call runs with a fuel budget.
    Fuel,
}

impl Metering {
    /// The variant a call with this fuel budget needs: [`Metering::Fuel`] when it has one.
    pub fn of(fuel: Option<u64>) -> Self {
        if fuel.is_some() {
            Self::Fuel
        } else {
            Self::None
        }
    }

    /// Names the settings of [`shared_config`] for this variant and [`CPU_FLAGS`]; change them
    /// whenever those change, so caches keyed by them never hand out an artifact the guest would
    /// refuse. The two variants' names differ, so their artifacts are cached apart.
    pub fn settings_id(self) -> &'static str {
        match self {
            Self::None => SETTINGS_ID_NO_FUEL,
            Self::Fuel => SETTINGS_ID_FUEL,
        }
    }

    /// Short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "unmetered",
            Self::Fuel => "fuel-metered",
        }
    }
}

/// [`Metering::settings_id`] of [`Metering::Fuel`].
const SETTINGS_ID_FUEL: &str = "v3 no-components signals reservation-4g guard-32m no-move no-cow no-relaxed-simd epoch fuel sse3-ssse3-sse41-sse42-popcnt";

/// [`Metering::settings_id`] of [`Metering::None`].
const SETTINGS_ID_NO_FUEL: &str = "v3 no-components signals reservation-4g guard-32m no-move no-cow no-relaxed-simd epoch no-fuel sse3-ssse3-sse41-sse42-popcnt";

/// Target triple the host compiles for: the freestanding guest.
pub const TARGET: &str = "x86_64-unknown-none";

/// Cranelift ISA flags the host enables: the x86-64-v2 baseline. With SSE4.1 Cranelift lowers
/// every float rounding op inline, so compiled code makes no float libcall (what makes the guest's
/// `x86_float_abi_ok` sound). The guest checks each against CPUID when it loads an artifact.
pub const CPU_FLAGS: &[&str] = &[
    "has_sse3",
    "has_ssse3",
    "has_sse41",
    "has_sse42",
    "has_popcnt",
];

/// Bytes reserved for each linear memory: all a 32-bit memory can reach, so compiled code needs
/// no bounds check on it (the guest gives each memory a window this large,
/// `bulwark_abi::layout::WINDOW_MAX_SIZE`).
pub const MEMORY_RESERVATION: u64 = 4 << 30;

/// Bytes never mapped after each linear memory's reservation: a static offset up to this size
/// needs no bounds check either (the guest's windows leave `WINDOW_GUARD_SIZE` unmapped).
pub const MEMORY_GUARD_SIZE: u64 = 32 << 20;

/// The settings both sides must share: signal-based traps (an access past a linear memory, a
/// division by zero and `unreachable` fault, and the guest delivers the fault to wasmtime), a
/// [`MEMORY_RESERVATION`] for every linear memory followed by a [`MEMORY_GUARD_SIZE`] guard, in
/// which it grows without moving, no copy-on-write images, no relaxed SIMD (its FMA lowering
/// could need a float libcall), and fuel metering compiled in only for [`Metering::Fuel`].
///
/// With these, Cranelift elides the bounds checks of 32-bit memories and keeps Spectre
/// mitigations where checks remain (both need signals). They are wasmtime's defaults on
/// 64-bit Linux, which `--isolation wasm` runs on unchanged.
pub fn shared_config(metering: Metering) -> Config {
    let mut config = Config::new();
    config
        .signals_based_traps(true)
        .memory_reservation(MEMORY_RESERVATION)
        .memory_guard_size(MEMORY_GUARD_SIZE)
        .memory_reservation_for_growth(0)
        .memory_may_move(false)
        .memory_init_cow(false)
        .wasm_relaxed_simd(false)
        .epoch_interruption(true)
        .consume_fuel(metering == Metering::Fuel);
    config
}

/// The host compiler's configuration for `metering`: [`shared_config`] plus the guest target and
/// [`CPU_FLAGS`].
#[cfg(feature = "compiler")]
pub fn compiler_config(metering: Metering) -> wasmtime::Result<Config> {
    let mut config = shared_config(metering);
    config.target(TARGET)?;
    // The guest's wasmtime is built without the component model; whatever else in the host's
    // build turned the feature on must not leak into the artifact.
    config.wasm_component_model(false);
    for flag in CPU_FLAGS {
        // SAFETY: these flags describe the guest CPU baseline; the guest verifies each one with
        // CPUID (through `detect_host_feature`) before it runs code compiled with them.
        unsafe {
            config.cranelift_flag_enable(flag);
        }
    }
    Ok(config)
}

/// Names the settings [`host_config`] adds to the shared ones; change it with them, so the
/// compile cache never hands out an artifact compiled under other settings.
#[cfg(feature = "compiler")]
pub const HOST_SETTINGS_ID: &str = "v1 cranelift no-components epoch no-backtrace-details";

/// The configuration for running modules on the host itself (`bulwark run --isolation wasm`)
/// and compiling for it (`bulwark compile --target host [--fuel]`): [`shared_config`], so the
/// same modules validate with the same fuel costs, compiled for this host's CPU.
#[cfg(feature = "compiler")]
pub fn host_config(metering: Metering) -> Config {
    let mut config = shared_config(metering);
    config
        .strategy(wasmtime::Strategy::Cranelift)
        // As `compiler_config`: the guest's wasmtime has no component model (the host's build
        // has it only because wasmtime-wasi needs it), so the same modules are refused.
        .wasm_component_model(false)
        .epoch_interruption(true)
        // The guest has no DWARF support: keep trap messages the same whatever the environment.
        .wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Disable);
    config
}

/// How a call that did not return from `_start` ended, decided the same way on both sides (the
/// guest agent and `bulwark run --isolation wasm`): `exit` is the code when the error is the
/// embedder's `proc_exit`; out of fuel is its own outcome; any other trap carries its message
/// and Wasm backtrace. Any other error is the embedder's: before `_start` was called
/// (`started` false: a link or instantiation error, no `_start`) the call is refused; after it,
/// a host function failed, and that is the agent's own failure.
pub fn outcome_of(e: &wasmtime::Error, exit: Option<i32>, started: bool) -> Outcome {
    if let Some(code) = exit {
        return Outcome::Exited(code);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => Outcome::OutOfFuel,
        Some(_) => Outcome::Trap(format!("{e:?}")),
        None if started => Outcome::AgentFailed(e.to_string()),
        None => Outcome::Refused(e.to_string()),
    }
}

/// Most linear memories a call's store may hold, all instances together. wasmtime's validator
/// already refuses a module that declares more than 100; this holds the store to it too.
pub const MAX_MEMORIES: usize = 100;

/// Most tables a call's store may hold, all instances together (the validator's per-module
/// limit is 100 as well).
pub const MAX_TABLES: usize = 100;

/// Most table elements a call's store may hold, all its tables together (wasmtime stores a
/// pointer per element, so this bounds tables to 8 MB whatever `max_memory` is).
pub const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// A call's store limits, the same on both sides (the guest agent and
/// `bulwark run --isolation wasm`): **one** budget of `max_memory` bytes for all linear memories
/// together, [`MAX_TABLE_ELEMENTS`] for all tables together, at most [`MAX_MEMORIES`] memories,
/// [`MAX_TABLES`] tables and one instance.
///
/// wasmtime asks before every memory or table comes into being (current size 0, desired its
/// minimum) and before every grow; the limiter adds the growth to the store's total and refuses
/// what would pass the budget. A refused grow answers `memory.grow`/`table.grow` with -1 (what
/// the tool sees), never a trap; a refused minimum fails the instantiation. A grow the limiter
/// allowed but wasmtime then failed (the host's allocator said no) stays counted: the total only
/// errs on the side of less memory.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// The budget of all linear memories, in bytes.
    max_memory: usize,
    /// Bytes granted to all linear memories so far.
    memory: usize,
    /// Elements granted to all tables so far.
    table_elements: usize,
}

impl CallLimits {
    /// Limits for one call whose linear memories may hold `max_memory` bytes together.
    pub fn new(max_memory: u64) -> Self {
        Self {
            max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
            memory: 0,
            table_elements: 0,
        }
    }

    /// Bytes of linear memory granted so far, all memories together.
    pub fn memory_bytes(&self) -> usize {
        self.memory
    }

    /// Table elements granted so far, all tables together.
    pub fn table_elements(&self) -> usize {
        self.table_elements
    }
}

/// Grants growth from `current` to `desired` (never past `maximum`) out of `total`, if the sum
/// stays within `budget`.
fn grant(
    total: &mut usize,
    budget: usize,
    current: usize,
    desired: usize,
    maximum: Option<usize>,
) -> bool {
    if maximum.is_some_and(|max| desired > max) {
        // wasmtime would fail this grow after asking; refuse it here so it is never counted.
        return false;
    }
    match total.checked_add(desired.saturating_sub(current)) {
        Some(sum) if sum <= budget => {
            *total = sum;
            true
        }
        _ => false,
    }
}

impl wasmtime::ResourceLimiter for CallLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(grant(
            &mut self.memory,
            self.max_memory,
            current,
            desired,
            maximum,
        ))
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // A grow that left bytes past the memory's size accessible ends the call (a trap):
        // the tool must not go on reading them. Any other failure: the tool sees -1 from
        // memory.grow, as for a refused grow.
        if error.downcast_ref::<GrowLeftMapped>().is_some() {
            return Err(error);
        }
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(grant(
            &mut self.table_elements,
            MAX_TABLE_ELEMENTS,
            current,
            desired,
            maximum,
        ))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        Ok(())
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// The error of a linear memory whose grow failed after part of the growth was already mapped
/// (the guest cannot unmap window pages): bytes past the memory's size are accessible, so
/// [`CallLimits`] turns this failure into a trap instead of -1 from `memory.grow`.
#[derive(Debug)]
pub struct GrowLeftMapped;

impl core::fmt::Display for GrowLeftMapped {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(
            "a linear memory's grow failed half-way (the VM ran out of memory or page tables); the call cannot go on",
        )
    }
}

impl core::error::Error for GrowLeftMapped {}

/// A call's store limits (see [`CallLimits`]): all linear memories together up to `max_memory`
/// bytes.
pub fn store_limits(max_memory: u64) -> CallLimits {
    CallLimits::new(max_memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_variants_have_their_own_settings_ids() {
        assert_ne!(Metering::None.settings_id(), Metering::Fuel.settings_id());
        assert!(Metering::Fuel.settings_id().contains(" fuel "));
        assert!(Metering::None.settings_id().contains(" no-fuel "));
        assert_eq!(Metering::of(Some(0)), Metering::Fuel);
        assert_eq!(Metering::of(Some(u64::MAX)), Metering::Fuel);
        assert_eq!(Metering::of(None), Metering::None);
    }

    #[test]
    fn all_memories_share_one_budget() {
        let mut l = store_limits(64 << 20);
        // Twenty 32 MiB memories come into being one by one: two fit, the third does not.
        assert!(l.memory_growing(0, 32 * MIB, None).unwrap());
        assert!(l.memory_growing(0, 32 * MIB, None).unwrap());
        assert!(!l.memory_growing(0, 32 * MIB, None).unwrap());
        assert!(!l.memory_growing(0, 64 * 1024, None).unwrap());
        assert_eq!(l.memory_bytes(), 64 * MIB);
        // An empty memory costs nothing.
        assert!(l.memory_growing(0, 0, None).unwrap());
    }

    #[test]
    fn growth_counts_only_the_difference() {
        let mut l = store_limits(64 << 20);
        assert!(l.memory_growing(0, 16 * MIB, None).unwrap());
        assert!(l.memory_growing(16 * MIB, 48 * MIB, None).unwrap());
        assert_eq!(l.memory_bytes(), 48 * MIB);
        // A second memory gets what is left, and not a page more.
        assert!(!l.memory_growing(0, 16 * MIB + 64 * 1024, None).unwrap());
        assert!(l.memory_growing(0, 16 * MIB, None).unwrap());
        assert!(
            !l.memory_growing(48 * MIB, 48 * MIB + 64 * 1024, None)
                .unwrap()
        );
        assert_eq!(l.memory_bytes(), 64 * MIB);
        // A refused grow is answered with Ok(false) (memory.grow gives -1), never an error, and
        // a grow wasmtime itself failed is not a trap either.
        assert!(
            l.memory_grow_failed(wasmtime::Error::msg("no memory"))
                .is_ok()
        );
    }

    #[test]
    fn a_single_memory_behaves_as_before() {
        let mut l = store_limits(32 << 20);
        assert!(l.memory_growing(0, 64 * 1024, None).unwrap());
        assert!(l.memory_growing(64 * 1024, 32 * MIB, None).unwrap());
        assert!(!l.memory_growing(32 * MIB, 96 * MIB, None).unwrap());
        assert_eq!(l.memory_bytes(), 32 * MIB);
    }

    #[test]
    fn growth_past_a_memorys_own_maximum_is_refused_and_not_counted() {
        let mut l = store_limits(64 << 20);
        assert!(l.memory_growing(0, MIB, Some(2 * MIB)).unwrap());
        assert!(!l.memory_growing(MIB, 3 * MIB, Some(2 * MIB)).unwrap());
        assert_eq!(l.memory_bytes(), MIB);
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        let mut l = store_limits(u64::MAX);
        assert!(l.memory_growing(0, usize::MAX - 1, None).unwrap());
        assert!(!l.memory_growing(0, 2, None).unwrap());
        assert_eq!(l.memory_bytes(), usize::MAX - 1);
    }

    #[test]
    fn all_tables_share_one_element_cap() {
        let mut l = store_limits(64 << 20);
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(l.table_growing(0, MAX_TABLE_ELEMENTS / 2, None).unwrap());
        assert!(!l.table_growing(0, 1, None).unwrap());
        assert!(!l.table_growing(10, 11, None).unwrap());
        assert_eq!(l.table_elements(), MAX_TABLE_ELEMENTS);
        assert!(l.table_grow_failed(wasmtime::Error::msg("x")).is_ok());
        // Tables and memories have separate budgets.
        assert!(l.memory_growing(0, 64 * MIB, None).unwrap());
    }

    #[test]
    fn counts_of_instances_memories_and_tables_are_capped() {
        let l = store_limits(1);
        assert_eq!(l.instances(), 1);
        assert_eq!(l.memories(), MAX_MEMORIES);
        assert_eq!(l.tables(), MAX_TABLES);
    }
}
