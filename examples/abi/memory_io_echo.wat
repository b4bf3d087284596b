;; The guest of memory_io_provider.wat, shaped like a Javy dynamic module: it imports the
;; provider's memory (memory 0) and functions, keeps its own data in a memory of its own
;; (memory 1), and echoes its input as its output. It logs "echo\n" and, if the input's first
;; byte is 0x80 (an empty MessagePack map), "empty\n" too.
(module
  (import "PROVIDER" "memory" (memory $provider 1))
  (import "PROVIDER" "input_ptr" (func $input_ptr (result i32)))
  (import "PROVIDER" "input_len" (func $input_len (result i32)))
  (import "PROVIDER" "alloc" (func $alloc (param i32) (result i32)))
  (import "PROVIDER" "set_output" (func $set_output (param i32 i32)))
  (import "PROVIDER" "log" (func $log (param i32 i32)))
  (memory $own 1)
  (data (memory $own) (i32.const 0) "echo\nempty\n")

  (func $say (param $at i32) (param $len i32) (local $p i32)
    (local.set $p (call $alloc (local.get $len)))
    (memory.copy $provider $own (local.get $p) (local.get $at) (local.get $len))
    (call $log (local.get $p) (local.get $len)))

  (func (export "_start")
    (call $set_output (call $input_ptr) (call $input_len))
    (call $say (i32.const 0) (i32.const 5))
    (if (i32.eq (i32.load8_u $provider (call $input_ptr)) (i32.const 0x80))
      (then (call $say (i32.const 5) (i32.const 6)))))
)
