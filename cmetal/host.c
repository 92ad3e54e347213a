/*
 * host.c -- the host-memory backend: page-aligned zero-filled memory, a
 * worker thread that runs command buffers in submission order, and
 * residency sets that only keep books (the core does the counting; host
 * memory is always resident).
 *
 * Portable POSIX: runs on Linux and macOS alike, so a Mac can test both
 * backends side by side.
 *
 * Locking: st->lock guards the queue; submit takes it under the core's
 * dev->submit_lock, and the worker drops it before running a command
 * buffer, so completions run with no lock held (LOCKING.md). The fork
 * hooks take it around fork(), and in a child the device's memory, plain
 * process memory, is still freed.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>
#if defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

#if !defined(MAP_ANONYMOUS) && defined(MAP_ANON)
#define MAP_ANONYMOUS MAP_ANON
#endif

/* Below this, aligned malloc + memset is cheaper than a system call and
 * keeps small storages packed; above it, anonymous mappings arrive zeroed
 * by the kernel (no memset over memory we may never touch) and go straight
 * back to the OS when freed. */
#define HOST_MMAP_THRESHOLD ((uint64_t)256 << 10)

typedef struct host_state {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t worker;
    bool stop;
    bool detached;          /* close() ran on the worker: it frees us     */
    cm_cmdbuf_t *head, *tail; /* FIFO linked through cb->backend_data     */
    uint64_t page;
    uint64_t ram;           /* the machine's, or our assumption of it     */
    atomic_uint_fast64_t allocated; /* pages of live allocations and wraps */
} host_state_t;

/* A wrap: the caller's memory and what gives it back. The native object
 * of a wrapped storage, so each wrap is its own allocation, as each
 * newBufferWithBytesNoCopy is on Metal. */
typedef struct host_wrap {
    uint64_t size;
    void (*release)(void *ctx);
    void *ctx;
} host_wrap_t;

/* Host memory is always resident; the set only remembers what was asked
 * so a debugger shows the same story as on Metal. */
typedef struct host_rset {
    unsigned index;
    uint64_t members, commits, requests;
} host_rset_t;

/* 0 if unknown. */
static uint64_t physical_memory(void)
{
#if defined(__APPLE__)
    uint64_t mem = 0;
    size_t len = sizeof mem;
    if (sysctlbyname("hw.memsize", &mem, &len, NULL, 0) == 0)
        return mem;
    return 0;
#else
    long pages = sysconf(_SC_PHYS_PAGES);
    long psize = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || psize <= 0)
        return 0;
    return (uint64_t)pages * (uint64_t)psize;
#endif
}

static int host_available(void)
{
    return 1;
}

static uint64_t host_round(const host_state_t *st, uint64_t len)
{
    return (len + st->page - 1) & ~(st->page - 1);
}

/* ------------------------------------------------------------------ */
/* Worker                                                              */
/* ------------------------------------------------------------------ */

static void host_run(cm_cmdbuf_t *cb)
{
    int status = CM_OK;
    const char *msg = NULL;
    for (size_t i = 0; i < cb->nops && status == CM_OK; i++) {
        const cm_op_t *op = &cb->ops[i];
        switch (op->kind) {
        case CM_OP_COPY:
            memmove(op->dst->contents + op->dst_offset, op->src->contents + op->src_offset,
                    (size_t)op->nbytes);
            break;
        case CM_OP_FILL:
            memset(op->dst->contents + op->dst_offset, op->value, (size_t)op->nbytes);
            break;
        case CM_OP_DISPATCH:
            status = CM_ERR_UNSUPPORTED;
            msg = "compute kernels need the Metal backend; the host backend has none";
            break;
        default:
            status = CM_ERR_INTERNAL;
            msg = "unknown operation kind in a command buffer";
            break;
        }
    }
    cm__cmdbuf_complete(cb, status, msg);
}

static void *host_worker(void *arg)
{
    host_state_t *st = arg;
    pthread_mutex_lock(&st->lock);
    for (;;) {
        while (st->head == NULL && !st->stop)
            pthread_cond_wait(&st->cond, &st->lock);
        if (st->head == NULL)
            break;
        cm_cmdbuf_t *cb = st->head;
        st->head = cb->backend_data;
        if (st->head == NULL)
            st->tail = NULL;
        pthread_mutex_unlock(&st->lock);
        /* The completion may drop the device's last reference, and then
         * host_close runs right here: it only flags us, so st stays valid
         * until this loop ends. */
        host_run(cb);
        pthread_mutex_lock(&st->lock);
    }
    bool detached = st->detached;
    pthread_mutex_unlock(&st->lock);
    if (detached) {
        pthread_mutex_destroy(&st->lock);
        pthread_cond_destroy(&st->cond);
        free(st);
    }
    return NULL;
}

