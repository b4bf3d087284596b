;; A Wasm API guest as a Rust or C build emits it, before any trampoline: every function of
;; the API imported from `shopify_function_v2` under its guest-facing name, and one memory of
;; its own (memory 0, exported). The sandbox links it itself: numeric functions straight to the
;; provider, string functions through its glue module.
(module
  (import "shopify_function_v2" "shopify_function_input_get" (func $input_get (result i64)))
  (import "shopify_function_v2" "shopify_function_input_get_val_len" (func $val_len (param i64) (result i32)))
  (import "shopify_function_v2" "shopify_function_input_get_at_index" (func $at_index (param i64 i32) (result i64)))
  (import "shopify_function_v2" "shopify_function_input_get_interned_obj_prop" (func $interned_prop (param i64 i32) (result i64)))
  (import "shopify_function_v2" "shopify_function_input_get_obj_prop" (func $get_obj_prop (param i64 i32 i32) (result i64)))
  (import "shopify_function_v2" "shopify_function_input_read_utf8_str" (func $read_utf8_str (param i32 i32 i32)))
  (import "shopify_function_v2" "shopify_function_output_new_object" (func $new_object (param i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_finish_object" (func $finish_object (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_array" (func $new_array (param i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_finish_array" (func $finish_array (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_i32" (func $new_i32 (param i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_f64" (func $new_f64 (param f64) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_bool" (func $new_bool (param i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_utf8_str" (func $new_str (param i32 i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_output_new_interned_utf8_str" (func $new_interned (param i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_intern_utf8_str" (func $intern (param i32 i32) (result i32)))
  (import "shopify_function_v2" "shopify_function_log_new_utf8_str" (func $log (param i32 i32)))
  (memory $guest (export "memory") 1)
  (data (i32.const 0) "hello\00\00\00n\00\00\00arr\00bye\00n2\00\00len\00\00\00\00\00nums")

  ;; ---- the user code (the same in both guests) --------------------------------------------
  ;; input {"hello": <string>, "n": <number>, "arr": [<numbers>]} gives
  ;; {"bye": hello, "n2": n * 2, "len": len(arr), "nums": arr as i32s, "arr": true},
  ;; and logs 1025 x "a" then 10 x "b" (the pattern of function-runner's wasm_api_v2 fixture).
  (func $check (param i32) (if (local.get 0) (then unreachable)))
  (func $len_of (param $v i64) (result i32) (local $len i32)
    ;; the length lives in bits 32..45 and saturates: ask the provider past 16383
    (local.set $len (i32.wrap_i64 (i64.and (i64.shr_u (local.get $v) (i64.const 32)) (i64.const 0x3FFF))))
    (if (result i32) (i32.eq (local.get $len) (i32.const 0x3FFF))
      (then (call $val_len (local.get $v)))
      (else (local.get $len))))
  (func (export "_start")
    (local $root i64) (local $hello i64) (local $n i64) (local $arr i64) (local $len i32)
    (local $i i32) (local $id i32) (local $count i32)
    (local.set $root (call $input_get))
    (local.set $hello (call $get_obj_prop (local.get $root) (i32.const 0) (i32.const 5)))    ;; "hello"
    (local.set $len (call $len_of (local.get $hello)))
    (call $read_utf8_str (i32.wrap_i64 (local.get $hello)) (i32.const 0x4000) (local.get $len))
    (local.set $n (call $get_obj_prop (local.get $root) (i32.const 8) (i32.const 1)))        ;; "n"
    (local.set $id (call $intern (i32.const 12) (i32.const 3)))                               ;; "arr"
    (local.set $arr (call $interned_prop (local.get $root) (local.get $id)))
    (local.set $count (call $val_len (local.get $arr)))

    (call $check (call $new_object (i32.const 5)))
    (call $check (call $new_str (i32.const 16) (i32.const 3)))                                ;; "bye"
    (call $check (call $new_str (i32.const 0x4000) (local.get $len)))
    (call $check (call $new_str (i32.const 20) (i32.const 2)))                                ;; "n2"
    (call $check (call $new_f64 (f64.mul (f64.reinterpret_i64 (local.get $n)) (f64.const 2))))
    (call $check (call $new_str (i32.const 24) (i32.const 3)))                                ;; "len"
    (call $check (call $new_i32 (local.get $count)))
    (call $check (call $new_str (i32.const 32) (i32.const 4)))                                ;; "nums"
    (call $check (call $new_array (local.get $count)))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
      (call $check (call $new_i32 (i32.trunc_f64_s
        (f64.reinterpret_i64 (call $at_index (local.get $arr) (local.get $i))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (call $check (call $finish_array))
    (call $check (call $new_interned (local.get $id)))                                        ;; "arr"
    (call $check (call $new_bool (i32.const 1)))
    (call $check (call $finish_object))
    ;; a write after the value is complete fails (ValueAlreadyWritten, 4) and copies nothing
    (if (i32.ne (call $new_str (i32.const 16) (i32.const 3)) (i32.const 4)) (then unreachable))
    (memory.fill $guest (i32.const 0x1000) (i32.const 97) (i32.const 1025))
    (call $log (i32.const 0x1000) (i32.const 1025))
    (memory.fill $guest (i32.const 0x2000) (i32.const 98) (i32.const 10))
    (call $log (i32.const 0x2000) (i32.const 10)))
)
