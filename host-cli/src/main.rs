//! `bulwark`: compiles WebAssembly tools and runs them in Bulwark's micro-VMs.

mod cache;
mod cli;
mod compile;
mod dirs;
mod doctor;
mod interrupt;
mod local;
mod run;
mod vm;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Compile(args) => compile::run(&args),
        cli::Command::Run(args) => return run::run(&args),
        cli::Command::Doctor { json } => return doctor::run(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwark: {e:#}");
            ExitCode::FAILURE
        }
    }
}
