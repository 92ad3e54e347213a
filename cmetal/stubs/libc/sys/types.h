/* Stub of Darwin <sys/types.h> for the Linux type-check only (../../README.md). */
#ifndef MLXBUF_STUB_SYS_TYPES_H
#define MLXBUF_STUB_SYS_TYPES_H
#include <stddef.h>
#include <stdint.h>
typedef long long off_t;      /* Darwin: __int64_t */
typedef long ssize_t;
typedef int pid_t;
#endif
