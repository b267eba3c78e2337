//! Bulwark's virtual machine monitor.
//!
//! One process runs one VM with one vCPU. The guest is a freestanding program that starts in
//! 64-bit mode at CPL3: this crate builds all of its CPU state (page tables, GDT, TSS, IDT,
//! control registers, CPUID), loads its ELF image and serves its devices. It knows nothing of
//! WebAssembly or of the agent protocol.

pub mod artifact;
pub mod boot;
pub mod confine;
pub mod cpu;
pub mod devices;
pub mod files;
pub mod late;
pub mod loader;
pub mod memory;
pub mod outcome;
pub mod reset;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use outcome::VmExit;
pub use vm::{Console, RunReport, Vm, VmConfig, VmError, run};
