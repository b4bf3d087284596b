/*
 * The second step of the buyer journey (examples/store): the `checkout-upsell` EP's script. Its
 * input query (run.graphql) selects the cart's product ids and what the first step recorded in
 * the buyer's session, `viewed: store(scope: SESSION, key: "viewed")`, which the worker resolves
 * from the data it holds. A product viewed and not in the cart is offered:
 *   {"upsell": {"productId": "...", "title": "...", "message": "Still thinking about ...?"}}
 * else {"upsell": null} (no session, nothing viewed, or already in the cart).
 */
#include <stdlib.h>
#include <string.h>

#include "../../common/json.h"

static int in_cart(const json_value *lines, const json_value *id) {
    for (const json_value *line = lines ? lines->child : NULL; line; line = line->next) {
        const json_value *pid = json_get_type(line, "productId", JSON_STRING);
        if (pid && pid->str_len == id->str_len && memcmp(pid->str, id->str, id->str_len) == 0) return 1;
    }
    return 0;
}

int main(void) {
    size_t len = 0;
    char *text = read_all_stdin(&len, 64 * 1024);
    if (!text) return 2;
    json_error err;
    json_value *doc = json_parse(text, len, &err);
    if (!doc) return 3;
    const json_value *lines = json_get_type(json_get(doc, "cart"), "lines", JSON_ARRAY);
    const json_value *viewed = json_get_type(doc, "viewed", JSON_OBJECT);
    const json_value *id = json_get_type(viewed, "id", JSON_STRING);
    const json_value *title = json_get_type(viewed, "title", JSON_STRING);
    strbuf out;
    sb_init(&out);
    if (!id || !title || in_cart(lines, id)) {
        sb_puts(&out, "{\"upsell\":null}");
    } else {
        sb_puts(&out, "{\"upsell\":{\"productId\":");
        sb_append_json_string(&out, id->str, id->str_len);
        sb_puts(&out, ",\"title\":");
        sb_append_json_string(&out, title->str, title->str_len);
        sb_puts(&out, ",\"message\":");
        strbuf message;
        sb_init(&message);
        sb_puts(&message, "Still thinking about ");
        sb_append(&message, title->str, title->str_len);
        sb_puts(&message, "?");
        sb_append_json_string(&out, message.buf ? message.buf : "", message.len);
        out.oom |= message.oom;
        sb_free(&message);
        sb_puts(&out, "}}");
    }
    int failed = out.oom || write_all(1, out.buf, out.len);
    sb_free(&out);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}
