;; The Wasm self-test the guest runs at boot (images/build.sh precompiles it).
;; `run` does integer work, floating-point work (sqrt, floor and a float-to-int conversion, which
;; need SSE4.1 when compiled for the guest) and memory growth (1 page to 3, writes and reads
;; back in the new pages, memory.size). The expected result is in selftest.expected, computed
;; independently of wasmtime by a Python re-implementation of the same arithmetic:
;;   acc = sum((i*i) ^ (i<<3) for i in 0..1000) + 1 (memory.grow's old size)
;;         + sum(p*7 for p in 65536..196608 step 4096)
;;   f   = sum of sqrt(i)*1.5, accumulated in order
;;   run = acc*1000 + 3 (memory.size) + floor(f)
(module
  (memory 1)
  (func (export "run") (result i64)
    (local $i i32) (local $p i32) (local $f f64) (local $acc i64)
    (loop $work
      (local.set $acc
        (i64.add (local.get $acc)
          (i64.xor
            (i64.mul (i64.extend_i32_u (local.get $i)) (i64.extend_i32_u (local.get $i)))
            (i64.extend_i32_u (i32.shl (local.get $i) (i32.const 3))))))
      (local.set $f
        (f64.add (local.get $f)
          (f64.mul (f64.sqrt (f64.convert_i32_u (local.get $i))) (f64.const 1.5))))
      (br_if $work
        (i32.lt_u (local.tee $i (i32.add (local.get $i) (i32.const 1))) (i32.const 1000))))
    ;; Grow by two pages: memory.grow returns the old size, 1.
    (local.set $acc
      (i64.add (local.get $acc) (i64.extend_i32_s (memory.grow (i32.const 2)))))
    (local.set $p (i32.const 65536))
    (loop $write
      (i32.store (local.get $p) (i32.mul (local.get $p) (i32.const 7)))
      (br_if $write
        (i32.lt_u (local.tee $p (i32.add (local.get $p) (i32.const 4096))) (i32.const 196608))))
    (local.set $p (i32.const 65536))
    (loop $read
      (local.set $acc
        (i64.add (local.get $acc) (i64.extend_i32_u (i32.load (local.get $p)))))
      (br_if $read
        (i32.lt_u (local.tee $p (i32.add (local.get $p) (i32.const 4096))) (i32.const 196608))))
    (i64.add
      (i64.add
        (i64.mul (local.get $acc) (i64.const 1000))
        (i64.extend_i32_u (memory.size)))
      (i64.trunc_f64_s (f64.floor (local.get $f))))))
