;; A script for profiles: nearly all of its instructions go to $hot, a few to $cold and $work.
;;   scriptpool run --local examples/wat/hot.wat --input examples/wat/input.json --profile hot.json
;; then open hot.json at https://www.speedscope.app ("left heavy" shows $hot under _start).
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"profiled\":true}")
  (global $sink (mut i32) (i32.const 0))
  (func $work (param $n i32) (result i32) (local $i i32) (local $acc i32)
    (block $done (loop $top
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.xor (i32.mul (local.get $acc) (i32.const 1664525)) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $top)))
    (local.get $acc))
  (func $hot (param $n i32) (result i32) (local $i i32) (local $acc i32)
    (block $done (loop $top
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.xor (i32.mul (local.get $acc) (i32.const 1103515245)) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $top)))
    (i32.add (local.get $acc) (call $work (i32.const 100))))
  (func $cold (param $n i32) (result i32) (local $i i32) (local $acc i32)
    (block $done (loop $top
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.xor (i32.mul (local.get $acc) (i32.const 22695477)) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $top)))
    (local.get $acc))
  (func $run (export "_start") (local $k i32)
    (block $done (loop $top
      (br_if $done (i32.ge_u (local.get $k) (i32.const 100)))
      (global.set $sink (i32.add (global.get $sink) (call $hot (i32.const 4000))))
      (if (i32.eqz (i32.rem_u (local.get $k) (i32.const 10)))
        (then (global.set $sink (i32.add (global.get $sink) (call $cold (i32.const 400))))))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br $top)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
