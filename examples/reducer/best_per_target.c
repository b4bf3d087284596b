/*
 * A Wasm reducer for a join of discount apps (`ep define discount --combine join --reducer wasm`,
 * deployed as the app named `reducer`). It reads
 *   {"outputs": [{"app": "...", "output": {"discounts": [{"target": "...", "value": N, ...}]}}]}
 * and keeps, for each target, only the discount with the largest value (the first on a tie),
 * in the order targets first appear: {"discounts": [{"target", "value"}...], "apps": [winner of each]}.
 * What no built-in reducer does: a buyer gets the best offer per line, not every offer.
 */
#include <stdlib.h>
#include <string.h>

#include "../common/json.h"

#define MAX_TARGETS 256

typedef struct {
    const json_value *target;
    const json_value *app;
    double value;
} best;

static int same(const json_value *a, const json_value *b) {
    return a->str_len == b->str_len && memcmp(a->str, b->str, a->str_len) == 0;
}

int main(void) {
    size_t len = 0;
    char *text = read_all_stdin(&len, 1024 * 1024);
    if (!text) return 2;
    json_error err;
    json_value *doc = json_parse(text, len, &err);
    if (!doc) return 3;
    best found[MAX_TARGETS];
    size_t count = 0;
    const json_value *outputs = json_get_type(doc, "outputs", JSON_ARRAY);
    for (const json_value *item = outputs ? outputs->child : NULL; item; item = item->next) {
        const json_value *app = json_get_type(item, "app", JSON_STRING);
        const json_value *discounts = json_get_type(json_get(item, "output"), "discounts", JSON_ARRAY);
        for (const json_value *d = discounts ? discounts->child : NULL; d; d = d->next) {
            const json_value *target = json_get_type(d, "target", JSON_STRING);
            const json_value *value = json_get_type(d, "value", JSON_NUMBER);
            if (!target || !value || !app) continue;
            size_t i = 0;
            while (i < count && !same(found[i].target, target)) i++;
            if (i == count) {
                if (count == MAX_TARGETS) continue;
                found[count++] = (best){target, app, value->number};
            } else if (value->number > found[i].value) {
                found[i] = (best){target, app, value->number};
            }
        }
    }
    strbuf out;
    sb_init(&out);
    sb_puts(&out, "{\"discounts\":[");
    for (size_t i = 0; i < count; i++) {
        sb_puts(&out, i ? ",{\"target\":" : "{\"target\":");
        sb_append_json_string(&out, found[i].target->str, found[i].target->str_len);
        sb_puts(&out, ",\"value\":");
        sb_append_decimal(&out, found[i].value, 0);
        sb_puts(&out, "}");
    }
    sb_puts(&out, "],\"apps\":[");
    for (size_t i = 0; i < count; i++) {
        if (i) sb_puts(&out, ",");
        sb_append_json_string(&out, found[i].app->str, found[i].app->str_len);
    }
    sb_puts(&out, "]}");
    log_printf("reduced %zu target(s)", count);
    int failed = out.oom || write_all(1, out.buf, out.len);
    sb_free(&out);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}
