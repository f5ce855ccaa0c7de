;; cellmigrate's demonstration agent: a WebAssembly module that keeps rewriting its own
;; linear memory and grows it, deterministically.
;;
;; Everything the agent does follows from two exported mutable globals, so a run is
;; a pure function of the number of iterations executed, however they are split into
;; calls: step(a) then step(b) leaves exactly the memory and globals that step(a + b)
;; leaves. That is what lets a migrated instance be compared byte for byte with an
;; unmigrated reference run.
;;
;;   $lcg    (i64)  the state of a 64-bit linear congruential generator (Knuth's MMIX
;;                  constants); one draw per iteration.
;;   $steps  (i64)  iterations executed so far.
;;
;; One iteration (number s = $steps, counted from 0):
;;   1. s == 0: fill the initial memory (see $fill);
;;   2. every GROW_EVERY-th iteration, while the memory is below MAX_PAGES, grow it by
;;      one 64 KiB WebAssembly page and fill the new page;
;;   3. advance the LCG and store one 8-byte word at an 8-aligned offset it picks:
;;      7 draws in 8 land in the first HOT_BYTES (the agent's working set), the rest
;;      anywhere in the current memory;
;;   4. s += 1.
;;
;; Constants: initial memory 64 pages (4 MiB), MAX_PAGES 256 (16 MiB, also the declared
;; maximum), GROW_EVERY 1024 iterations, HOT_BYTES 1 MiB.
(module
  (memory (export "memory") 64 256)

  (global $lcg (export "lcg") (mut i64) (i64.const 0x2545f4914f6cdd1d))
  (global $steps (export "steps") (mut i64) (i64.const 0))

  ;; Read-only parameters, exported so the host can describe the agent.
  (global (export "grow_every") i64 (i64.const 1024))
  (global (export "max_pages") i32 (i32.const 256))
  (global (export "hot_bytes") i64 (i64.const 1048576))

  ;; One LCG draw: advance $lcg and return the new value.
  (func $next (result i64)
    (global.set $lcg
      (i64.add
        (i64.mul (global.get $lcg) (i64.const 6364136223846793005))
        (i64.const 1442695040888963407)))
    (global.get $lcg))

  ;; Fill [start, start + len) (both multiples of 4096) page by page: a 4 KiB page is,
  ;; by one draw, left zero (half of them: untouched heap) or filled with words derived
  ;; from the draw (a cheap xorshift sequence), like a heap of mixed content.
  (func $fill (param $start i32) (param $len i32)
    (local $page i32) (local $end i32) (local $p i32) (local $x i64)
    (local.set $end (i32.add (local.get $start) (local.get $len)))
    (local.set $page (local.get $start))
    (block $done
      (loop $pages
        (br_if $done (i32.ge_u (local.get $page) (local.get $end)))
        (local.set $x (call $next))
        (if (i64.ne (i64.and (local.get $x) (i64.const 0x100000000)) (i64.const 0))
          (then
            (local.set $p (local.get $page))
            (block $full
              (loop $words
                (br_if $full (i32.ge_u (local.get $p) (i32.add (local.get $page) (i32.const 4096))))
                ;; xorshift64: x ^= x << 13; x ^= x >> 7; x ^= x << 17
                (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 13))))
                (local.set $x (i64.xor (local.get $x) (i64.shr_u (local.get $x) (i64.const 7))))
                (local.set $x (i64.xor (local.get $x) (i64.shl (local.get $x) (i64.const 17))))
                (i64.store (local.get $p) (local.get $x))
                (local.set $p (i32.add (local.get $p) (i32.const 8)))
                (br $words)))))
        (local.set $page (i32.add (local.get $page) (i32.const 4096)))
        (br $pages))))

  ;; Run $n iterations (n <= 0 runs none); return the total number of iterations so far.
  (func (export "step") (param $n i32) (result i64)
    (local $i i32) (local $r i64) (local $old i32) (local $offset i64)
    (block $done
      (loop $iter
        (br_if $done (i32.ge_s (local.get $i) (local.get $n)))
        (if (i64.eqz (global.get $steps))
          (then (call $fill (i32.const 0) (i32.mul (memory.size) (i32.const 65536)))))
        (if (i32.and
              (i64.eq (i64.rem_u (global.get $steps) (i64.const 1024)) (i64.const 1023))
              (i32.lt_u (memory.size) (i32.const 256)))
          (then
            (local.set $old (memory.grow (i32.const 1)))
            (call $fill (i32.mul (local.get $old) (i32.const 65536)) (i32.const 65536))))
        (local.set $r (call $next))
        (local.set $offset
          (if (result i64) (i64.ne (i64.shr_u (local.get $r) (i64.const 61)) (i64.const 0))
            (then (i64.rem_u (i64.shr_u (local.get $r) (i64.const 16)) (i64.const 1048576)))
            (else (i64.rem_u (i64.shr_u (local.get $r) (i64.const 16))
                             (i64.mul (i64.extend_i32_u (memory.size)) (i64.const 65536))))))
        (i64.store
          (i32.wrap_i64 (i64.and (local.get $offset) (i64.const -8)))
          (i64.xor (local.get $r) (global.get $steps)))
        (global.set $steps (i64.add (global.get $steps) (i64.const 1)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $iter)))
    (global.get $steps))
)
