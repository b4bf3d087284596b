;; A discount app for a join extension point (README, "Several apps at one extension point"):
;; it ignores its input and offers one order discount. Deploy the text directly:
;;   scriptpool deploy discount 1234 examples/apps/volume.wat --app volume
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"discountApplicationStrategy\":\"FIRST\",\"discounts\":[{\"message\":\"Volume: 15% off the order\",\"targets\":[{\"orderSubtotal\":{\"excludedVariantIds\":[]}}],\"value\":{\"percentage\":{\"value\":\"15.0\"}}}]}")
  (data (i32.const 1024) "volume.wat ran\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 189))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.const 11))
    (drop (call $fd_write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))))
