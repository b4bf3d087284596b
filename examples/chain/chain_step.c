/*
 * One step of a chain extension point (`ep define ... --combine chain`): it reads
 * {"input": <the call's input>, "previous": <the previous step's output, or null>} and prints
 * the previous output with its own step added: {"steps": [..., STEP], "total": total + ADD}.
 * The first step starts from {"steps": [], "total": input.base} (base 0 if absent).
 *
 * Built three times with different STEP and ADD (examples/build.sh): step_a, step_b, step_c.
 */
#include <stdlib.h>
#include <string.h>

#include "../common/json.h"

#ifndef STEP
#define STEP "a"
#endif
#ifndef ADD
#define ADD 1
#endif

int main(void) {
    size_t len = 0;
    char *text = read_all_stdin(&len, 256 * 1024);
    if (!text) return 2;
    json_error err;
    json_value *doc = json_parse(text, len, &err);
    if (!doc) {
        log_printf("input is not JSON: %s at %zu", err.msg, err.offset);
        return 3;
    }
    const json_value *previous = json_get_type(doc, "previous", JSON_OBJECT);
    long long total = 0;
    strbuf out;
    sb_init(&out);
    sb_puts(&out, "{\"steps\":[");
    if (previous) {
        const json_value *steps = json_get_type(previous, "steps", JSON_ARRAY);
        for (const json_value *s = steps ? steps->child : NULL; s; s = s->next) {
            if (s->type != JSON_STRING) continue;
            sb_append_json_string(&out, s->str, s->str_len);
            sb_puts(&out, ",");
        }
        json_as_int(json_get(previous, "total"), &total);
    } else {
        json_as_int(json_get(json_get(doc, "input"), "base"), &total);
    }
    sb_append_json_string(&out, STEP, strlen(STEP));
    sb_puts(&out, "],\"total\":");
    sb_append_int(&out, total + ADD);
    sb_puts(&out, "}");
    log_printf("step %s: total %lld -> %lld", STEP, total, total + ADD);
    int failed = out.oom || write_all(1, out.buf, out.len);
    sb_free(&out);
    json_free(doc);
    free(text);
    return failed ? 1 : 0;
}
