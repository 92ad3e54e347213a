/* Stub of Darwin <pthread.h> for the Linux type-check only (../README.md).
 * Darwin's pthread types are opaque structs of a signature word plus
 * storage (sizes for 64-bit targets), unlike glibc's unions. */
#ifndef MLXBUF_STUB_PTHREAD_H
#define MLXBUF_STUB_PTHREAD_H
#include <stddef.h>

struct _opaque_pthread_t;
typedef struct _opaque_pthread_t *pthread_t;
typedef struct _opaque_pthread_attr_t { long __sig; char __opaque[56]; } pthread_attr_t;
typedef struct _opaque_pthread_mutex_t { long __sig; char __opaque[56]; } pthread_mutex_t;
typedef struct _opaque_pthread_mutexattr_t { long __sig; char __opaque[8]; } pthread_mutexattr_t;
typedef struct _opaque_pthread_cond_t { long __sig; char __opaque[40]; } pthread_cond_t;
typedef struct _opaque_pthread_condattr_t { long __sig; char __opaque[8]; } pthread_condattr_t;

int pthread_mutex_init(pthread_mutex_t *restrict m, const pthread_mutexattr_t *restrict a);
int pthread_mutex_destroy(pthread_mutex_t *m);
int pthread_mutex_lock(pthread_mutex_t *m);
int pthread_mutex_unlock(pthread_mutex_t *m);
int pthread_cond_init(pthread_cond_t *restrict c, const pthread_condattr_t *restrict a);
int pthread_cond_destroy(pthread_cond_t *c);
int pthread_cond_wait(pthread_cond_t *restrict c, pthread_mutex_t *restrict m);
int pthread_cond_broadcast(pthread_cond_t *c);
pthread_t pthread_self(void);
int pthread_equal(pthread_t a, pthread_t b);
#endif
