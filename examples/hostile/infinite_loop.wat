;; Hostile: never returns. Stopped by the instruction budget (instruction_limit_exceeded).
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
