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

/// Names the settings of [`shared_config`] and [`CPU_FLAGS`]; change it whenever they change, so
/// caches keyed by it never hand out an artifact the guest would refuse.
pub const SETTINGS_ID: &str = "v2 no-components no-signals no-reservation no-guard no-cow no-relaxed-simd fuel sse3-ssse3-sse41-sse42-popcnt";

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

/// The settings both sides must share: no signal-based traps (the guest has no signals), no
/// virtual-memory tricks (no reservation, guard pages or copy-on-write images: the guest has no
/// `mmap`), no relaxed SIMD (its FMA lowering could need a float libcall), and fuel metering
/// compiled in so a call can be given a fuel budget (unmetered calls get the maximum).
pub fn shared_config() -> Config {
    let mut config = Config::new();
    config
        .signals_based_traps(false)
        .memory_reservation(0)
        .memory_guard_size(0)
        .memory_reservation_for_growth(0)
        .memory_init_cow(false)
        .wasm_relaxed_simd(false)
        .consume_fuel(true);
    config
}

/// The host compiler's configuration: [`shared_config`] plus the guest target and [`CPU_FLAGS`].
#[cfg(feature = "compiler")]
pub fn compiler_config() -> wasmtime::Result<Config> {
    let mut config = shared_config();
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

/// How a call that did not return from `_start` ended, decided the same way on both sides (the
/// guest agent and `bulwark run --isolation wasm`): `exit` is the code when the error is the
/// embedder's `proc_exit`; out of fuel is its own outcome; any other trap carries its message
/// and Wasm backtrace; anything else (a link or instantiation error) is an error.
pub fn outcome_of(e: &wasmtime::Error, exit: Option<i32>) -> Outcome {
    if let Some(code) = exit {
        return Outcome::Exited(code);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => Outcome::OutOfFuel,
        Some(_) => Outcome::Trap(format!("{e:?}")),
        None => Outcome::Error(e.to_string()),
    }
}

/// Most table elements a tool may have.
pub const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// A call's store limits, the same on both sides: linear memory up to `max_memory` bytes,
/// [`MAX_TABLE_ELEMENTS`], one instance, and a failed `memory.grow` answered with -1 (what the
/// tool sees) rather than a trap.
pub fn store_limits(max_memory: u64) -> wasmtime::StoreLimits {
    wasmtime::StoreLimitsBuilder::new()
        .memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        .table_elements(MAX_TABLE_ELEMENTS)
        .instances(1)
        .trap_on_grow_failure(false)
        .build()
}
