/*
 * HOSTILE example: allocates 1 MiB chunks forever, touching every page so
 * the memory is really committed, until malloc() fails; then abort()s
 * (which traps with `unreachable` under wasi-libc).
 *
 * Purpose: exercise the host's memory limit / trap handling. It ignores stdin.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1024u * 1024u)
#define PAGE 4096u

/* Chunks are chained through their first word and anchored in a volatile
 * global so the compiler cannot elide the allocations. */
static void *volatile head;

static void put_num(unsigned long v)
{
    char tmp[24];
    char *p = tmp + sizeof tmp;
    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    (void)!write(2, p, (size_t)(tmp + sizeof tmp - p));
}

int main(void)
{
    static const char m1[] = "memory_bomb: malloc failed after ";
    static const char m2[] = " MiB, calling abort()\n";
    unsigned long mib = 0;

    for (;;) {
        volatile char *c = malloc(CHUNK);
        if (!c)
            break;
        for (size_t off = 0; off < CHUNK; off += PAGE)
            c[off] = (char)off;
        *(void *volatile *)c = head;
        head = (void *)c;
        mib++;
    }
    (void)!write(2, m1, sizeof m1 - 1);
    put_num(mib);
    (void)!write(2, m2, sizeof m2 - 1);
    abort();
}
