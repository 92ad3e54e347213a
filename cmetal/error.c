/*
 * error.c -- the thread-local last error and small formatting helpers.
 *
 * Each thread keeps its own status and message, so a failure on one thread
 * never overwrites the message another thread is about to read (cffi
 * releases the GIL around every call, so Python threads really do run C
 * concurrently). No locks (LOCKING.md).
 */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <stdio.h>

#define CM_VERSION "0.1.0"

/* Long enough for a compiler diagnostic excerpt; longer text is cut. */
#define CM_MESSAGE_MAX 2048

static _Thread_local int tl_status;
static _Thread_local char tl_message[CM_MESSAGE_MAX];

int cm__fail(int status, const char *fmt, ...)
{
    /* The caller's errno survives formatting, so a CM_ERR_IO reaches the
     * binding with the errno of the system call that failed. */
    int saved_errno = errno;
    /* Format into a scratch buffer first: callers may pass cm_last_error()
     * itself as an argument when they prefix an earlier message. */
    char scratch[CM_MESSAGE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(scratch, sizeof scratch, fmt, ap);
    va_end(ap);
    memcpy(tl_message, scratch, strlen(scratch) + 1);
    tl_status = status;
    errno = saved_errno;
    return status;
}

const char *cm_last_error(void)
{
    return tl_message;
}

int cm_last_status(void)
{
    return tl_status;
}

const char *cm_version(void)
{
    return CM_VERSION;
}

const char *cm__fmt_bytes(uint64_t n, char *buf, size_t cap)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    /* Exact counts below 64 KiB: at that size users compare against page
     * and element sizes, where "4.0 KiB" would hide an off-by-one. */
    if (n < 65536) {
        snprintf(buf, cap, "%llu bytes", (unsigned long long)n);
        return buf;
    }
    double v = (double)n / 1024.0;
    size_t u = 0;
    while (v >= 1024.0 && u + 1 < sizeof units / sizeof units[0]) {
        v /= 1024.0;
        u++;
    }
    snprintf(buf, cap, "%.1f %s (%llu bytes)", v, units[u], (unsigned long long)n);
    return buf;
}
