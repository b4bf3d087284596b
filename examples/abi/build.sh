#!/usr/bin/env bash
# Rebuilds the C guest of examples/abi (the .wasm is committed, so tests need no compiler).
# Needs clang and lld with the wasm32 target (Debian: clang lld). No libc: the guest imports
# the Wasm API only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null 2>&1 || { echo "build.sh: '$CLANG' not found" >&2; exit 1; }
set -x
"$CLANG" --target=wasm32 -O2 -nostdlib -mbulk-memory -Wall -Wextra \
    -Wl,--no-entry -Wl,--export=_start -Wl,--strip-all -Wl,-z,stack-size=16384 \
    -o wasm_api_guest.wasm wasm_api_guest.c
