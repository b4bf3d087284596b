/*
 * Minimal, defensive JSON parser + output string builder for WASI guest
 * scripts (Shopify Functions-style ABI: JSON on stdin, JSON on stdout).
 *
 * - Recursive descent, nesting depth bounded by JSON_MAX_DEPTH.
 * - Never reads outside [text, text + len); the input need not be
 *   NUL-terminated.
 * - Strings are validated (UTF-8, no raw control characters) and decoded,
 *   including \uXXXX escapes and surrogate pairs (lone surrogates are an
 *   error). Decoded strings are NUL-terminated but may contain embedded NULs,
 *   so always use the stored length.
 * - Numbers follow the strict RFC 8259 grammar; non-finite results are an
 *   error.
 * - Duplicate object keys are kept; json_get() returns the LAST one
 *   (matching JavaScript / Python semantics).
 */
#ifndef EXAMPLES_JSON_H
#define EXAMPLES_JSON_H

#include <stddef.h>

#define JSON_MAX_DEPTH 64

typedef enum {
    JSON_NULL,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT
} json_type;

typedef struct json_value json_value;
struct json_value {
    json_type type;
    int boolean;         /* JSON_BOOL */
    double number;       /* JSON_NUMBER */
    char *str;           /* JSON_STRING: decoded, NUL-terminated */
    size_t str_len;
    char *key;           /* set when this value is an object member */
    size_t key_len;
    json_value *child;   /* JSON_ARRAY / JSON_OBJECT: first element/member */
    json_value *next;    /* next sibling */
    size_t count;        /* JSON_ARRAY / JSON_OBJECT: number of children */
};

typedef struct {
    const char *msg;     /* static string, never NULL after a failed parse */
    size_t offset;       /* byte offset in the input where the error was found */
} json_error;

/* Parse exactly one JSON document (surrounding whitespace allowed).
 * Returns NULL on error and fills *err (if non-NULL). */
json_value *json_parse(const char *text, size_t len, json_error *err);
void json_free(json_value *v);

/* Object member lookup; NULL if obj is not an object or key is absent. */
const json_value *json_get(const json_value *obj, const char *key);
/* Same, but also NULL unless the member has the given type. */
const json_value *json_get_type(const json_value *obj, const char *key, json_type t);
/* 1 if v is a number holding an exact integer in [-2^53, 2^53]; stores it. */
int json_as_int(const json_value *v, long long *out);

/* ---- output string builder ---- */
typedef struct {
    char *buf;
    size_t len;
    size_t cap;
    int oom;             /* sticky: set once any allocation fails */
} strbuf;

void sb_init(strbuf *sb);
void sb_free(strbuf *sb);
void sb_append(strbuf *sb, const char *s, size_t n);
void sb_puts(strbuf *sb, const char *s);
/* Appends a quoted, escaped JSON string. */
void sb_append_json_string(strbuf *sb, const char *s, size_t n);
void sb_append_int(strbuf *sb, long long v);
/* Shortest fixed-notation decimal that round-trips (e.g. 10 -> "10.0",
 * 12.5 -> "12.5"). If keep_point is 0 a trailing ".0" is dropped ("10").
 * Returns -1 (and appends nothing) for non-finite values. */
int sb_append_decimal(strbuf *sb, double d, int keep_point);

/* ---- I/O helpers ---- */
/* Reads fd 0 to EOF. Returns a malloc'd buffer (NUL-terminated for
 * convenience) or NULL on read error / OOM / input larger than max_len. */
char *read_all_stdin(size_t *out_len, size_t max_len);
/* Writes the whole buffer, retrying on short writes / EINTR. 0 on success. */
int write_all(int fd, const char *buf, size_t len);
/* printf-style line to stderr (a trailing newline is added). */
void log_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
