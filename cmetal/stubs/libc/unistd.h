/* Stub of Darwin <unistd.h> for the Linux type-check only (../README.md). */
#ifndef MLXBUF_STUB_UNISTD_H
#define MLXBUF_STUB_UNISTD_H
#include <sys/types.h>
#define _SC_PAGESIZE 29       /* Darwin's value */
long sysconf(int name);
#endif
