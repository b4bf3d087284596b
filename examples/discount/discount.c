/*
 * Example discount script (Shopify Functions ABI, WASI preview 1 command).
 *
 * stdin : {"cart":{"lines":[{"id":..., "quantity":N, ...}, ...]},
 *          "discountConfiguration":{"percentage":10.0,"minimumQuantity":2}}
 * stdout: {"discountApplicationStrategy":"FIRST","discounts":[...]}
 *
 * Every cart line with quantity >= minimumQuantity gets `percentage` % off;
 * all qualifying lines are targets of a single discount entry. No qualifying
 * lines (or percentage == 0) -> "discounts":[].
 *
 * Errors (invalid JSON, missing/ill-typed cart, lines or configuration) are
 * reported on stderr and the program exits with status 1.
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
    const json_value *cart, *lines, *cfg, *pct_v, *minq_v, *line;
    double pct;
    long long min_qty = 1;
    long long qualifying = 0;
    size_t idx = 0;
    strbuf targets, out;

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

    cfg = json_get_type(root, "discountConfiguration", JSON_OBJECT);
    if (!cfg)
        return fail("missing or invalid \"discountConfiguration\" object");
    pct_v = json_get_type(cfg, "percentage", JSON_NUMBER);
    if (!pct_v || !(pct_v->number >= 0.0 && pct_v->number <= 100.0))
        return fail("\"discountConfiguration.percentage\" must be a number in [0, 100]");
    pct = pct_v->number;
    minq_v = json_get(cfg, "minimumQuantity");
    if (minq_v && !json_as_int(minq_v, &min_qty))
        return fail("\"discountConfiguration.minimumQuantity\" must be an integer");

    sb_init(&targets);
    for (line = lines->child; line; line = line->next, idx++) {
        const json_value *id;
        long long qty;

        if (line->type != JSON_OBJECT) {
            log_printf("error: cart.lines[%zu] is not an object", idx);
            return 1;
        }
        id = json_get_type(line, "id", JSON_STRING);
        if (!id) {
            log_printf("error: cart.lines[%zu].id missing or not a string", idx);
            return 1;
        }
        if (!json_as_int(json_get(line, "quantity"), &qty)) {
            log_printf("error: cart.lines[%zu].quantity missing or not an integer", idx);
            return 1;
        }
#ifdef OFF_BY_ONE
        /* The rollout example's bad "refactor" (examples/rollout): a line with exactly the
         * minimum quantity no longer qualifies, which only some carts show. */
        if (qty <= min_qty)
            continue;
#else
        if (qty < min_qty)
            continue;
#endif

        if (qualifying++)
            sb_puts(&targets, ",");
        sb_puts(&targets, "{\"cartLine\":{\"id\":");
        sb_append_json_string(&targets, id->str, id->str_len);
        sb_puts(&targets, "}}");
    }

    sb_init(&out);
    sb_puts(&out, "{\"discountApplicationStrategy\":\"FIRST\",\"discounts\":[");
    if (qualifying > 0 && pct > 0.0) {
        sb_puts(&out, "{\"targets\":[");
        sb_append(&out, targets.buf, targets.len);
        sb_puts(&out, "],\"value\":{\"percentage\":{\"value\":\"");
        sb_append_decimal(&out, pct, 1);
        sb_puts(&out, "\"}},\"message\":\"");
        sb_append_decimal(&out, pct, 0);
        sb_puts(&out, "% off ");
        sb_append_int(&out, min_qty);
        sb_puts(&out, "+ items\"}");
    }
    sb_puts(&out, "]}\n");

    if (targets.oom || out.oom)
        return fail("out of memory while building output");
    if (write_all(1, out.buf, out.len) != 0)
        return fail("could not write stdout");

    log_printf("qualifying lines: %lld of %zu (percentage %g, minimumQuantity %lld)",
               qualifying, lines->count, pct, min_qty);

    sb_free(&targets);
    sb_free(&out);
    json_free(root);
    return 0;
}