static int host_submit(void *state, cm_cmdbuf_t *cb, void *prepared)
{
    host_state_t *st = state;
    (void)prepared;
    pthread_mutex_lock(&st->lock);
    if (st->stop) {
        pthread_mutex_unlock(&st->lock);
        return cm__fail(CM_ERR_COMMAND_BUFFER, "the host queue is shutting down");
    }
    cb->backend_data = NULL;
    if (st->tail != NULL)
        st->tail->backend_data = cb;
    else
        st->head = cb;
    st->tail = cb;
    pthread_cond_signal(&st->cond);
    pthread_mutex_unlock(&st->lock);
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Device                                                              */
/* ------------------------------------------------------------------ */

static int host_open(cm_device_t *dev, void **state, cm_device_info_t *info)
{
    (void)dev;
    host_state_t *st = calloc(1, sizeof *st);
    if (st == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate the host backend state");
    long psize = sysconf(_SC_PAGESIZE);
    st->page = psize > 0 ? (uint64_t)psize : 4096;

    uint64_t phys = physical_memory();
    if (phys == 0)
        phys = (uint64_t)4 << 30; /* unknown: assume a small machine */
    st->ram = phys;
    struct utsname un;
    const char *arch = uname(&un) == 0 ? un.machine : "unknown";
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(info->name, CM_NAME_MAX, "host (%s, %ld core%s)", arch, cores > 0 ? cores : 1,
             cores == 1 ? "" : "s");
    info->has_unified_memory = 1;
    info->page_size = st->page;
    /* Half the RAM for one storage leaves room for everything else; the
     * working set mirrors Metal's "recommended" at three quarters. */
    info->max_buffer_length = (phys / 2) & ~(st->page - 1);
    info->recommended_max_working_set_size = phys / 4 * 3;
    info->registry_id = 0;

    pthread_mutex_init(&st->lock, NULL);
    pthread_cond_init(&st->cond, NULL);
    atomic_init(&st->allocated, 0);
    int err = pthread_create(&st->worker, NULL, host_worker, st);
    if (err != 0) {
        pthread_mutex_destroy(&st->lock);
        pthread_cond_destroy(&st->cond);
        free(st);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot start the host queue thread: %s",
                        strerror(err));
    }
    *state = st;
    return CM_OK;
}

/* The worker holds st->lock only to move the queue, so prepare waits at
 * most that long. In the child the worker is gone; the core neither
 * submits to nor closes an inherited device, so the queue is left as it
 * was: what it held stays held until the child exits. */
static void host_fork_prepare(void *state)
{
    pthread_mutex_lock(&((host_state_t *)state)->lock);
}

static void host_fork_parent(void *state)
{
    pthread_mutex_unlock(&((host_state_t *)state)->lock);
}

/* The child's copies of our allocations are its own: free() and munmap()
 * give them back to it. */
static bool host_fork_child(void *state)
{
    pthread_mutex_unlock(&((host_state_t *)state)->lock);
    return true;
}

/* Past the RAM, the OS swaps or kills the process. */
static uint64_t host_memory_ceiling(void *state)
{
    return ((const host_state_t *)state)->ram;
}

static void host_close(void *state)
{
    host_state_t *st = state;
    pthread_mutex_lock(&st->lock);
    st->stop = true;
    if (pthread_equal(pthread_self(), st->worker)) {
        /* A completion on the worker dropped the last device reference:
         * joining ourselves would deadlock, so the worker frees st when
         * its loop ends. */
        st->detached = true;
        pthread_mutex_unlock(&st->lock);
        pthread_detach(pthread_self());
        return;
    }
    pthread_cond_broadcast(&st->cond);
    pthread_mutex_unlock(&st->lock);
    pthread_join(st->worker, NULL);
    pthread_mutex_destroy(&st->lock);
    pthread_cond_destroy(&st->cond);
    free(st);
}

/* ------------------------------------------------------------------ */
/* Memory                                                              */
/* ------------------------------------------------------------------ */

static int host_buffer_alloc(void *state, uint64_t len, cm_native_t *native,
                             uint8_t **contents, uint64_t *allocated)
{
    host_state_t *st = state;
    char b1[64];
    uint64_t size = host_round(st, len);
    void *p;
    if (size < HOST_MMAP_THRESHOLD) {
        int err = posix_memalign(&p, (size_t)st->page, (size_t)size);
        if (err != 0)
            return cm__fail(CM_ERR_OUT_OF_MEMORY, "host allocation of %s failed: %s",
                            BYTES(size, b1), strerror(err));
        memset(p, 0, (size_t)size);
    } else {
        p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return cm__fail(CM_ERR_OUT_OF_MEMORY, "host mapping of %s failed: %s",
                            BYTES(size, b1), strerror(errno));
    }
    atomic_fetch_add(&st->allocated, size);
    *native = p;
    *contents = p;
    *allocated = size;
    return CM_OK;
}

static void host_buffer_free(void *state, cm_native_t native, uint8_t *contents, uint64_t len)
{
    host_state_t *st = state;
    (void)native;
    uint64_t size = host_round(st, len);
    if (size < HOST_MMAP_THRESHOLD)
        free(contents);
    else
        munmap(contents, (size_t)size);
    atomic_fetch_sub(&st->allocated, size);
}

static int host_buffer_wrap(void *state, void *ptr, uint64_t len, void (*release)(void *ctx),
                            void *ctx, cm_native_t *native, uint64_t *allocated)
{
    host_state_t *st = state;
    (void)ptr;
    host_wrap_t *w = malloc(sizeof *w);
    if (w == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a host wrap record");
    w->size = host_round(st, len);
    w->release = release;
    w->ctx = ctx;
    atomic_fetch_add(&st->allocated, w->size);
    *native = w;
    *allocated = w->size;
    return CM_OK;
}

/* Nothing else holds the wrap: the memory goes back now. */
static void host_buffer_unwrap(void *state, cm_native_t native)
{
    host_state_t *st = state;
    host_wrap_t *w = native;
    atomic_fetch_sub(&st->allocated, w->size);
    if (w->release != NULL)
        w->release(w->ctx);
    free(w);
}

static int host_buffer_adopt(void *state, uint64_t handle, cm_native_t *native,
                             uint8_t **contents, uint64_t *len, uint64_t *allocated)
{
    (void)state;
    (void)native;
    (void)contents;
    (void)len;
    (void)allocated;
    return cm__fail(CM_ERR_UNSUPPORTED,
                    "cannot wrap native handle 0x%llx: the host backend has no native "
                    "buffer objects (wrap the memory itself with cm_storage_wrap_external)",
                    (unsigned long long)handle);
}

static uint64_t host_native_handle(cm_native_t native)
{
    (void)native;
    return 0;
}

/* No heaps: every native object is its own allocation. */
static void host_allocation_of(void *state, cm_native_t native, uint64_t len,
                               void **allocation, uint64_t *allocated)
{
    *allocation = native;
    *allocated = host_round(state, len);
}

static uint64_t host_current_allocated_size(void *state)
{
    return atomic_load(&((host_state_t *)state)->allocated);
}

/* ------------------------------------------------------------------ */
/* Residency (bookkeeping only)                                        */
/* ------------------------------------------------------------------ */

static int host_rset_create(void *state, unsigned index, void **rset)
{
    (void)state;
    host_rset_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return cm__fail(CM_ERR_RESIDENCY, "cannot allocate residency shard %u", index);
    r->index = index;
    *rset = r;
    return CM_OK;
}

static void host_rset_destroy(void *state, void *rset)
{
    (void)state;
    free(rset);
}

static int host_rset_add(void *rset, void *allocation)
{
    (void)allocation;
    ((host_rset_t *)rset)->members++;
    return CM_OK;
}

static int host_rset_remove(void *rset, void *allocation)
{
    (void)allocation;
    ((host_rset_t *)rset)->members--;
    return CM_OK;
}

static int host_rset_commit(void *rset)
{
    ((host_rset_t *)rset)->commits++;
    return CM_OK;
}

static int host_rset_request(void *rset)
{
    ((host_rset_t *)rset)->requests++;
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Compute (none)                                                      */
/* ------------------------------------------------------------------ */

static int host_library_compile(void *state, const char *source, bool fast_math, void **lib)
{
    (void)state;
    (void)source;
    (void)fast_math;
    (void)lib;
    return cm__fail(CM_ERR_UNSUPPORTED,
                    "compute kernels need the Metal backend; the host backend has none");
}

static void host_library_release(void *lib)
{
    (void)lib;
}

static int host_kernel_create(void *state, void *lib, const char *name, void **pipeline,
                              cm_kernel_info_t *info)
{
    (void)state;
    (void)lib;
    (void)pipeline;
    (void)info;
    return cm__fail(CM_ERR_UNSUPPORTED,
                    "kernel '%s': compute kernels need the Metal backend; the host "
                    "backend has none",
                    name);
}

static void host_kernel_release(void *pipeline)
{
    (void)pipeline;
}

const cm_backend_t cm_host_backend = {
    .name = "host",
    .kind = CM_BACKEND_HOST,
    .available = host_available,
    .open = host_open,
    .memory_ceiling = host_memory_ceiling,
    .fork_prepare = host_fork_prepare,
    .fork_parent = host_fork_parent,
    .fork_child = host_fork_child,
    .close = host_close,
    .buffer_alloc = host_buffer_alloc,
    .buffer_free = host_buffer_free,
    .buffer_wrap = host_buffer_wrap,
    .buffer_unwrap = host_buffer_unwrap,
    .buffer_adopt = host_buffer_adopt,
    .native_handle = host_native_handle,
    .allocation_of = host_allocation_of,
    .current_allocated_size = host_current_allocated_size,
    .rset_create = host_rset_create,
    .rset_destroy = host_rset_destroy,
    .rset_add = host_rset_add,
    .rset_remove = host_rset_remove,
    .rset_commit = host_rset_commit,
    .rset_request = host_rset_request,
    .submit = host_submit,
    .library_compile = host_library_compile,
    .library_release = host_library_release,
    .kernel_create = host_kernel_create,
    .kernel_release = host_kernel_release,
};
