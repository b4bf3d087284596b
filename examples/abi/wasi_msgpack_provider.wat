;; A MessagePack-over-WASI provider, shaped like shopify_functions_javy_v2: it imports WASI,
;; reads its MessagePack input on stdin and writes MessagePack on stdout, logging on stderr.
;;
;; Guest side: `read_input() -> len` reads all of stdin to `input_ptr()`, `write_output(ptr,
;; len)` writes to stdout, `log(ptr, len)` to stderr, `alloc(n) -> ptr` bump-allocates here.
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 0x1F000))

  (func (export "alloc") (param $size i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (local.get $p) (local.get $size)))
    (local.get $p))

  (func (export "input_ptr") (result i32) (i32.const 0x1000))

  ;; stdin to 0x1000, up to 60 KiB; returns the length read.
  (func (export "read_input") (result i32) (local $total i32) (local $n i32)
    (block $done (loop $more
      (i32.store (i32.const 0) (i32.add (i32.const 0x1000) (local.get $total)))
      (i32.store (i32.const 4) (i32.sub (i32.const 61440) (local.get $total)))
      (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $n (i32.load (i32.const 8)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $total (i32.add (local.get $total) (local.get $n)))
      (br $more)))
    (local.get $total))

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 16) (local.get $ptr))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24))))
  (func (export "write_output") (param i32 i32) (call $write (i32.const 1) (local.get 0) (local.get 1)))
  (func (export "log") (param i32 i32) (call $write (i32.const 2) (local.get 0) (local.get 1)))
)
