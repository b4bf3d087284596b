/*
 * An untrampolined Wasm API guest in C, as a clang build for wasm32 emits it: the API imported
 * from shopify_function_v2 under its guest-facing names, and one memory of its own (exported,
 * with a shadow stack and data segments). No WASI: memory-I/O modules may not import it.
 *
 * Input  {"cart": {"lines": [{"title": <string>, "quantity": <number>}, ...]}}
 * Output {"titles": [<title>, ...], "total_quantity": <number>, "note": <string>}
 * Logs   "lines: <count>\n"
 *
 * Rebuild with examples/abi/build.sh (needs clang and lld; the .wasm is committed).
 */
#include <stdint.h>

typedef int64_t Val;

#define API(name) __attribute__((import_module("shopify_function_v2"), import_name("shopify_function_" #name)))

API(input_get) Val input_get(void);
API(input_get_obj_prop) Val input_get_obj_prop(Val scope, const char *ptr, uint32_t len);
API(input_get_interned_obj_prop) Val input_get_interned_obj_prop(Val scope, uint32_t id);
API(input_get_at_index) Val input_get_at_index(Val scope, uint32_t index);
API(input_get_val_len) uint32_t input_get_val_len(Val scope);
API(input_read_utf8_str) void input_read_utf8_str(uint32_t src, char *out, uint32_t len);
API(intern_utf8_str) uint32_t intern_utf8_str(const char *ptr, uint32_t len);
API(output_new_object) int32_t output_new_object(uint32_t len);
API(output_finish_object) int32_t output_finish_object(void);
API(output_new_array) int32_t output_new_array(uint32_t len);
API(output_finish_array) int32_t output_finish_array(void);
API(output_new_utf8_str) int32_t output_new_utf8_str(const char *ptr, uint32_t len);
API(output_new_interned_utf8_str) int32_t output_new_interned_utf8_str(uint32_t id);
API(output_new_f64) int32_t output_new_f64(double value);
API(log_new_utf8_str) void log_new_utf8_str(const char *ptr, uint32_t len);

#define LEN(s) (sizeof(s) - 1)
#define CHECK(call) do { if ((call) != 0) __builtin_trap(); } while (0)

static uint32_t val_len(Val v) {
    uint32_t len = (uint32_t)((v >> 32) & 0x3FFF); /* saturates at 16383: then ask */
    return len == 0x3FFF ? input_get_val_len(v) : len;
}

static double number(Val v) {
    union { Val bits; double value; } u = {v};
    return u.value;
}

static char buffer[32768];

static uint32_t itoa(uint32_t value, char *out) {
    char digits[10];
    uint32_t n = 0, i = 0;
    do { digits[n++] = (char)('0' + value % 10); value /= 10; } while (value);
    while (n) out[i++] = digits[--n];
    return i;
}

void _start(void) {
    static const char note[] = "built with clang";
    Val lines = input_get_obj_prop(input_get_obj_prop(input_get(), "cart", LEN("cart")), "lines", LEN("lines"));
    uint32_t count = val_len(lines);
    uint32_t title = intern_utf8_str("title", LEN("title"));
    double total = 0;

    CHECK(output_new_object(3));
    CHECK(output_new_utf8_str("titles", LEN("titles")));
    CHECK(output_new_array(count));
    for (uint32_t i = 0; i < count; i++) {
        Val line = input_get_at_index(lines, i);
        Val name = input_get_interned_obj_prop(line, title);
        uint32_t len = val_len(name);
        if (len > sizeof buffer) __builtin_trap();
        input_read_utf8_str((uint32_t)name, buffer, len);
        CHECK(output_new_utf8_str(buffer, len));
        total += number(input_get_obj_prop(line, "quantity", LEN("quantity")));
    }
    CHECK(output_finish_array());
    CHECK(output_new_utf8_str("total_quantity", LEN("total_quantity")));
    CHECK(output_new_f64(total));
    CHECK(output_new_utf8_str("note", LEN("note")));
    CHECK(output_new_utf8_str(note, LEN(note)));
    CHECK(output_finish_object());

    uint32_t n = 0;
    static const char prefix[] = "lines: ";
    for (uint32_t i = 0; i < LEN(prefix); i++) buffer[n++] = prefix[i];
    n += itoa(count, buffer + n);
    buffer[n++] = '\n';
    log_new_utf8_str(buffer, n);
}
