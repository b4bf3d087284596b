#include "json.h"

#include <errno.h>
#include <float.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ======================================================================
 * Parser
 * ====================================================================== */

typedef struct {
    const char *start;
    const char *p;
    const char *end;
    int depth;
    json_error *err;
} parser;

static json_value *parse_value(parser *ps);

static void set_err(parser *ps, const char *at, const char *msg)
{
    if (ps->err && ps->err->msg == NULL) {
        ps->err->msg = msg;
        ps->err->offset = (size_t)(at - ps->start);
    }
}

static void skip_ws(parser *ps)
{
    while (ps->p < ps->end) {
        char c = *ps->p;
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r')
            ps->p++;
        else
            break;
    }
}

static json_value *new_value(parser *ps, json_type t)
{
    json_value *v = calloc(1, sizeof *v);
    if (!v)
        set_err(ps, ps->p, "out of memory");
    else
        v->type = t;
    return v;
}

static int hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

static size_t utf8_encode(unsigned cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the valid UTF-8 sequence starting at s (s < lim), or 0. */
static size_t utf8_valid_seq(const unsigned char *s, const unsigned char *lim)
{
    unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range for 2nd byte */

    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;        /* overlong */
        if (c == 0xED) hi = 0x9F;        /* UTF-16 surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;        /* overlong */
        if (c == 0xF4) hi = 0x8F;        /* > U+10FFFF */
    } else
        return 0;

    if ((size_t)(lim - s) < n)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return n;
}

/* ps->p points at the opening quote. On success stores a malloc'd decoded
 * string and advances past the closing quote. */
static int parse_string_raw(parser *ps, char **out, size_t *out_len)
{
    const char *q = ps->p + 1;   /* first content byte */
    const char *close;
    char *buf, *o;

    /* Pass 1: locate the closing quote (escapes skip one byte). */
    for (close = q; close < ps->end && *close != '"'; close++) {
        if (*close == '\\') {
            close++;
            if (close >= ps->end)
                break;
        }
    }
    if (close >= ps->end) {
        set_err(ps, ps->p, "unterminated string");
        return 0;
    }

    /* Decoded output is never longer than the raw text. */
    buf = malloc((size_t)(close - q) + 1);
    if (!buf) {
        set_err(ps, ps->p, "out of memory");
        return 0;
    }
    o = buf;

    /* Pass 2: validate + decode within [q, close). */
    while (q < close) {
        unsigned char c = (unsigned char)*q;
        if (c == '\\') {
            char e = q[1];           /* q + 1 < close guaranteed by pass 1 */
            switch (e) {
            case '"':  *o++ = '"';  q += 2; break;
            case '\\': *o++ = '\\'; q += 2; break;
            case '/':  *o++ = '/';  q += 2; break;
            case 'b':  *o++ = '\b'; q += 2; break;
            case 'f':  *o++ = '\f'; q += 2; break;
            case 'n':  *o++ = '\n'; q += 2; break;
            case 'r':  *o++ = '\r'; q += 2; break;
            case 't':  *o++ = '\t'; q += 2; break;
            case 'u': {
                unsigned cp, lo;
                if (close - q < 6 || !hex4(q + 2, &cp)) {
                    set_err(ps, q, "invalid \\u escape");
                    goto fail;
                }
                q += 6;
                if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    set_err(ps, q - 6, "unpaired low surrogate");
                    goto fail;
                }
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    if (close - q < 6 || q[0] != '\\' || q[1] != 'u' ||
                        !hex4(q + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                        set_err(ps, q - 6, "unpaired high surrogate");
                        goto fail;
                    }
                    q += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                o += utf8_encode(cp, o);
                break;
            }
            default:
                set_err(ps, q, "invalid escape sequence");
                goto fail;
            }
        } else if (c < 0x20) {
            set_err(ps, q, "control character in string");
            goto fail;
        } else if (c < 0x80) {
            *o++ = (char)c;
            q++;
        } else {
            size_t n = utf8_valid_seq((const unsigned char *)q,
                                      (const unsigned char *)close);
            if (n == 0) {
                set_err(ps, q, "invalid UTF-8 in string");
                goto fail;
            }
            memcpy(o, q, n);
            o += n;
            q += n;
        }
    }
    *o = '\0';
    *out = buf;
    *out_len = (size_t)(o - buf);
    ps->p = close + 1;
    return 1;

fail:
    free(buf);
    return 0;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static json_value *parse_number(parser *ps)
{
    const char *s = ps->p, *p = ps->p, *e = ps->end;
    char small[64], *tmp;
    size_t n;
    double d;
    json_value *v;

    if (p < e && *p == '-')
        p++;
    if (p >= e || !is_digit(*p)) {
        set_err(ps, p, "invalid number");
        return NULL;
    }
    if (*p == '0') {
        p++;
    } else {
        while (p < e && is_digit(*p))
            p++;
    }
    if (p < e && *p == '.') {
        p++;
        if (p >= e || !is_digit(*p)) {
            set_err(ps, p, "invalid number: digit expected after '.'");
            return NULL;
        }
        while (p < e && is_digit(*p))
            p++;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (p >= e || !is_digit(*p)) {
            set_err(ps, p, "invalid number: digit expected in exponent");
            return NULL;
        }
        while (p < e && is_digit(*p))
            p++;
    }

    /* strtod needs a NUL-terminated copy; the grammar is already checked. */
    n = (size_t)(p - s);
    tmp = n < sizeof small ? small : malloc(n + 1);
    if (!tmp) {
        set_err(ps, s, "out of memory");
        return NULL;
    }
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    d = strtod(tmp, NULL);
    if (tmp != small)
        free(tmp);
    if (!(d >= -DBL_MAX && d <= DBL_MAX)) {
        set_err(ps, s, "number out of range");
        return NULL;
    }

    v = new_value(ps, JSON_NUMBER);
    if (!v)
        return NULL;
    v->number = d;
    ps->p = p;
    return v;
}

static json_value *parse_literal(parser *ps, const char *word, json_type t, int b)
{
    size_t n = strlen(word);
    json_value *v;
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
        set_err(ps, ps->p, "invalid literal");
        return NULL;
    }
    v = new_value(ps, t);
    if (!v)
        return NULL;
    v->boolean = b;
    ps->p += n;
    return v;
}

