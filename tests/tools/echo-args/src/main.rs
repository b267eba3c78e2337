//! A WASI test tool: prints its arguments, the variables named in `SHOW`, and standard input
//! (upper-cased), then exits with the code in `EXIT` (default 0). With `TRAP=1` it panics (a
//! Wasm trap); with `SPIN=1` it loops forever; with `GROW=n` it allocates n MiB; with
//! `FLOOD=n` it writes n MiB to stdout.

use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("args: {}", args[1..].join(" "));
    if let Ok(names) = std::env::var("SHOW") {
        for name in names.split(',') {
            println!("env {name}={}", std::env::var(name).unwrap_or_default());
        }
    }
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).expect("stdin");
    if !input.is_empty() {
        println!("stdin: {}", input.to_uppercase().trim_end());
    }
    eprintln!("to stderr");
    if std::env::var("TRAP").is_ok() {
        panic!("asked to trap");
    }
    if std::env::var("SPIN").is_ok() {
        let mut x: u64 = 1;
        loop {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            if x == 0 {
                break;
            }
        }
    }
    if let Ok(mib) = std::env::var("GROW") {
        let n: usize = mib.parse().unwrap_or(0);
        let v = vec![1u8; n << 20];
        println!("grew {} MiB", v.len() >> 20);
    }
    if let Ok(mib) = std::env::var("FLOOD") {
        let n: usize = mib.parse().unwrap_or(0);
        let line = [b'x'; 1024];
        let mut out = std::io::stdout().lock();
        for _ in 0..n * 1024 {
            if out.write_all(&line).is_err() {
                break;
            }
        }
    }
    let code: i32 = std::env::var("EXIT").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    std::process::exit(code);
}
