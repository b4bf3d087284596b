#!/usr/bin/env bash
# Rebuilds every example guest module (.wasm) from source.
#
# Requirements: clang + lld with the wasm32 target, wasi-libc and the wasm32
# compiler-rt builtins (Debian: clang lld wasi-libc libclang-rt-<ver>-dev-wasm32).
#
# Environment overrides:
#   CLANG=/path/to/clang          compiler to use (default: clang)
#   WASI_SYSROOT=/path/to/sysroot  wasi-libc sysroot (default: auto-detect)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

die() { echo "build.sh: error: $*" >&2; exit 1; }

CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null 2>&1 \
    || die "'$CLANG' not found; install clang + lld (e.g. apt-get install clang lld) or set CLANG="

# Locate wasi-libc. Either an upstream-style sysroot (include/ + lib/wasm32-wasi)
# or Debian's multiarch layout (/usr/include/wasm32-wasi, /usr/lib/wasm32-wasi),
# which Debian's clang finds without --sysroot.
SYSROOT_FLAGS=()
if [[ -n "${WASI_SYSROOT:-}" ]]; then
    [[ -d "$WASI_SYSROOT" ]] || die "WASI_SYSROOT='$WASI_SYSROOT' does not exist"
    SYSROOT_FLAGS=(--sysroot="$WASI_SYSROOT")
elif [[ -f /usr/share/wasi-sysroot/include/stdio.h || -f /usr/share/wasi-sysroot/include/wasm32-wasi/stdio.h ]]; then
    SYSROOT_FLAGS=(--sysroot=/usr/share/wasi-sysroot)
elif [[ -f /usr/include/wasm32-wasi/stdio.h && -f /usr/lib/wasm32-wasi/libc.a ]]; then
    SYSROOT_FLAGS=()   # Debian multiarch layout, found by clang's default search
else
    die "wasi-libc sysroot not found (looked in \$WASI_SYSROOT, /usr/share/wasi-sysroot, /usr/include/wasm32-wasi); install wasi-libc or set WASI_SYSROOT="
fi

RT="$("$CLANG" --target=wasm32-wasi -print-libgcc-file-name 2>/dev/null || true)"
[[ -n "$RT" && -f "$RT" ]] \
    || die "wasm32 compiler-rt builtins not found ('${RT:-?}'); install libclang-rt-<ver>-dev-wasm32"

CFLAGS=(--target=wasm32-wasi "${SYSROOT_FLAGS[@]}" -O2 -std=c11 -Wall -Wextra
        -Wl,--strip-all -Wl,-z,stack-size=65536)

build() {
    local out="$1"; shift
    echo "+ $CLANG ${CFLAGS[*]} -o $out $*"
    "$CLANG" "${CFLAGS[@]}" -o "$out" "$@"
    echo "  -> $out ($(wc -c <"$out") bytes)"
}

build discount/discount.wasm               discount/discount.c               common/json.c
build cart_validation/cart_validation.wasm cart_validation/cart_validation.c common/json.c
build hostile/memory_bomb.wasm             hostile/memory_bomb.c
build chain/step_a.wasm                    chain/chain_step.c                common/json.c -DSTEP='"a"' -DADD=1
build chain/step_b.wasm                    chain/chain_step.c                common/json.c -DSTEP='"b"' -DADD=10
build reducer/best_per_target.wasm         reducer/best_per_target.c         common/json.c
build chain/step_c.wasm                    chain/chain_step.c                common/json.c -DSTEP='"c"' -DADD=100
# Rollout candidates (README "Verified rollouts"): the discount script built for size (other
# bytes, the same behaviour), and with an off-by-one bug.
CFLAGS_V2=("${CFLAGS[@]/-O2/-Os}")
echo "+ $CLANG ${CFLAGS_V2[*]} -o rollout/discount_v2.wasm discount/discount.c common/json.c"
"$CLANG" "${CFLAGS_V2[@]}" -o rollout/discount_v2.wasm discount/discount.c common/json.c
build rollout/discount_off_by_one.wasm     discount/discount.c               common/json.c -DOFF_BY_ONE
build replay/bulk_discount.wasm            replay/bulk_discount.c            common/json.c
build replay/bulk_discount_fixed.wasm      replay/bulk_discount.c            common/json.c -DFIXED
