;; A Wasm API guest in the shape Shopify's build gives it after its trampoline (v2): the
;; numeric functions imported from the provider under their `_shopify_function_*` names, the
;; provider's memory imported as memory 0, the guest's own memory as memory 1 (exported as
;; `memory`), and the string functions as glue inside the guest that copies across the two.
;; The glue here is the trampoline's, quirk included: output_new_utf8_str copies whatever the
;; status, so a failed write copies into provider address 0.
(module
  (import "shopify_function_v2" "_shopify_function_input_get" (func $input_get (result i64)))
  (import "shopify_function_v2" "_shopify_function_input_get_val_len" (func $val_len (param i64) (result i32)))
  (import "shopify_function_v2" "_shopify_function_input_get_at_index" (func $at_index (param i64 i32) (result i64)))
  (import "shopify_function_v2" "_shopify_function_input_get_interned_obj_prop" (func $interned_prop (param i64 i32) (result i64)))
  (import "shopify_function_v2" "_shopify_function_output_new_object" (func $new_object (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_finish_object" (func $finish_object (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_array" (func $new_array (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_finish_array" (func $finish_array (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_i32" (func $new_i32 (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_f64" (func $new_f64 (param f64) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_bool" (func $new_bool (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_interned_utf8_str" (func $new_interned (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_input_get_utf8_str_addr" (func $p_str_addr (param i32) (result i32)))
  (import "shopify_function_v2" "memory" (memory $provider 1))
  (import "shopify_function_v2" "_shopify_function_input_get_obj_prop" (func $p_get_obj_prop (param i64 i32 i32) (result i64)))
  (import "shopify_function_v2" "_shopify_function_alloc" (func $p_alloc (param i32) (result i32)))
  (import "shopify_function_v2" "_shopify_function_output_new_utf8_str" (func $p_new_str (param i32) (result i64)))
  (import "shopify_function_v2" "_shopify_function_intern_utf8_str" (func $p_intern (param i32) (result i64)))
  (import "shopify_function_v2" "_shopify_function_log_new_utf8_str" (func $p_log (param i32) (result i32)))
  (memory $guest 1)
  (export "memory" (memory $guest))
  (data (memory $guest) (i32.const 0) "hello\00\00\00n\00\00\00arr\00bye\00n2\00\00len\00\00\00\00\00nums")

  ;; ---- the trampoline's glue ----------------------------------------------------------------
  (func $to_provider (param i32 i32 i32) (memory.copy $provider $guest (local.get 0) (local.get 1) (local.get 2)))
  (func $to_guest (param i32 i32 i32) (memory.copy $guest $provider (local.get 0) (local.get 1) (local.get 2)))
  (func $get_obj_prop (param $scope i64) (param $ptr i32) (param $len i32) (result i64) (local $dst i32)
    (local.set $dst (call $p_alloc (local.get $len)))
    (call $to_provider (local.get $dst) (local.get $ptr) (local.get $len))
    (call $p_get_obj_prop (local.get $scope) (local.get $dst) (local.get $len)))
  (func $read_utf8_str (param $src i32) (param $out i32) (param $len i32)
    (call $to_guest (local.get $out) (call $p_str_addr (local.get $src)) (local.get $len)))
  (func $new_str (param $ptr i32) (param $len i32) (result i32) (local $r i64)
    (local.set $r (call $p_new_str (local.get $len)))
    (call $to_provider (i32.wrap_i64 (local.get $r)) (local.get $ptr) (local.get $len))
    (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 32))))
  (func $intern (param $ptr i32) (param $len i32) (result i32) (local $r i64)
    (local.set $r (call $p_intern (local.get $len)))
    (call $to_provider (i32.wrap_i64 (local.get $r)) (local.get $ptr) (local.get $len))
    (i32.wrap_i64 (i64.shr_u (local.get $r) (i64.const 32))))
  (func $log (param $ptr i32) (param $len i32) (local $ra i32) (local $l1 i32)
    (local.set $ra (call $p_log (local.get $len)))
    (local.set $ptr (i32.add (local.get $ptr) (i32.load $provider (local.get $ra))))
    (local.set $l1 (i32.load $provider offset=8 (local.get $ra)))
    (call $to_provider (i32.load $provider offset=4 (local.get $ra)) (local.get $ptr) (local.get $l1))
    (if (i32.ne (local.get $l1) (local.get $len))
      (then (call $to_provider (i32.load $provider offset=12 (local.get $ra))
                               (i32.add (local.get $ptr) (local.get $l1))
                               (i32.load $provider offset=16 (local.get $ra))))))

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
