/* Stub of Darwin <string.h> for the Linux type-check only (../README.md). */
#ifndef MLXBUF_STUB_STRING_H
#define MLXBUF_STUB_STRING_H
#include <stddef.h>
void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *b, int c, size_t len);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
char *strerror(int errnum);
#endif
