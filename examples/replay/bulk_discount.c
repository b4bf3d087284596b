/*
 * Example for the replay walk-through (README, "When a script fails"): a bulk discount with a
 * bug, and its fix.
 *
 * stdin : {"cart":{"lines":[{"id":..., "quantity":N}, ...]},
 *          "discountConfiguration":{"percentage":10.0,"minimumQuantity":5}}
 * stdout: {"discountApplicationStrategy":"FIRST","discounts":[...]}
 *
 * Lines with quantity >= minimumQuantity get `percentage` % off, and the message says how many
 * items such a line has on average. The bug: with no qualifying line, that average divides by
 * zero, and the module traps (runtime_error, trap_code integer_division_by_zero). Built with
 * -DFIXED it checks first and answers "discounts":[].
 */
#include <stdlib.h>

#include "../common/json.h"

#define MAX_INPUT (1024u * 1024u)

static int fail(const char *what)
{
    log_printf("error: %s", what);
    return 1;
}

/* Not inlined into a constant: the division happens at run time, as the bug needs. */
__attribute__((noinline)) static long long average(long long total, long long count)
{
    return total / count;
}

int main(void)
{
    size_t in_len, idx = 0;
    char *in = read_all_stdin(&in_len, MAX_INPUT);
    json_value *root;
    json_error jerr;
    const json_value *cart, *lines, *cfg, *pct_v, *line;
    long long min_qty = 5, qualifying = 0, items = 0;
    double pct;
    strbuf targets, out;

    if (!in)
        return fail("could not read stdin");
    root = json_parse(in, in_len, &jerr);
    free(in);
    if (!root || root->type != JSON_OBJECT)
        return fail("input must be a JSON object");
    cart = json_get_type(root, "cart", JSON_OBJECT);
    lines = cart ? json_get_type(cart, "lines", JSON_ARRAY) : NULL;
    cfg = json_get_type(root, "discountConfiguration", JSON_OBJECT);
    if (!lines || !cfg)
        return fail("needs cart.lines and discountConfiguration");
    pct_v = json_get_type(cfg, "percentage", JSON_NUMBER);
    if (!pct_v || !(pct_v->number >= 0.0 && pct_v->number <= 100.0))
        return fail("discountConfiguration.percentage must be a number in [0, 100]");
    pct = pct_v->number;
    if (json_get(cfg, "minimumQuantity") && !json_as_int(json_get(cfg, "minimumQuantity"), &min_qty))
        return fail("discountConfiguration.minimumQuantity must be an integer");

    sb_init(&targets);
    for (line = lines->child; line; line = line->next, idx++) {
        const json_value *id = json_get_type(line, "id", JSON_STRING);
        long long qty;

        if (!id || !json_as_int(json_get(line, "quantity"), &qty)) {
            log_printf("error: cart.lines[%zu] needs an id and an integer quantity", idx);
            return 1;
        }
        if (qty < min_qty)
            continue;
        if (qualifying++)
            sb_puts(&targets, ",");
        items += qty;
        sb_puts(&targets, "{\"cartLine\":{\"id\":");
        sb_append_json_string(&targets, id->str, id->str_len);
        sb_puts(&targets, "}}");
    }
    log_printf("qualifying lines: %lld of %zu", qualifying, lines->count);

    sb_init(&out);
    sb_puts(&out, "{\"discountApplicationStrategy\":\"FIRST\",\"discounts\":[");
#ifdef FIXED
    if (qualifying > 0 && pct > 0.0) {
#else
    if (pct > 0.0) {
#endif
        sb_puts(&out, "{\"targets\":[");
        sb_append(&out, targets.buf, targets.len);
        sb_puts(&out, "],\"value\":{\"percentage\":{\"value\":\"");
        sb_append_decimal(&out, pct, 1);
        sb_puts(&out, "\"}},\"message\":\"");
        sb_append_decimal(&out, pct, 0);
        sb_puts(&out, "% off bulk lines (");
        sb_append_int(&out, average(items, qualifying));
        sb_puts(&out, " items each on average)\"}");
    }
    sb_puts(&out, "]}\n");
    if (targets.oom || out.oom || write_all(1, out.buf, out.len) != 0)
        return fail("could not write the output");
    return 0;
}