/* Shared body for arrays and objects; ps->p points at '[' or '{'. */
static json_value *parse_container(parser *ps, int is_object)
{
    const char close_ch = is_object ? '}' : ']';
    json_value *v, *tail = NULL;

    if (++ps->depth > JSON_MAX_DEPTH) {
        set_err(ps, ps->p, "nesting too deep");
        return NULL;
    }
    v = new_value(ps, is_object ? JSON_OBJECT : JSON_ARRAY);
    if (!v)
        return NULL;
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close_ch) {
        ps->p++;
        ps->depth--;
        return v;
    }

    for (;;) {
        char *key = NULL;
        size_t key_len = 0;
        json_value *item;

        if (is_object) {
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != '"') {
                set_err(ps, ps->p, "object key expected");
                goto fail;
            }
            if (!parse_string_raw(ps, &key, &key_len))
                goto fail;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                set_err(ps, ps->p, "':' expected");
                goto fail;
            }
            ps->p++;
        }

        item = parse_value(ps);
        if (!item) {
            free(key);
            goto fail;
        }
        item->key = key;
        item->key_len = key_len;
        if (tail)
            tail->next = item;
        else
            v->child = item;
        tail = item;
        v->count++;

        skip_ws(ps);
        if (ps->p >= ps->end) {
            set_err(ps, ps->p, is_object ? "unterminated object" : "unterminated array");
            goto fail;
        }
        if (*ps->p == ',') {
            ps->p++;
            continue;
        }
        if (*ps->p == close_ch) {
            ps->p++;
            break;
        }
        set_err(ps, ps->p, is_object ? "',' or '}' expected" : "',' or ']' expected");
        goto fail;
    }
    ps->depth--;
    return v;

fail:
    json_free(v);
    return NULL;
}

static json_value *parse_value(parser *ps)
{
    skip_ws(ps);
    if (ps->p >= ps->end) {
        set_err(ps, ps->p, "unexpected end of input");
        return NULL;
    }
    switch (*ps->p) {
    case '{':
        return parse_container(ps, 1);
    case '[':
        return parse_container(ps, 0);
    case '"': {
        json_value *v = new_value(ps, JSON_STRING);
        if (!v)
            return NULL;
        if (!parse_string_raw(ps, &v->str, &v->str_len)) {
            free(v);
            return NULL;
        }
        return v;
    }
    case 't':
        return parse_literal(ps, "true", JSON_BOOL, 1);
    case 'f':
        return parse_literal(ps, "false", JSON_BOOL, 0);
    case 'n':
        return parse_literal(ps, "null", JSON_NULL, 0);
    default:
        if (*ps->p == '-' || is_digit(*ps->p))
            return parse_number(ps);
        set_err(ps, ps->p, "unexpected character");
        return NULL;
    }
}

json_value *json_parse(const char *text, size_t len, json_error *err)
{
    parser ps;
    json_value *root;

    if (err) {
        err->msg = NULL;
        err->offset = 0;
    }
    ps.start = ps.p = text;
    ps.end = text + len;
    ps.depth = 0;
    ps.err = err;

    /* Tolerate a leading UTF-8 byte order mark. */
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0)
        ps.p += 3;

    root = parse_value(&ps);
    if (!root)
        return NULL;
    skip_ws(&ps);
    if (ps.p != ps.end) {
        set_err(&ps, ps.p, "trailing characters after JSON document");
        json_free(root);
        return NULL;
    }
    return root;
}

void json_free(json_value *v)
{
    /* Siblings iteratively; children recursively (depth is bounded). */
    while (v) {
        json_value *next = v->next;
        json_free(v->child);
        free(v->str);
        free(v->key);
        free(v);
        v = next;
    }
}

