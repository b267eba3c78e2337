//! wasmtime in the guest: the platform hooks it needs without an operating system, the engine,
//! and the self-test.
//!
//! wasmtime's `custom` platform asks the embedder for thread-local storage
//! (`wasmtime_tls_get/set`; there is one thread, so two statics serve) and, with
//! `custom-native-signals`, for trap delivery (`traps`). Compiled code needs no `mprotect`:
//! guest RAM is mapped executable, so publishing code is a no-op.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicPtr, Ordering};

use bulwark_engine::Metering;
use wasmtime::{Config, CustomCodeMemory, Engine, Instance, Module, Store};

use crate::clock::{self, Clock};

/// wasmtime's TLS slots: 0 for the runtime, 1 for component-model async state.
static TLS: [AtomicPtr<u8>; 2] = [
    AtomicPtr::new(core::ptr::null_mut()),
    AtomicPtr::new(core::ptr::null_mut()),
];

/// wasmtime's TLS getter. Unknown slots read as null.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot)
        .map_or(core::ptr::null_mut(), |p| p.load(Ordering::Relaxed))
}

/// wasmtime's TLS setter. Unknown slots are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    if let Some(p) = TLS.get(slot) {
        p.store(ptr, Ordering::Relaxed);
    }
}

/// Code memory that is always executable: the VMM maps all guest RAM without NX.
struct AlwaysExecutable;

impl CustomCodeMemory for AlwaysExecutable {
    fn required_alignment(&self) -> usize {
        1
    }

    fn publish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }

    fn unpublish_executable(&self, _ptr: *const u8, _len: usize) -> wasmtime::Result<()> {
        Ok(())
    }
}

/// The CPUID words `detect_feature` reads (leaf 1 ECX, leaf 7 EBX, leaf 0x8000_0001 ECX), read
/// once: each CPUID is a VM exit, and wasmtime asks about each feature, for each engine.
fn cpuid_words() -> [u32; 3] {
    use core::arch::x86_64::__cpuid_count;
    use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    static WORDS: [AtomicU32; 3] = [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)];
    static READ: AtomicBool = AtomicBool::new(false);
    if !READ.load(Ordering::Acquire) {
        let words = [
            __cpuid_count(1, 0).ecx,
            __cpuid_count(7, 0).ebx,
            __cpuid_count(0x8000_0001, 0).ecx,
        ];
        for (slot, word) in WORDS.iter().zip(words) {
            slot.store(word, Ordering::Relaxed);
        }
        READ.store(true, Ordering::Release);
    }
    let word = |i: usize| WORDS[i].load(Ordering::Relaxed);
    [word(0), word(1), word(2)]
}

/// Answers wasmtime's CPU feature questions from CPUID, which the VMM filtered to what the
/// guest may use (no AVX: XSAVE state is never enabled).
fn detect_feature(name: &str) -> Option<bool> {
    let [leaf1_ecx, leaf7_ebx, ext1_ecx] = cpuid_words();
    let bit = |reg: u32, n: u32| reg & (1 << n) != 0;
    Some(match name {
        "sse3" => bit(leaf1_ecx, 0),
        "ssse3" => bit(leaf1_ecx, 9),
        "sse4.1" => bit(leaf1_ecx, 19),
        "sse4.2" => bit(leaf1_ecx, 20),
        "popcnt" => bit(leaf1_ecx, 23),
        "cmpxchg16b" => bit(leaf1_ecx, 13),
        "bmi1" => bit(leaf7_ebx, 3),
        "bmi2" => bit(leaf7_ebx, 8),
        "lzcnt" => bit(ext1_ecx, 5),
        "avx" | "avx2" | "fma" | "f16c" => false,
        name if name.starts_with("avx512") => false,
        _ => return None,
    })
}

/// The guest's engine configuration for unmetered calls (what the self-test and calls without a
/// fuel budget run with): [`config_for`] [`Metering::None`].
pub fn config() -> Config {
    config_for(Metering::None)
}

/// The guest's engine configuration of one metering variant: the shared settings plus this
/// platform's hooks.
pub fn config_for(metering: Metering) -> Config {
    let mut config = bulwark_engine::shared_config(metering);
    config.with_custom_code_memory(Some(Arc::new(AlwaysExecutable)));
    // Linear memories in windows with guard pages (see linear_memory): wasmtime's own would
    // need virtual memory.
    config.with_host_memory(Arc::new(crate::linear_memory::GuestMemoryCreator));
    // SAFETY: x86_64-unknown-none is a soft-float target; float arguments only cross between
    // Rust and compiled Wasm through libcalls, and the host compiles with
    // `bulwark_engine::CPU_FLAGS` (SSE4.1 and up), under which Cranelift emits no float libcall.
    unsafe {
        config.x86_float_abi_ok(true);
    }
    // SAFETY: `detect_feature` answers from CPUID, so it reports only what the CPU has.
    unsafe {
        config.detect_host_feature(detect_feature);
    }
    config
}

/// What the self-test produced.
pub struct SelfTest {
    /// The value `run` returned.
    pub result: i64,
    /// Time of each stage, for the console.
    pub timings: String,
}

/// Deserializes `artifact` (precompiled by the host for this engine), instantiates it with no
/// imports, and calls its export `run: () -> i64`.
pub fn self_test(artifact: &[u8], clock: &Clock) -> wasmtime::Result<SelfTest> {
    let t0 = clock::now();
    let engine = Engine::new(&config())?;
    let t1 = clock::now();
    // SAFETY: the artifact is the build's own precompiled self-test, handed over by the VMM;
    // deserialize checks that it was compiled by this wasmtime version with this configuration.
    let module = unsafe { Module::deserialize(&engine, artifact) }?;
    let t2 = clock::now();
    // Unmetered, like `bulwark compile` by default: the engine has no fuel to set.
    let mut store = Store::new(&engine, ());
    store.set_epoch_deadline(u64::MAX);
    let instance = Instance::new(&mut store, &module, &[])?;
    let run = instance.get_typed_func::<(), i64>(&mut store, "run")?;
    let t3 = clock::now();
    let result = run.call(&mut store, ())?;
    let t4 = clock::now();
    let timings = format!(
        "engine {} us, deserialize {} us, instantiate {} us, call {} us",
        clock.micros(t1 - t0),
        clock.micros(t2 - t1),
        clock.micros(t3 - t2),
        clock.micros(t4 - t3),
    );
    Ok(SelfTest { result, timings })
}
