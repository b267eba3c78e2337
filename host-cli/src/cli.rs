//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Bulwark runs untrusted WebAssembly tools inside KVM micro-VMs: wasmtime's sandbox inside a
/// guest with no kernel, behind hardware virtualization.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Precompile a WebAssembly module (.wasm or .wat) for the Bulwark guest.
    ///
    /// The output is a wasmtime artifact for target x86_64-unknown-none with Bulwark's engine
    /// settings; only the guest loads it. The same input always gives the same bytes.
    Compile(CompileArgs),
}

/// Arguments of `bulwark compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The module: binary WebAssembly or the text format.
    pub input: PathBuf,

    /// Where to write the precompiled artifact (replaced atomically).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    pub json: bool,
}