const json_value *json_get(const json_value *obj, const char *key)
{
    const json_value *found = NULL;
    size_t n;
    if (!obj || obj->type != JSON_OBJECT)
        return NULL;
    n = strlen(key);
    for (const json_value *c = obj->child; c; c = c->next)
        if (c->key_len == n && memcmp(c->key, key, n) == 0)
            found = c;
    return found;
}

const json_value *json_get_type(const json_value *obj, const char *key, json_type t)
{
    const json_value *v = json_get(obj, key);
    return (v && v->type == t) ? v : NULL;
}

int json_as_int(const json_value *v, long long *out)
{
    const double lim = 9007199254740992.0; /* 2^53 */
    long long i;
    if (!v || v->type != JSON_NUMBER)
        return 0;
    if (!(v->number >= -lim && v->number <= lim))
        return 0;
    i = (long long)v->number;
    if ((double)i != v->number)
        return 0;
    *out = i;
    return 1;
}

/* ======================================================================
 * String builder
 * ====================================================================== */

void sb_init(strbuf *sb)
{
    sb->buf = NULL;
    sb->len = sb->cap = 0;
    sb->oom = 0;
}

void sb_free(strbuf *sb)
{
    free(sb->buf);
    sb_init(sb);
}

static int sb_reserve(strbuf *sb, size_t extra)
{
    size_t need, cap;
    char *nb;
    if (sb->oom)
        return 0;
    if (extra > SIZE_MAX - sb->len - 1)
        goto oom;
    need = sb->len + extra + 1;       /* keep room for a NUL */
    if (need <= sb->cap)
        return 1;
    cap = sb->cap ? sb->cap : 256;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    nb = realloc(sb->buf, cap);
    if (!nb)
        goto oom;
    sb->buf = nb;
    sb->cap = cap;
    return 1;
oom:
    sb->oom = 1;
    return 0;
}

void sb_append(strbuf *sb, const char *s, size_t n)
{
    if (!sb_reserve(sb, n))
        return;
    memcpy(sb->buf + sb->len, s, n);
    sb->len += n;
    sb->buf[sb->len] = '\0';
}

void sb_puts(strbuf *sb, const char *s)
{
    sb_append(sb, s, strlen(s));
}

void sb_append_json_string(strbuf *sb, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;   /* start of the current run of bytes needing no escape */

    sb_append(sb, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[6];
        size_t elen = 2;
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c;
        } else if (c == '\n') {
            esc[0] = '\\'; esc[1] = 'n';
        } else if (c == '\r') {
            esc[0] = '\\'; esc[1] = 'r';
        } else if (c == '\t') {
            esc[0] = '\\'; esc[1] = 't';
        } else if (c < 0x20) {
            esc[0] = '\\'; esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
            esc[4] = hex[c >> 4]; esc[5] = hex[c & 0xF];
            elen = 6;
        } else {
            continue;
        }
        sb_append(sb, s + run, i - run);
        sb_append(sb, esc, elen);
        run = i + 1;
    }
    sb_append(sb, s + run, n - run);
    sb_append(sb, "\"", 1);
}

void sb_append_int(strbuf *sb, long long v)
{
    char tmp[24];
    char *p = tmp + sizeof tmp;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--p = (char)('0' + (u % 10));
        u /= 10;
    } while (u);
    if (v < 0)
        *--p = '-';
    sb_append(sb, p, (size_t)(tmp + sizeof tmp - p));
}

int sb_append_decimal(strbuf *sb, double d, int keep_point)
{
    char tmp[400];   /* DBL_MAX has 309 integer digits */
    int n = 0;

    if (!(d >= -DBL_MAX && d <= DBL_MAX))
        return -1;
    for (int prec = 1; prec <= 40; prec++) {
        n = snprintf(tmp, sizeof tmp, "%.*f", prec, d);
        if (n <= 0 || (size_t)n >= sizeof tmp)
            return -1;
        if (strtod(tmp, NULL) == d)
            break;
    }
    /* prec 40 always reached a value; tiny values may round (accepted). */
    if (!keep_point && n >= 2 && tmp[n - 2] == '.' && tmp[n - 1] == '0')
        n -= 2;
    sb_append(sb, tmp, (size_t)n);
    return 0;
}

/* ======================================================================
 * I/O
 * ====================================================================== */

char *read_all_stdin(size_t *out_len, size_t max_len)
{
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    for (;;) {
        ssize_t r;
        if (cap - len < 2) {           /* keep 1 byte for the NUL */
            char *nb;
            if (cap > max_len)          /* already holds > max_len bytes */
                goto fail;
            nb = realloc(buf, cap * 2);
            if (!nb)
                goto fail;
            buf = nb;
            cap *= 2;
        }
        r = read(0, buf + len, cap - len - 1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            goto fail;
        }
        if (r == 0)
            break;
        len += (size_t)r;
        if (len > max_len)
            goto fail;
    }
    buf[len] = '\0';
    *out_len = len;
    return buf;
fail:
    free(buf);
    return NULL;
}

int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0)
            return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

void log_printf(const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof tmp - 2)
        n = (int)(sizeof tmp - 2);    /* truncated */
    tmp[n++] = '\n';
    write_all(2, tmp, (size_t)n);
}
