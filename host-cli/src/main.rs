//! `bulwark`: compiles WebAssembly tools and runs them in Bulwark's micro-VMs.

mod cache;
mod call;
mod cancel;
mod cli;
mod compile;
mod confine;
mod dirs;
mod doctor;
mod interrupt;
mod lang;
mod local;
mod mcp;
mod memo;
mod policy;
mod run;
mod serve;
mod sign;
mod vm;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Compile(args) => compile::run(&args),
        cli::Command::Run(args) => return run::run(&args),
        cli::Command::Python(args) => return lang::python(args),
        cli::Command::Js(args) => return lang::js(args),
        cli::Command::Serve(args) => serve::run(&args),
        cli::Command::Mcp(args) => mcp::run(&args),
        cli::Command::Doctor { json } => return doctor::run(json),
        cli::Command::Keygen(args) => sign::keygen(&args),
        cli::Command::Sign(args) => sign::sign(&args),
        cli::Command::Verify(args) => return sign::verify(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
