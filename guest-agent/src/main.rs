//! `bulwark-guest`: the whole Bulwark guest, a freestanding program with no kernel under it.
//!
//! The VMM enters `_start` in 64-bit mode at CPL3 with RSP at the top of the stack and RDI
//! pointing at the boot-info block. The guest checks boot info, sets up its heap, reports ready
//! on the serial console, runs the Wasm self-test from the payload, and exits through the
//! control port.

#![no_std]
#![no_main]
extern crate alloc;

mod agent;
mod clock;
mod console;
mod control;
mod exceptions;
mod heap;
mod linear_memory;
mod runtime;
mod server;
mod services;
mod stream;
mod traps;
mod virtio;
mod wasi;

use bulwark_abi::boot::{BootInfo, TestMode};
use bulwark_abi::layout;
use bulwark_abi::ports::exit_status;

core::arch::global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "xor ebp, ebp",
    // RSP is 16-byte aligned; the call pushes the return address as the ABI expects.
    "call {main}",
    "ud2",
    main = sym guest_main,
);

/// The Rust entry point, called from `_start` with the boot-info address.
extern "C" fn guest_main(boot_info: *const BootInfo) -> ! {
    let entered = clock::now();
    if boot_info as u64 != layout::BOOT_INFO {
        console::print("bulwark-guest: boot info is not where the ABI puts it\n");
        control::exit(exit_status::BAD_BOOT_INFO);
    }
    // SAFETY: the VMM wrote a BootInfo at layout::BOOT_INFO (checked above), a mapped,
    // user-readable page; it is read once, by value, and validated before use.
    let info = unsafe { core::ptr::read_volatile(boot_info) };
    if let Err(why) = info.validate() {
        console::print("bulwark-guest: bad boot info: ");
        console::print(why);
        console::print("\n");
        control::exit(exit_status::BAD_BOOT_INFO);
    }
    if exceptions::stubs_address() != layout::EXCEPTION_STUBS {
        console::print("bulwark-guest: exception stubs are not at EXCEPTION_STUBS\n");
        control::exit(exit_status::BAD_BOOT_INFO);
    }
    // SAFETY: boot info was validated: the heap lies in guest RAM after the payload, is used by
    // nothing else, and this is the only call.
    unsafe { heap::init(info.heap_start, info.heap_size) };
    if info.high_ram_size > 0 {
        // SAFETY: boot info was validated: high RAM is guest RAM at HIGH_RAM_START, mapped by
        // the VMM's page tables, apart from the low heap, and used by nothing else.
        unsafe { heap::add(layout::HIGH_RAM_START, info.high_ram_size) };
    }
    let clock = clock::Clock::new(info.tsc_khz);
    println!("bulwark-guest ready in {}", clock.since(entered));

    match TestMode::from_raw(info.test_mode) {
        Some(TestMode::InvalidOpcode) => exceptions::invalid_opcode(),
        Some(TestMode::UnclaimedMmio) => {
            // SAFETY: a read of the MMIO window, which is mapped; no device claims this address,
            // so the VMM stops the VM here, which is what this test mode is for.
            let value = unsafe { core::ptr::read_volatile(layout::MMIO_UNCLAIMED as *const u32) };
            println!("unclaimed MMIO read returned {value:#x}");
        }
        Some(TestMode::WriteStubs) => {
            // SAFETY: a write to the stubs' page, which is mapped supervisor-only: the CPU
            // faults here and the VMM stops the VM, which is what this test mode is for.
            unsafe { core::ptr::write_volatile(layout::EXCEPTION_STUBS as *mut u8, 0xcc) };
            println!("the exception stubs' page took a write from CPL3");
        }
        Some(TestMode::WriteArtifact) => {
            // SAFETY: a write to the artifact window, which is mapped read-only: the CPU faults
            // here and the VMM stops the VM, which is what this test mode is for.
            unsafe { core::ptr::write_volatile(layout::ARTIFACT_START as *mut u8, 0xcc) };
            println!("the artifact window took a write");
        }
        Some(TestMode::ReadPastArtifact) => {
            let past = layout::ARTIFACT_START + info.artifact_size.div_ceil(4096) * 4096;
            // SAFETY: a read inside the window's last 2 MiB page but past its memory slot: no
            // memory is behind it, so the VMM stops the VM here, which is what this mode is for.
            let value = unsafe { core::ptr::read_volatile(past as *const u8) };
            println!("a read past the artifact returned {value:#x}");
        }
        Some(TestMode::ReadPastLateArtifact) => {
            let size = loop {
                match agent::artifact_size_now() {
                    0 => core::hint::spin_loop(),
                    size => break size,
                }
            };
            if size > layout::ARTIFACT_MAX_SIZE {
                console::print("bulwark-guest: the late artifact is larger than its window\n");
                control::exit(exit_status::BAD_BOOT_INFO);
            }
            println!("a {size}-byte artifact was mapped late");
            let past = layout::ARTIFACT_START + size.div_ceil(4096) * 4096;
            // SAFETY: as for ReadPastArtifact: no memory is behind this address, so the VMM
            // stops the VM here, which is what this mode is for.
            let value = unsafe { core::ptr::read_volatile(past as *const u8) };
            println!("a read past the late artifact returned {value:#x}");
        }
        Some(TestMode::WindowTrap) => window_trap_test(),
        Some(TestMode::WriteWindowTables) => {
            // SAFETY: a write to the window page tables, which are mapped supervisor-only: the
            // CPU faults here and the VMM stops the VM, which is what this test mode is for.
            unsafe { core::ptr::write_volatile(layout::WINDOW_TABLES as *mut u64, 0x1234_0007) };
            println!("the window page tables took a write from CPL3");
        }
        Some(TestMode::Spin) => loop {
            core::hint::spin_loop();
        },
        Some(mode @ (TestMode::VsockEcho | TestMode::VsockConnect)) => {
            vsock_test(mode, info.vsock_cid)
        }
        Some(TestMode::None) | None => {}
    }

    let Ok(payload_size) = usize::try_from(info.payload_size) else {
        console::print("bulwark-guest: bad boot info: the payload size does not fit usize\n");
        control::exit(exit_status::BAD_BOOT_INFO);
    };
    // SAFETY: boot info was validated: the payload lies in guest RAM below the heap, and no one
    // writes it while this slice lives.
    let payload =
        unsafe { core::slice::from_raw_parts(info.payload_start as *const u8, payload_size) };
    if payload.is_empty() {
        println!("wasm self-test: skipped (no payload)");
    } else {
        match runtime::self_test(payload, &clock) {
            Ok(report) => println!(
                "wasm self-test: run() = {} ({})",
                report.result, report.timings
            ),
            Err(e) => {
                println!("wasm self-test failed: {e:?}");
                control::exit(exit_status::SELF_TEST_FAILED)
            }
        }
    }
    if info.vsock_cid == 0 {
        control::exit(exit_status::OK);
    }
    serve_calls(info.vsock_cid, clock)
}

