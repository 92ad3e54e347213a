/* Stub of Darwin <stdio.h> for the Linux type-check only (../README.md). */
#ifndef MLXBUF_STUB_STDIO_H
#define MLXBUF_STUB_STDIO_H
#include <stdarg.h>
#include <stddef.h>
int snprintf(char *restrict str, size_t size, const char *restrict format, ...)
    __attribute__((format(printf, 3, 4)));
int vsnprintf(char *restrict str, size_t size, const char *restrict format, va_list ap)
    __attribute__((format(printf, 3, 0)));
#endif
