;; The smallest useful script: ignores its input, logs a line and prints one JSON object.
;; Deploy the text directly, at an EP defined first:
;;   scriptpool ep define test && scriptpool deploy test 1 examples/wat/hello.wat
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"message\":\"hello from WAT\"}")
  (data (i32.const 128) "hello.wat ran\n")
  (func (export "_start")
    ;; iovec at 0: (ptr 64, len 28) -> stdout
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 28))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; iovec at 16: (ptr 128, len 14) -> stderr (logs)
    (i32.store (i32.const 16) (i32.const 128))
    (i32.store (i32.const 20) (i32.const 14))
    (drop (call $fd_write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))))