/// Runs the agent server on vsock for the artifact the VMM maps (at start, or later: the agent
/// looks at the boot info when a call needs it); never returns.
fn serve_calls(cid: u64, clock: clock::Clock) -> ! {
    let t0 = clock::now();
    let vsock = match virtio::vsock::Vsock::init(cid) {
        Ok(v) => v,
        Err(e) => {
            println!("bulwark-guest: vsock setup failed: {e:?}");
            control::exit(exit_status::SELF_TEST_FAILED);
        }
    };
    let t1 = clock::now();
    let engine = match wasmtime::Engine::new(&runtime::config()) {
        Ok(e) => e,
        Err(e) => {
            println!("bulwark-guest: cannot create the engine: {e:?}");
            control::exit(exit_status::SELF_TEST_FAILED);
        }
    };
    let t2 = clock::now();
    let mut agent = match agent::Agent::new(engine, clock) {
        Ok(a) => a,
        Err(e) => {
            println!("bulwark-guest: cannot set up WASI: {e:?}");
            control::exit(exit_status::SELF_TEST_FAILED);
        }
    };
    let t3 = clock::now();
    println!(
        "agent listening on vsock port {} (set-up: vsock {} us, engine {} us, WASI linker {} us)",
        bulwark_proto::call::AGENT_PORT,
        clock.micros(t1 - t0),
        clock.micros(t2 - t1),
        clock.micros(t3 - t2)
    );
    server::serve(vsock, &mut agent, clock)
}

/// Test mode [`TestMode::WindowTrap`]: maps 64 KiB of a window, uses it, and reads past it;
/// the page fault must come back to [`traps`], delivered by the VMM.
fn window_trap_test() -> ! {
    extern "C" fn hook(pc: usize, _fp: usize, page_fault: bool, addr: usize) {
        println!("trap delivered: pc {pc:#x}, page fault {page_fault}, address {addr:#x}");
        let expected = layout::window_start(1) + 0x1_0000;
        control::exit(if page_fault && addr as u64 == expected {
            exit_status::OK
        } else {
            exit_status::SELF_TEST_FAILED
        })
    }
    traps::set_test_hook(hook);
    let Ok(layout) = core::alloc::Layout::from_size_align(0x1_0000, 0x1000) else {
        control::exit(exit_status::SELF_TEST_FAILED);
    };
    // SAFETY: a non-zero size; the block is never freed (it stays behind the window).
    let ram = unsafe { alloc::alloc::alloc(layout) };
    if ram.is_null() || linear_memory::map(1, 0, 0x1_0000, ram as u64).is_err() {
        println!("window trap test: cannot map the window");
        control::exit(exit_status::SELF_TEST_FAILED);
    }
    let base = layout::window_start(1) as *mut u64;
    // SAFETY: the VMM just mapped the window's first 64 KiB onto `ram`, 64 KiB of our heap.
    let seen = unsafe {
        base.add(0x1_0000 / 8 - 1).write_volatile(0x5eed);
        core::ptr::read_volatile(ram.add(0x1_0000 - 8).cast::<u64>())
    };
    println!("window write seen through the identity map: {seen:#x}");
    // SAFETY: a read just past the mapped part: the CPU faults here, and the test hook ends
    // the VM; this is what the test mode is for.
    let value = unsafe { core::ptr::read_volatile(base.add(0x1_0000 / 8)) };
    println!("a read past the window's mapped part returned {value:#x}");
    control::exit(exit_status::SELF_TEST_FAILED)
}

/// Runs a vsock test service; never returns.
fn vsock_test(mode: TestMode, cid: u64) -> ! {
    if cid == 0 {
        println!("bulwark-guest: this test mode needs a vsock device (--vsock-uds)");
        control::exit(exit_status::BAD_BOOT_INFO);
    }
    let mut vsock = match virtio::vsock::Vsock::init(cid) {
        Ok(v) => v,
        Err(e) => {
            println!("bulwark-guest: vsock setup failed: {e:?}");
            control::exit(exit_status::SELF_TEST_FAILED);
        }
    };
    println!("vsock ready (cid {cid})");
    if mode == TestMode::VsockEcho {
        services::echo_server(&mut vsock, bulwark_abi::vsock::ECHO_PORT);
    }
    match services::connect_test(&mut vsock) {
        Ok(()) => control::exit(exit_status::OK),
        Err(e) => {
            println!("vsock connect test failed: {e:?}");
            control::exit(exit_status::SELF_TEST_FAILED)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest panic: {info}");
    control::exit(exit_status::PANIC)
}
