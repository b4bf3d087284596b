;; A memory-I/O provider: the host protocol of shopify_functions_javy_v3/v4 and
;; shopify_function_v2 (function-runner's src/io.rs), with an echo API for a guest to drive.
;;
;; Host side: it imports nothing. `initialize(len) -> ptr` resets it and returns where the host
;; writes `len` bytes of MessagePack input; `finalize() -> ptr` returns the address of six
;; little-endian u32: output ptr, output len, log ptr 1, log len 1, log ptr 2, log len 2.
;;
;; Guest side: `input_ptr`, `input_len`, `alloc(n) -> ptr` (bump allocation in this memory),
;; `set_output(ptr, len)` and `log(ptr, len)` (appends to a 1 KiB log buffer, keeping what fits:
;; the first segment is the buffer, the second is empty).
;;
;; Layout: 0x100 the results block, 0x400 the log buffer (1 KiB), 0x1000 on the heap.
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x1000))
  (global $in_ptr (mut i32) (i32.const 0))
  (global $in_len (mut i32) (i32.const 0))
  (global $out_ptr (mut i32) (i32.const 0))
  (global $out_len (mut i32) (i32.const 0))
  (global $log_len (mut i32) (i32.const 0))

  (func $alloc (export "alloc") (param $size i32) (result i32)
    (local $p i32) (local $pages i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $size)))
    (local.set $pages
      (i32.sub (i32.shr_u (i32.add (global.get $heap) (i32.const 0xFFFF)) (i32.const 16)) (memory.size)))
    (if (i32.gt_s (local.get $pages) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get $pages)) (i32.const -1)) (then unreachable))))
    (local.get $p))

  (func (export "initialize") (param $len i32) (result i32)
    (global.set $heap (i32.const 0x1000))
    (global.set $out_ptr (i32.const 0))
    (global.set $out_len (i32.const 0))
    (global.set $log_len (i32.const 0))
    (global.set $in_len (local.get $len))
    (global.set $in_ptr (call $alloc (local.get $len)))
    (global.get $in_ptr))

  (func (export "input_ptr") (result i32) (global.get $in_ptr))
  (func (export "input_len") (result i32) (global.get $in_len))

  (func (export "set_output") (param $ptr i32) (param $len i32)
    (global.set $out_ptr (local.get $ptr))
    (global.set $out_len (local.get $len)))

  (func (export "log") (param $ptr i32) (param $len i32)
    (local $room i32)
    (local.set $room (i32.sub (i32.const 1024) (global.get $log_len)))
    (if (i32.gt_u (local.get $len) (local.get $room)) (then (local.set $len (local.get $room))))
    (memory.copy (i32.add (i32.const 0x400) (global.get $log_len)) (local.get $ptr) (local.get $len))
    (global.set $log_len (i32.add (global.get $log_len) (local.get $len))))

  (func (export "finalize") (result i32)
    (i32.store (i32.const 0x100) (global.get $out_ptr))
    (i32.store (i32.const 0x104) (global.get $out_len))
    (i32.store (i32.const 0x108) (i32.const 0x400))
    (i32.store (i32.const 0x10C) (global.get $log_len))
    (i32.store (i32.const 0x110) (i32.const 0))
    (i32.store (i32.const 0x114) (i32.const 0))
    (i32.const 0x100))
)
