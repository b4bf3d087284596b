;; A discount app for a join extension point (README, "Several apps at one extension point"):
;; it ignores its input and offers one order discount. Deploy the text directly:
;;   scriptpool deploy discount 1234 examples/apps/loyalty.wat --app loyalty
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"discountApplicationStrategy\":\"FIRST\",\"discounts\":[{\"message\":\"Loyalty: 5% off the order\",\"targets\":[{\"orderSubtotal\":{\"excludedVariantIds\":[]}}],\"value\":{\"percentage\":{\"value\":\"5.0\"}}}]}")
  (data (i32.const 1024) "loyalty.wat ran\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 188))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.const 12))
    (drop (call $fd_write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))))
