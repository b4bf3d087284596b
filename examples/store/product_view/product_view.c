/*
 * The first step of the buyer journey (examples/store, README "Script data and sessions"): the
 * `product-view` EP's script. Its input query (run.graphql) selects the viewed product; it
 * records it in the buyer's SESSION by returning a write beside its output:
 *   {"recorded": true, "storeWrites": [{"scope": "SESSION", "key": "viewed",
 *                                        "value": {"id": "...", "title": "..."}}]}
 * The worker takes `storeWrites` out of the output (the host sees {"recorded": true}) and writes
 * the value after the reply. No new import: the write is part of the script's output.
 */
#include <stdlib.h>

#include "../../common/json.h"

int main(void) {
    size_t len = 0;
    char *text = read_all_stdin(&len, 64 * 1024);
    if (!text) return 2;
    json_error err;
    json_value *doc = json_parse(text, len, &err);
    if (!doc) return 3;
    const json_value *product = json_get_type(doc, "product", JSON_OBJECT);
    const json_value *id = json_get_type(product, "id", JSON_STRING);
    const json_value *title = json_get_type(product, "title", JSON_STRING);
    strbuf out;
    sb_init(&out);
    if (!id || !title) {
        sb_puts(&out, "{\"recorded\":false}");  /* nothing to record: no write */
    } else {
        sb_puts(&out, "{\"recorded\":true,\"storeWrites\":[{\"scope\":\"SESSION\",\"key\":\"viewed\",\"value\":{\"id\":");
        sb_append_json_string(&out, id->str, id->str_len);
        sb_puts(&out, ",\"title\":");
        sb_append_json_string(&out, title->str, title->str_len);
        sb_puts(&out, "}}]}");
    }
    int failed = out.oom || write_all(1, out.buf, out.len);
    sb_free(&out);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}
