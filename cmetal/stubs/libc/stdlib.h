/* Stub of Darwin <stdlib.h> for the Linux type-check only (../README.md). */
#ifndef MLXBUF_STUB_STDLIB_H
#define MLXBUF_STUB_STDLIB_H
#include <stddef.h>
void *malloc(size_t size);
void *calloc(size_t count, size_t size);
void *realloc(void *ptr, size_t size);
void free(void *ptr);
char *getenv(const char *name);
#endif
