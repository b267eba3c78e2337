//! Small tools in the WebAssembly text format for the server's tests and benchmarks.

/// A tool that traps at once (`unreachable`).
pub const TRAP: &str =
    r#"(module (func (export "_start") unreachable) (memory (export "memory") 1))"#;

/// A tool that spins until it is stopped.
pub const SPIN: &str =
    r#"(module (func (export "_start") (loop (br 0))) (memory (export "memory") 1))"#;

/// A tool that writes 4 MiB of `x` to stdout, in 64 KiB writes.
pub const FLOOD: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 65536))
    (memory.fill (i32.const 1024) (i32.const 120) (i32.const 65536))
    (loop
      (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if 0 (i32.lt_u (local.get $i) (i32.const 64))))))"#;
