;; The guest of wasi_msgpack_provider.wat, shaped like a Javy v2 module with a WIT export: it
;; exports `run` (the function to call) beside a `_start` that does nothing, and echoes its
;; MessagePack input. It logs "echo\n".
(module
  (import "PROVIDER" "memory" (memory $provider 1))
  (import "PROVIDER" "alloc" (func $alloc (param i32) (result i32)))
  (import "PROVIDER" "input_ptr" (func $input_ptr (result i32)))
  (import "PROVIDER" "read_input" (func $read_input (result i32)))
  (import "PROVIDER" "write_output" (func $write_output (param i32 i32)))
  (import "PROVIDER" "log" (func $log (param i32 i32)))
  (memory $own 1)
  (data (memory $own) (i32.const 0) "echo\n")
  (func (export "_start"))
  (func (export "run") (local $p i32)
    (call $write_output (call $input_ptr) (call $read_input))
    (local.set $p (call $alloc (i32.const 5)))
    (memory.copy $provider $own (local.get $p) (i32.const 0) (i32.const 5))
    (call $log (local.get $p) (i32.const 5)))
)
