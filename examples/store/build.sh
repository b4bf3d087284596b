#!/usr/bin/env bash
# Rebuilds the buyer-journey example's two scripts (README "Script data and sessions") from C.
# The .wasm files are committed: deploying and the tests need no compiler. Requirements as for
# examples/build.sh: clang + lld with the wasm32 target, wasi-libc, the wasm32 compiler-rt builtins.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
CLANG="${CLANG:-clang}"
SYSROOT_FLAGS=()
if [[ -n "${WASI_SYSROOT:-}" ]]; then SYSROOT_FLAGS=(--sysroot="$WASI_SYSROOT"); fi
CFLAGS=(--target=wasm32-wasi "${SYSROOT_FLAGS[@]}" -O2 -std=c11 -Wall -Wextra
        -Wl,--strip-all -Wl,-z,stack-size=65536)
for step in product_view checkout_upsell; do
    echo "+ $CLANG ${CFLAGS[*]} -o $step/$step.wasm $step/$step.c ../common/json.c"
    "$CLANG" "${CFLAGS[@]}" -o "$step/$step.wasm" "$step/$step.c" ../common/json.c
    echo "  -> $step/$step.wasm ($(wc -c <"$step/$step.wasm") bytes)"
done
