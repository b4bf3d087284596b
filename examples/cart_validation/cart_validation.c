/*
 * Example cart validation script (Shopify Functions ABI, WASI preview 1).
 *
 * stdin : {"cart":{"lines":[{"quantity":N,"merchandise":{"sku":"..."}}, ...]},
 *          "maxQuantityPerLine":5}
 * stdout: {"errors":[{"localizedMessage":"Not possible to order more than 5 of SKU",
 *                     "target":"cart"}, ...]}   (one per offending line)
 *         or {"errors":[]}
 *
 * Errors (invalid JSON, missing/ill-typed fields) are reported on stderr and
 * the program exits with status 1.
 */
#include <stdlib.h>

#include "../common/json.h"

#define MAX_INPUT (4u * 1024u * 1024u)

static int fail(const char *what)
{
    log_printf("error: %s", what);
    return 1;
}

int main(void)
{
    size_t in_len;
    char *in;
    json_value *root;
    json_error jerr;
    const json_value *cart, *lines, *line;
    long long max_qty;
    long long n_errors = 0;
    size_t idx = 0;
    strbuf out;

    in = read_all_stdin(&in_len, MAX_INPUT);
    if (!in)
        return fail("could not read stdin (I/O error, out of memory or input too large)");

    root = json_parse(in, in_len, &jerr);
    free(in);
    if (!root) {
        log_printf("error: invalid JSON input at byte %zu: %s", jerr.offset, jerr.msg);
        return 1;
    }
    if (root->type != JSON_OBJECT)
        return fail("input must be a JSON object");

    cart = json_get_type(root, "cart", JSON_OBJECT);
    if (!cart)
        return fail("missing or invalid \"cart\" object");
    lines = json_get_type(cart, "lines", JSON_ARRAY);
    if (!lines)
        return fail("missing or invalid \"cart.lines\" array");
    if (!json_as_int(json_get(root, "maxQuantityPerLine"), &max_qty) || max_qty < 0)
        return fail("\"maxQuantityPerLine\" must be a non-negative integer");

    sb_init(&out);
    sb_puts(&out, "{\"errors\":[");
    for (line = lines->child; line; line = line->next, idx++) {
        const json_value *sku;
        long long qty;

        if (line->type != JSON_OBJECT) {
            log_printf("error: cart.lines[%zu] is not an object", idx);
            return 1;
        }
        if (!json_as_int(json_get(line, "quantity"), &qty)) {
            log_printf("error: cart.lines[%zu].quantity missing or not an integer", idx);
            return 1;
        }
        if (qty <= max_qty)
            continue;

        /* sku may legitimately be null/absent (e.g. custom products). */
        sku = json_get_type(json_get(line, "merchandise"), "sku", JSON_STRING);

        if (n_errors++)
            sb_puts(&out, ",");
        {
            strbuf msg;
            sb_init(&msg);
            sb_puts(&msg, "Not possible to order more than ");
            sb_append_int(&msg, max_qty);
            sb_puts(&msg, " of ");
            if (sku)
                sb_append(&msg, sku->str, sku->str_len);
            else
                sb_puts(&msg, "this item");
            if (msg.oom)
                return fail("out of memory while building output");
            sb_puts(&out, "{\"localizedMessage\":");
            sb_append_json_string(&out, msg.buf, msg.len);
            sb_puts(&out, ",\"target\":\"cart\"}");
            sb_free(&msg);
        }
    }
    sb_puts(&out, "]}\n");

    if (out.oom)
        return fail("out of memory while building output");
    if (write_all(1, out.buf, out.len) != 0)
        return fail("could not write stdout");

    log_printf("lines checked: %zu, errors: %lld (maxQuantityPerLine %lld)",
               lines->count, n_errors, max_qty);

    sb_free(&out);
    json_free(root);
    return 0;
}
