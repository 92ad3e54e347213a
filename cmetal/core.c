/*
 * core.c -- the backend-neutral core: devices, storages, residency staging
 * and sharding, keep-alive, command buffers with in-flight holds, and the
 * compute library/kernel cache. Every policy lives here; backends only
 * provide the primitives of cm_backend_t.
 *
 * Locks, always taken in this order when nested (never the reverse):
 *   cb->enc_lock  ->  dev->submit_lock  ->  dev->lock  ->  (backend
 *   residency primitives)
 *   dev->cb_lock and dev->ka_lock are leaves: nothing is taken under them.
 * A pool's lock is never held while dev->lock is taken, nor the reverse
 * (see pool.c). Storages are destroyed with no lock held, because
 * destruction takes dev->lock (residency) and may drop the last reference
 * of a pool or of the device.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BYTES(n, buf) cm__fmt_bytes((n), (buf), sizeof(buf))

/* Constant blobs go through setBytes:length:atIndex:, which Apple limits
 * to 4 KiB; bigger constants belong in a buffer. */
#define CM_MAX_CONSTANT_BYTES 4096

double cm__now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------ */
/* Backends                                                            */
/* ------------------------------------------------------------------ */

static int metal_available(void)
{
#if defined(CM_HAVE_METAL)
    return cm_metal_backend.available();
#else
    return 0;
#endif
}

int cm_backend_available(int backend)
{
    switch (backend) {
    case CM_BACKEND_AUTO:
        return 1;
    case CM_BACKEND_HOST:
        return cm_host_backend.available();
    case CM_BACKEND_METAL:
        return metal_available();
    default:
        return 0;
    }
}

static int pick_backend(int backend, const cm_backend_t **out)
{
    switch (backend) {
    case CM_BACKEND_AUTO:
        /* A simulated Metal (CM_METAL_SIMULATED: a Linux test build) is
         * opened only when asked for by name, never picked for a program
         * that asked for the best device. */
#if defined(CM_HAVE_METAL) && !defined(CM_METAL_SIMULATED)
        if (cm_metal_backend.available()) {
            *out = &cm_metal_backend;
            return CM_OK;
        }
#endif
        *out = &cm_host_backend;
        return CM_OK;
    case CM_BACKEND_HOST:
        *out = &cm_host_backend;
        return CM_OK;
    case CM_BACKEND_METAL:
#if defined(CM_HAVE_METAL)
        if (cm_metal_backend.available()) {
            *out = &cm_metal_backend;
            return CM_OK;
        }
        return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                        "no Metal device: MTLCreateSystemDefaultDevice() found none "
                        "in this process");
#else
        return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                        "no Metal device: this build has no Metal backend (Metal "
                        "exists only on macOS)");
#endif
    default:
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "unknown backend %d: expected %d (auto), %d (host) or %d (metal)",
                        backend, CM_BACKEND_AUTO, CM_BACKEND_HOST, CM_BACKEND_METAL);
    }
}

/* ------------------------------------------------------------------ */
/* Devices                                                             */
/* ------------------------------------------------------------------ */

int cm_device_open(int backend, int flags, cm_device_t **out)
{
    if (out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_open: out is NULL");
    *out = NULL;
    if (flags & ~CM_DEVICE_NO_RESIDENCY)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "unknown device flags 0x%x: the only flag is "
                        "CM_DEVICE_NO_RESIDENCY (0x%x)",
                        (unsigned)flags, (unsigned)CM_DEVICE_NO_RESIDENCY);
    const cm_backend_t *be;
    int rc = pick_backend(backend, &be);
    if (rc != CM_OK)
        return rc;

    cm_device_t *dev = calloc(1, sizeof *dev);
    if (dev == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a device record");
    atomic_init(&dev->refcount, 1);
    atomic_init(&dev->active_bytes, 0);
    atomic_init(&dev->peak_bytes, 0);
    atomic_init(&dev->live_storages, 0);
    atomic_init(&dev->alloc_count, 0);
    atomic_init(&dev->free_count, 0);
    atomic_init(&dev->memory_limit, UINT64_MAX);
    atomic_init(&dev->cached_bytes, 0);
    atomic_init(&dev->cached_storages, 0);
    pthread_mutex_init(&dev->lock, NULL);
    pthread_mutex_init(&dev->cb_lock, NULL);
    pthread_mutex_init(&dev->submit_lock, NULL);
    pthread_cond_init(&dev->cb_cond, NULL);
    pthread_mutex_init(&dev->ka_lock, NULL);
    pthread_cond_init(&dev->ka_cond, NULL);
    dev->backend = be;
    dev->pid = getpid();
    dev->ka_interval = 1.0;
    dev->ka_last_submit = -1.0;

    dev->info.residency_enabled = 1;
    rc = be->open(dev, &dev->state, &dev->info);
    if (rc != CM_OK) {
        pthread_mutex_destroy(&dev->lock);
        pthread_mutex_destroy(&dev->cb_lock);
        pthread_mutex_destroy(&dev->submit_lock);
        pthread_cond_destroy(&dev->cb_cond);
        pthread_mutex_destroy(&dev->ka_lock);
        pthread_cond_destroy(&dev->ka_cond);
        free(dev);
        return rc;
    }
    dev->info.backend = be->kind;
    if (flags & CM_DEVICE_NO_RESIDENCY) {
        dev->info.residency_enabled = 0;
        snprintf(dev->info.residency_disabled_reason, CM_NAME_MAX,
                 "turned off by the caller (CM_DEVICE_NO_RESIDENCY)");
    }
    if (dev->info.residency_enabled)
        dev->info.residency_disabled_reason[0] = '\0';

    /* An eighth of the working set per shard keeps one set's commit cheap
     * while 32 shards still cover four times the working set. */
    dev->shard_cap = dev->info.recommended_max_working_set_size / 8;
    if (dev->shard_cap == 0)
        dev->shard_cap = (uint64_t)1 << 30;

    /* Host: the machine's RAM, beyond which the OS would swap or kill us.
     * Metal: unified memory lets a process go past the recommended working
     * set, at the price of paging; half as much again is where MLX-style
     * allocators stop too. */
    uint64_t limit;
    if (be->kind == CM_BACKEND_HOST) {
        limit = cm__physical_memory();
        if (limit == 0)
            limit = dev->info.recommended_max_working_set_size / 3 * 4;
    } else {
        uint64_t rec = dev->info.recommended_max_working_set_size;
        limit = rec + rec / 2;
    }
    if (limit == 0)
        limit = UINT64_MAX;
    atomic_store(&dev->memory_limit, limit);

    *out = dev;
    return CM_OK;
}

void cm__device_retain(cm_device_t *dev)
{
    atomic_fetch_add_explicit(&dev->refcount, 1, memory_order_relaxed);
}

static void device_destroy(cm_device_t *dev)
{
    /* In a child forked from the process that opened the device, the queue
     * and keep-alive threads did not survive the fork: joining them, or
     * destroying the condition variables they waited on (glibc waits for
     * the waiters), would hang the child's exit. Leave the record to the
     * child's exit instead. */
    if (getpid() != dev->pid)
        return;
    pthread_mutex_lock(&dev->ka_lock);
    dev->ka_stop = true;
    bool started = dev->ka_started;
    pthread_cond_broadcast(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
    if (started)
        pthread_join(dev->ka_thread, NULL);

    pthread_mutex_lock(&dev->lock);
    for (unsigned i = 0; i < dev->nshards; i++) {
        if (dev->shards[i].rset != NULL)
            dev->backend->rset_destroy(dev->state, dev->shards[i].rset);
        dev->shards[i].rset = NULL;
    }
    dev->nshards = 0;
    pthread_mutex_unlock(&dev->lock);

    dev->backend->close(dev->state);

    pthread_mutex_destroy(&dev->lock);
    pthread_mutex_destroy(&dev->cb_lock);
    pthread_mutex_destroy(&dev->submit_lock);
    pthread_cond_destroy(&dev->cb_cond);
    pthread_mutex_destroy(&dev->ka_lock);
    pthread_cond_destroy(&dev->ka_cond);
    free(dev);
}

void cm_device_release(cm_device_t *dev)
{
    if (dev == NULL)
        return;
    if (atomic_fetch_sub_explicit(&dev->refcount, 1, memory_order_acq_rel) == 1)
        device_destroy(dev);
}

int cm_device_info(cm_device_t *dev, cm_device_info_t *out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_info: NULL argument");
    *out = dev->info;
    return CM_OK;
}

int cm_device_stats(cm_device_t *dev, cm_device_stats_t *out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_stats: NULL argument");
    memset(out, 0, sizeof *out);
    out->active_bytes = atomic_load(&dev->active_bytes);
    out->peak_bytes = atomic_load(&dev->peak_bytes);
    out->live_storages = atomic_load(&dev->live_storages);
    out->cached_bytes = atomic_load(&dev->cached_bytes);
    out->cached_storages = atomic_load(&dev->cached_storages);
    out->memory_limit = atomic_load(&dev->memory_limit);
    out->alloc_count = atomic_load(&dev->alloc_count);
    out->free_count = atomic_load(&dev->free_count);
    pthread_mutex_lock(&dev->cb_lock);
    out->submitted = dev->submitted;
    out->completed = dev->completed;
    pthread_mutex_unlock(&dev->cb_lock);
    return CM_OK;
}

void cm_device_reset_peak(cm_device_t *dev)
{
    if (dev == NULL)
        return;
    atomic_store(&dev->peak_bytes, atomic_load(&dev->active_bytes));
}

int cm_device_set_memory_limit(cm_device_t *dev, uint64_t limit, uint64_t *old)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_set_memory_limit: device is NULL");
    if (limit == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "memory limit 0 would make every allocation fail; "
                        "the limit must be at least 1 byte");
    uint64_t prev = atomic_exchange(&dev->memory_limit, limit);
    if (old != NULL)
        *old = prev;
    return CM_OK;
}

int cm_device_synchronize(cm_device_t *dev)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_synchronize: device is NULL");
    pthread_mutex_lock(&dev->cb_lock);
    uint64_t target = dev->submitted;
    while (dev->completed < target) {
        pthread_cond_wait(&dev->cb_cond, &dev->cb_lock);
        /* A commit whose submit failed takes its number back (and
         * broadcasts): that buffer will never complete. */
        if (target > dev->submitted)
            target = dev->submitted;
    }
    pthread_mutex_unlock(&dev->cb_lock);
    return CM_OK;
}

int cm_device_debug_fail_alloc(cm_device_t *dev, uint64_t fail_nth, uint64_t min_bytes)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_debug_fail_alloc: device is NULL");
    pthread_mutex_lock(&dev->lock);
    dev->fail_nth = fail_nth;
    dev->fail_min = min_bytes;
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

/* True when fault injection says this allocation of len bytes fails. Every
 * call counts as one allocation for fail_nth. */
static bool fault_fires(cm_device_t *dev, uint64_t len)
{
    bool fire = false;
    pthread_mutex_lock(&dev->lock);
    if (dev->fail_min != 0 && len >= dev->fail_min)
        fire = true;
    if (dev->fail_nth != 0 && --dev->fail_nth == 0)
        fire = true;
    pthread_mutex_unlock(&dev->lock);
    return fire;
}

/* ------------------------------------------------------------------ */
/* Statistics                                                          */
/* ------------------------------------------------------------------ */

static void note_peak(cm_device_t *dev, uint64_t now)
{
    uint64_t peak = atomic_load_explicit(&dev->peak_bytes, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak(&dev->peak_bytes, &peak, now)) {
    }
}

/* Reserve len bytes of active memory under the limit. A compare-and-swap
 * instead of check-then-add, so two threads cannot both squeeze under the
 * limit with the last free bytes. */
static bool reserve_bytes(cm_device_t *dev, uint64_t len)
{
    uint64_t limit = atomic_load(&dev->memory_limit);
    uint64_t cur = atomic_load(&dev->active_bytes);
    do {
        if (cur > limit || len > limit - cur)
            return false;
    } while (!atomic_compare_exchange_weak(&dev->active_bytes, &cur, cur + len));
    note_peak(dev, cur + len);
    return true;
}

static void add_bytes(cm_device_t *dev, uint64_t len)
{
    uint64_t now = atomic_fetch_add(&dev->active_bytes, len) + len;
    note_peak(dev, now);
}

/* ------------------------------------------------------------------ */
/* Storages                                                            */
/* ------------------------------------------------------------------ */

int cm__storage_new(cm_device_t *dev, uint64_t len, int kind, cm_storage_t **out)
{
    *out = NULL;
    char b1[64], b2[64], b3[64];
    cm_storage_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot allocate %s: no host memory for the storage record",
                        BYTES(len, b1));
    char why[1024];
    cm_native_t native = NULL;
    uint8_t *contents = NULL;
    for (int attempt = 0;; attempt++) {
        if (fault_fires(dev, len)) {
            snprintf(why, sizeof why, "injected failure (cm_device_debug_fail_alloc)");
        } else if (!reserve_bytes(dev, len)) {
            snprintf(why, sizeof why, "%s in use, the device memory limit is %s",
                     BYTES(atomic_load(&dev->active_bytes), b2),
                     BYTES(atomic_load(&dev->memory_limit), b3));
        } else {
            int rc = dev->backend->buffer_alloc(dev->state, len, &native, &contents);
            if (rc == CM_OK)
                break;
            atomic_fetch_sub(&dev->active_bytes, len);
            snprintf(why, sizeof why, "%s (%s in use)", cm_last_error(),
                     BYTES(atomic_load(&dev->active_bytes), b2));
        }
        /* Cached pool storages are memory we can give back; retrying only
         * makes sense when that freed something. */
        if (attempt > 0 || cm__device_trim_pools(dev) == 0) {
            free(s);
            return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate %s: %s",
                            BYTES(len, b1), why);
        }
    }
    atomic_init(&s->refcount, 1);
    atomic_init(&s->inflight_writers, 0);
    cm__device_retain(dev);
    s->dev = dev;
    s->kind = kind;
    s->writable = 1;
    s->contents = contents;
    s->byte_len = len;
    s->requested_len = len;
    s->native = native;
    s->alloc_len = len;
    s->shard = -1;
    atomic_fetch_add(&dev->alloc_count, 1);
    atomic_fetch_add(&dev->live_storages, 1);
    *out = s;
    return CM_OK;
}

void cm__storage_destroy(cm_storage_t *s)
{
    cm_device_t *dev = s->dev;
    cm_pool_t *pool = s->pool;
    cm__residency_remove(dev, s);
    switch (s->kind) {
    case CM_STORAGE_DEVICE:
    case CM_STORAGE_POOLED:
        dev->backend->buffer_free(dev->state, s->native, s->contents, s->alloc_len);
        atomic_fetch_sub(&dev->active_bytes, s->byte_len);
        atomic_fetch_sub(&dev->live_storages, 1);
        atomic_fetch_add(&dev->free_count, 1);
        break;
    case CM_STORAGE_MAPPED:
        if (s->native != NULL)
            dev->backend->buffer_unwrap(dev->state, s->native);
        munmap(s->map_base, (size_t)s->map_len);
        atomic_fetch_sub(&dev->active_bytes, s->byte_len);
        atomic_fetch_sub(&dev->live_storages, 1);
        break;
    case CM_STORAGE_EXTERNAL:
    default:
        /* Wrapped memory and adopted native buffers both hold one native
         * reference that buffer_unwrap gives back. */
        if (s->native != NULL)
            dev->backend->buffer_unwrap(dev->state, s->native);
        if (s->ext_release != NULL)
            s->ext_release(s->ext_ctx);
        break;
    }
    free(s);
    if (pool != NULL)
        cm__pool_drop_ref(pool);
    cm_device_release(dev);
}

static void fill_alloc_result(cm_storage_t *s, cm_alloc_result_t *out)
{
    out->storage = s;
    out->contents = s->contents;
    out->byte_len = s->byte_len;
}

int cm_storage_alloc(cm_device_t *dev, uint64_t byte_len, cm_alloc_result_t *out)
{
    char b1[64], b2[64];
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_alloc: NULL argument");
    memset(out, 0, sizeof *out);
    if (byte_len == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot allocate 0 bytes: byte_len must be at least 1");
    if (byte_len > dev->info.max_buffer_length)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot allocate %s: device maximum buffer length is %s",
                        BYTES(byte_len, b1), BYTES(dev->info.max_buffer_length, b2));
    cm_storage_t *s;
    int rc = cm__storage_new(dev, byte_len, CM_STORAGE_DEVICE, &s);
    if (rc != CM_OK)
        return rc;
    rc = cm__residency_add(dev, s);
    if (rc != CM_OK) {
        cm__storage_destroy(s);
        return rc;
    }
    fill_alloc_result(s, out);
    return CM_OK;
}

void cm_storage_retain(cm_storage_t *s)
{
    if (s != NULL)
        atomic_fetch_add_explicit(&s->refcount, 1, memory_order_relaxed);
}

void cm_storage_release(cm_storage_t *s)
{
    if (s == NULL)
        return;
    if (atomic_fetch_sub_explicit(&s->refcount, 1, memory_order_acq_rel) != 1)
        return;
    if (s->pool != NULL && cm__pool_take_back(s->pool, s))
        return;
    cm__storage_destroy(s);
}

int cm_storage_info(cm_storage_t *s, cm_storage_info_t *out)
{
    if (s == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_info: NULL argument");
    memset(out, 0, sizeof *out);
    out->contents = s->contents;
    out->byte_len = s->byte_len;
    out->requested_len = s->requested_len;
    out->kind = s->kind;
    out->writable = s->writable;
    out->native_handle = s->native != NULL ? s->dev->backend->native_handle(s->native) : 0;
    out->native_offset = s->native_offset;
    out->refcount = atomic_load(&s->refcount);
    out->inflight_writers = atomic_load(&s->inflight_writers);
    pthread_mutex_lock(&s->dev->lock);
    out->shard = s->shard;
    out->resident = s->shard >= 0;
    pthread_mutex_unlock(&s->dev->lock);
    return CM_OK;
}

cm_device_t *cm_storage_device(cm_storage_t *s)
{
    return s != NULL ? s->dev : NULL;
}

int cm_storage_wait_idle(cm_storage_t *s)
{
    if (s == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_wait_idle: storage is NULL");
    if (atomic_load(&s->inflight_writers) == 0)
        return CM_OK;
    cm_device_t *dev = s->dev;
    pthread_mutex_lock(&dev->cb_lock);
    while (atomic_load(&s->inflight_writers) != 0)
        pthread_cond_wait(&dev->cb_cond, &dev->cb_lock);
    pthread_mutex_unlock(&dev->cb_lock);
    return CM_OK;
}

static cm_storage_t *storage_record(cm_device_t *dev, int kind)
{
    cm_storage_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    atomic_init(&s->refcount, 1);
    atomic_init(&s->inflight_writers, 0);
    s->dev = dev;
    s->kind = kind;
    s->shard = -1;
    return s;
}

int cm_storage_wrap_external(cm_device_t *dev, void *ptr, uint64_t byte_len,
                             int writable, void (*release)(void *ctx), void *ctx,
                             cm_alloc_result_t *out)
{
    char b1[64];
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_wrap_external: NULL argument");
    memset(out, 0, sizeof *out);
    if (ptr == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot wrap a NULL pointer");
    if (byte_len == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot wrap 0 bytes: byte_len must be at least 1");
    if (fault_fires(dev, byte_len))
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot wrap %s of external memory: injected failure "
                        "(cm_device_debug_fail_alloc)",
                        BYTES(byte_len, b1));
    cm_native_t native = NULL;
    int rc = dev->backend->buffer_wrap(dev->state, ptr, byte_len, &native);
    if (rc != CM_OK)
        return rc;
    cm_storage_t *s = storage_record(dev, CM_STORAGE_EXTERNAL);
    if (s == NULL) {
        dev->backend->buffer_unwrap(dev->state, native);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a storage record");
    }
    cm__device_retain(dev);
    s->writable = writable != 0;
    s->contents = ptr;
    s->byte_len = byte_len;
    s->requested_len = byte_len;
    s->native = native;
    s->ext_release = release;
    s->ext_ctx = ctx;
    fill_alloc_result(s, out);
    return CM_OK;
}

int cm_storage_wrap_native(cm_device_t *dev, uint64_t native_handle, cm_alloc_result_t *out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_wrap_native: NULL argument");
    memset(out, 0, sizeof *out);
    if (native_handle == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot wrap native handle 0");
    cm_native_t native = NULL;
    uint8_t *contents = NULL;
    uint64_t len = 0;
    int rc = dev->backend->buffer_adopt(dev->state, native_handle, &native, &contents, &len);
    if (rc != CM_OK)
        return rc;
    if (fault_fires(dev, len)) {
        dev->backend->buffer_unwrap(dev->state, native);
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot wrap native buffer 0x%llx: injected failure "
                        "(cm_device_debug_fail_alloc)",
                        (unsigned long long)native_handle);
    }
    cm_storage_t *s = storage_record(dev, CM_STORAGE_EXTERNAL);
    if (s == NULL) {
        dev->backend->buffer_unwrap(dev->state, native);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a storage record");
    }
    cm__device_retain(dev);
    s->writable = 1;
    s->contents = contents;
    s->byte_len = len;
    s->requested_len = len;
    s->native = native;
    fill_alloc_result(s, out);
    return CM_OK;
}

int cm_storage_map_file(cm_device_t *dev, int fd, uint64_t offset, uint64_t length,
                        int writable, cm_alloc_result_t *out)
{
    char b1[64], b2[64];
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_map_file: NULL argument");
    memset(out, 0, sizeof *out);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        return cm__fail(CM_ERR_IO, "cannot map file descriptor %d: %s", fd,
                        strerror(fd < 0 ? EBADF : errno));
    if (!S_ISREG(st.st_mode))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot map file descriptor %d: not a regular file", fd);
    uint64_t size = (uint64_t)st.st_size;
    if (offset > size)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "offset %llu is beyond the end of the %s file",
                        (unsigned long long)offset, BYTES(size, b1));
    if (length == 0)
        length = size - offset;
    if (length == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "nothing to map: offset %llu is the end of the %s file",
                        (unsigned long long)offset, BYTES(size, b1));
    if (length > size - offset)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "mapping %llu bytes at offset %llu exceeds the %s file",
                        (unsigned long long)length, (unsigned long long)offset,
                        BYTES(size, b1));
    uint64_t page = dev->info.page_size;
    uint64_t delta = offset % page;
    uint64_t aligned = offset - delta;
    /* length <= size < 2^63 (off_t), so delta + length + page cannot wrap. */
    uint64_t map_len = (delta + length + page - 1) / page * page;
    if (map_len > dev->info.max_buffer_length)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot map %s: device maximum buffer length is %s",
                        BYTES(length, b1), BYTES(dev->info.max_buffer_length, b2));
    if ((uint64_t)(size_t)map_len != map_len)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot map %s: larger than the address space",
                        BYTES(length, b1));
    if (fault_fires(dev, length))
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot map %s: injected failure (cm_device_debug_fail_alloc)",
                        BYTES(length, b1));
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *base = mmap(NULL, (size_t)map_len, prot, MAP_SHARED, fd, (off_t)aligned);
    if (base == MAP_FAILED)
        return cm__fail(CM_ERR_IO, "cannot map %s of file descriptor %d at offset %llu%s: %s",
                        BYTES(length, b1), fd, (unsigned long long)offset,
                        writable ? " for writing" : "", strerror(errno));
    cm_native_t native = NULL;
    int rc = dev->backend->buffer_wrap(dev->state, base, map_len, &native);
    if (rc != CM_OK) {
        munmap(base, (size_t)map_len);
        return rc;
    }
    cm_storage_t *s = storage_record(dev, CM_STORAGE_MAPPED);
    if (s == NULL) {
        dev->backend->buffer_unwrap(dev->state, native);
        munmap(base, (size_t)map_len);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a storage record");
    }
    cm__device_retain(dev);
    s->writable = writable != 0;
    s->contents = (uint8_t *)base + delta;
    s->byte_len = length;
    s->requested_len = length;
    s->native = native;
    s->native_offset = delta;
    s->map_base = base;
    s->map_len = map_len;
    /* Mapped pages are file-backed, so the OS can drop them under
     * pressure: they count in active_bytes but are not held to the memory
     * limit. */
    add_bytes(dev, length);
    atomic_fetch_add(&dev->live_storages, 1);
    rc = cm__residency_add(dev, s);
    if (rc != CM_OK) {
        cm__storage_destroy(s);
        return rc;
    }
    fill_alloc_result(s, out);
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Residency                                                           */
/* ------------------------------------------------------------------ */

static int shard_create_locked(cm_device_t *dev, unsigned index)
{
    void *rset = NULL;
    int rc = dev->backend->rset_create(dev->state, index, &rset);
    if (rc != CM_OK)
        return rc;
    cm_shard_t *sh = &dev->shards[index];
    memset(sh, 0, sizeof *sh);
    sh->rset = rset;
    dev->nshards = index + 1;
    return CM_OK;
}

/* A storage goes to the first shard with room under the cap (an empty
 * shard always has room), else to a new shard, else to the least-filled
 * one. Filling in order keeps most commits to the one or two shards that
 * churn. */
static int pick_shard_locked(cm_device_t *dev, uint64_t len, unsigned *out)
{
    for (unsigned i = 0; i < dev->nshards; i++) {
        uint64_t b = dev->shards[i].bytes;
        if (b == 0 || (b <= dev->shard_cap && len <= dev->shard_cap - b)) {
            *out = i;
            return CM_OK;
        }
    }
    if (dev->nshards < CM_MAX_RESIDENCY_SHARDS) {
        int rc = shard_create_locked(dev, dev->nshards);
        if (rc != CM_OK)
            return rc;
        *out = dev->nshards - 1;
        return CM_OK;
    }
    unsigned best = 0;
    for (unsigned i = 1; i < dev->nshards; i++)
        if (dev->shards[i].bytes < dev->shards[best].bytes)
            best = i;
    *out = best;
    return CM_OK;
}

int cm__residency_add(cm_device_t *dev, cm_storage_t *s)
{
    if (!dev->info.residency_enabled)
        return CM_OK;
    if (s->native == NULL)
        return cm__fail(CM_ERR_RESIDENCY,
                        "cannot register a storage without a native buffer");
    pthread_mutex_lock(&dev->lock);
    if (s->shard >= 0) {
        pthread_mutex_unlock(&dev->lock);
        return CM_OK;
    }
    unsigned idx;
    int rc = pick_shard_locked(dev, s->byte_len, &idx);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&dev->lock);
        return rc;
    }
    cm_shard_t *sh = &dev->shards[idx];
    dev->backend->rset_add(sh->rset, s->native);
    sh->count++;
    sh->bytes += s->byte_len;
    sh->pending = true;
    s->shard = (int)idx;
    dev->rs_adds++;
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

void cm__residency_remove(cm_device_t *dev, cm_storage_t *s)
{
    pthread_mutex_lock(&dev->lock);
    if (s->shard >= 0) {
        cm_shard_t *sh = &dev->shards[s->shard];
        dev->backend->rset_remove(sh->rset, s->native);
        sh->count--;
        sh->bytes -= s->byte_len;
        sh->pending = true;
        s->shard = -1;
        dev->rs_removes++;
    }
    pthread_mutex_unlock(&dev->lock);
}

static void shard_commit_locked(cm_device_t *dev, cm_shard_t *sh)
{
    dev->backend->rset_commit(sh->rset);
    sh->committed_count = sh->count;
    sh->commit_count++;
    sh->pending = false;
    dev->rs_commit_count++;
}

int cm_residency_info(cm_device_t *dev, cm_residency_info_t *out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_info: NULL argument");
    memset(out, 0, sizeof *out);
    out->enabled = dev->info.residency_enabled;
    pthread_mutex_lock(&dev->lock);
    for (unsigned i = 0; i < dev->nshards; i++) {
        const cm_shard_t *sh = &dev->shards[i];
        out->allocation_count += sh->count;
        out->committed_allocation_count += sh->committed_count;
        out->allocated_size += sh->bytes;
        out->pending |= sh->pending;
    }
    out->commit_count = dev->rs_commit_count;
    out->staged_adds = dev->rs_adds;
    out->staged_removes = dev->rs_removes;
    out->shard_count = dev->nshards;
    out->shard_cap_bytes = dev->shard_cap;
    out->keepalive_requests = dev->keepalive_requests;
    pthread_mutex_unlock(&dev->lock);
    pthread_mutex_lock(&dev->ka_lock);
    out->keepalive_seconds = dev->ka_seconds;
    out->keepalive_interval = dev->ka_interval;
    pthread_mutex_unlock(&dev->ka_lock);
    return CM_OK;
}

int cm_residency_shard_info(cm_device_t *dev, uint64_t index, cm_residency_shard_info_t *out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_shard_info: NULL argument");
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&dev->lock);
    if (index >= dev->nshards) {
        unsigned n = dev->nshards;
        pthread_mutex_unlock(&dev->lock);
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "residency shard %llu does not exist: the device has %u",
                        (unsigned long long)index, n);
    }
    const cm_shard_t *sh = &dev->shards[index];
    out->allocation_count = sh->count;
    out->committed_allocation_count = sh->committed_count;
    out->allocated_size = sh->bytes;
    out->pending = sh->pending;
    out->commit_count = sh->commit_count;
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

static int residency_off(cm_device_t *dev)
{
    return cm__fail(CM_ERR_RESIDENCY, "residency is off on this device: %s",
                    dev->info.residency_disabled_reason);
}

int cm_residency_commit(cm_device_t *dev)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_commit: device is NULL");
    if (!dev->info.residency_enabled)
        return residency_off(dev);
    pthread_mutex_lock(&dev->lock);
    /* An explicit commit always counts, even before anything was staged,
     * so callers can rely on commit_count moving. */
    if (dev->nshards == 0) {
        int rc = shard_create_locked(dev, 0);
        if (rc != CM_OK) {
            pthread_mutex_unlock(&dev->lock);
            return rc;
        }
    }
    for (unsigned i = 0; i < dev->nshards; i++)
        shard_commit_locked(dev, &dev->shards[i]);
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

int cm_residency_flush(cm_device_t *dev, uint64_t *committed)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_flush: device is NULL");
    uint64_t n = 0;
    if (dev->info.residency_enabled) {
        pthread_mutex_lock(&dev->lock);
        for (unsigned i = 0; i < dev->nshards; i++) {
            if (dev->shards[i].pending) {
                shard_commit_locked(dev, &dev->shards[i]);
                n++;
            }
        }
        pthread_mutex_unlock(&dev->lock);
    }
    if (committed != NULL)
        *committed = n;
    return CM_OK;
}

int cm_residency_contains(cm_device_t *dev, cm_storage_t *s, int *out)
{
    if (dev == NULL || s == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_contains: NULL argument");
    if (s->dev != dev) {
        *out = 0;
        return CM_OK;
    }
    pthread_mutex_lock(&dev->lock);
    *out = s->shard >= 0;
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

int cm_residency_register(cm_device_t *dev, cm_storage_t *s)
{
    if (dev == NULL || s == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_register: NULL argument");
    if (s->dev != dev)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot register a storage of another device (%s) in this "
                        "device's residency set (%s)",
                        s->dev->info.name, dev->info.name);
    if (!dev->info.residency_enabled)
        return residency_off(dev);
    return cm__residency_add(dev, s);
}

int cm_residency_set_shard_cap(cm_device_t *dev, uint64_t cap_bytes, uint64_t *old)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_set_shard_cap: device is NULL");
    if (cap_bytes == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "residency shard cap 0 is too small: it must be at least 1 byte");
    pthread_mutex_lock(&dev->lock);
    uint64_t prev = dev->shard_cap;
    dev->shard_cap = cap_bytes;
    pthread_mutex_unlock(&dev->lock);
    if (old != NULL)
        *old = prev;
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Keep-alive                                                          */
/* ------------------------------------------------------------------ */

static void keepalive_request(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->lock);
    for (unsigned i = 0; i < dev->nshards; i++) {
        dev->backend->rset_request(dev->shards[i].rset);
        dev->keepalive_requests++;
    }
    pthread_mutex_unlock(&dev->lock);
}

/* Condition variables take absolute CLOCK_REALTIME deadlines everywhere
 * (macOS has no pthread_condattr_setclock), so convert a relative wait. */
static void ka_timedwait_locked(cm_device_t *dev, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double whole = (double)(long long)seconds;
    long long ns = (long long)((seconds - whole) * 1e9) + ts.tv_nsec;
    ts.tv_sec += (time_t)whole + (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&dev->ka_cond, &dev->ka_lock, &ts);
}

static void *keepalive_main(void *arg)
{
    cm_device_t *dev = arg;
    pthread_mutex_lock(&dev->ka_lock);
    while (!dev->ka_stop) {
        double now = cm__now();
        bool active = dev->ka_seconds > 0 && dev->ka_last_submit >= 0 &&
                      now - dev->ka_last_submit < dev->ka_seconds;
        if (!active) {
            pthread_cond_wait(&dev->ka_cond, &dev->ka_lock);
            continue;
        }
        pthread_mutex_unlock(&dev->ka_lock);
        keepalive_request(dev);
        pthread_mutex_lock(&dev->ka_lock);
        /* Wake-ups from submissions must not shorten the interval, or a
         * busy queue would turn keep-alive into a request storm. */
        double deadline = cm__now() + dev->ka_interval;
        while (!dev->ka_stop && dev->ka_seconds > 0) {
            double left = deadline - cm__now();
            if (left <= 0)
                break;
            ka_timedwait_locked(dev, left);
        }
    }
    pthread_mutex_unlock(&dev->ka_lock);
    return NULL;
}

int cm_residency_set_keepalive(cm_device_t *dev, double seconds, double interval)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_set_keepalive: device is NULL");
    /* Written to reject NaN too. */
    if (!(seconds >= 0 && seconds <= 1e9))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "keep-alive duration %g s is out of range: expected 0 (off) "
                        "to 1e9 s",
                        seconds);
    if (seconds > 0 && !(interval >= 1e-3 && interval <= 1e9))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "keep-alive interval %g s is out of range: expected 0.001 to 1e9 s",
                        interval);
    if (seconds > 0 && !dev->info.residency_enabled)
        return residency_off(dev);
    pthread_mutex_lock(&dev->ka_lock);
    if (seconds > 0 && !dev->ka_started) {
        int err = pthread_create(&dev->ka_thread, NULL, keepalive_main, dev);
        if (err != 0) {
            pthread_mutex_unlock(&dev->ka_lock);
            return cm__fail(CM_ERR_OUT_OF_MEMORY,
                            "cannot start the keep-alive thread: %s", strerror(err));
        }
        dev->ka_started = true;
    }
    dev->ka_seconds = seconds;
    if (seconds > 0)
        dev->ka_interval = interval;
    pthread_cond_broadcast(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
    return CM_OK;
}

static void keepalive_note_submit(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->ka_lock);
    dev->ka_last_submit = cm__now();
    if (dev->ka_started && dev->ka_seconds > 0)
        pthread_cond_signal(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
}

/* ------------------------------------------------------------------ */
/* Command buffers                                                     */
/* ------------------------------------------------------------------ */

int cm_cmdbuf_create(cm_device_t *dev, cm_cmdbuf_t **out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_create: NULL argument");
    *out = NULL;
    cm_cmdbuf_t *cb = calloc(1, sizeof *cb);
    if (cb == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a command buffer record");
    atomic_init(&cb->refcount, 1);
    pthread_mutex_init(&cb->enc_lock, NULL);
    cm__device_retain(dev);
    cb->dev = dev;
    cb->status = CM_CB_NOT_COMMITTED;
    *out = cb;
    return CM_OK;
}

static int cb_status(cm_cmdbuf_t *cb)
{
    pthread_mutex_lock(&cb->dev->cb_lock);
    int st = cb->status;
    pthread_mutex_unlock(&cb->dev->cb_lock);
    return st;
}

/* Pointer sets: open addressing, linear probing, at most half full, never
 * shrunk or deleted from, so a lookup is a few probes. They keep holds and
 * writes free of duplicates in O(1) per encoded operand. */
static size_t pset_slot(cm_storage_t *p, size_t cap)
{
    uint64_t h = (uint64_t)(uintptr_t)p;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & (cap - 1);
}

static bool pset_insert(cm_storage_t **tab, size_t cap, cm_storage_t *p)
{
    size_t i = pset_slot(p, cap);
    while (tab[i] != NULL) {
        if (tab[i] == p)
            return false;
        i = (i + 1) & (cap - 1);
    }
    tab[i] = p;
    return true;
}

static bool pset_reserve(cm_storage_t ***tab, size_t *cap, size_t count, size_t extra)
{
    size_t need = count + extra;
    if (need * 2 <= *cap)
        return true;
    size_t ncap = *cap ? *cap : 16;
    while (ncap < need * 2)
        ncap *= 2;
    cm_storage_t **nt = calloc(ncap, sizeof *nt);
    if (nt == NULL)
        return false;
    for (size_t i = 0; i < *cap; i++)
        if ((*tab)[i] != NULL)
            pset_insert(nt, ncap, (*tab)[i]);
    free(*tab);
    *tab = nt;
    *cap = ncap;
    return true;
}

static bool array_reserve(void **arr, size_t *cap, size_t count, size_t extra, size_t elem)
{
    if (count + extra <= *cap)
        return true;
    size_t ncap = *cap ? *cap * 2 : 8;
    while (ncap < count + extra)
        ncap *= 2;
    void *n = realloc(*arr, ncap * elem);
    if (n == NULL)
        return false;
    *arr = n;
    *cap = ncap;
    return true;
}

/* Make room for one more op touching up to n storages, so that recording
 * it afterwards cannot fail halfway (encoding errors change nothing). */
static int cb_reserve_locked(cm_cmdbuf_t *cb, size_t n)
{
    if (!array_reserve((void **)&cb->ops, &cb->ops_cap, cb->nops, 1, sizeof *cb->ops) ||
        !array_reserve((void **)&cb->holds, &cb->holds_cap, cb->nholds, n,
                       sizeof *cb->holds) ||
        !array_reserve((void **)&cb->writes, &cb->writes_cap, cb->nwrites, n,
                       sizeof *cb->writes) ||
        !pset_reserve(&cb->hold_set, &cb->hold_set_cap, cb->nholds, n) ||
        !pset_reserve(&cb->write_set, &cb->write_set_cap, cb->nwrites, n))
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot grow the command buffer's op list");
    return CM_OK;
}

static void cb_hold_locked(cm_cmdbuf_t *cb, cm_storage_t *s, bool write)
{
    if (pset_insert(cb->hold_set, cb->hold_set_cap, s)) {
        cm_storage_retain(s);
        cb->holds[cb->nholds++] = s;
    }
    if (write && pset_insert(cb->write_set, cb->write_set_cap, s))
        cb->writes[cb->nwrites++] = s;
}

/* Lock the encoder and check it still accepts work. */
static int cb_begin(cm_cmdbuf_t *cb, const char *what)
{
    pthread_mutex_lock(&cb->enc_lock);
    int st = cb_status(cb);
    if (st == CM_CB_NOT_COMMITTED)
        return CM_OK;
    pthread_mutex_unlock(&cb->enc_lock);
    return cm__fail(CM_ERR_COMMAND_BUFFER,
                    "cannot %s: the command buffer was already %s; encode into a new one",
                    what, st == CM_CB_DISCARDED ? "discarded" : "committed");
}

static int check_storage(cm_cmdbuf_t *cb, cm_storage_t *s, const char *role)
{
    if (s == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "%s storage is NULL", role);
    if (s->dev != cb->dev)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "%s storage belongs to another device (%s) than the command "
                        "buffer (%s)",
                        role, s->dev->info.name, cb->dev->info.name);
    return CM_OK;
}

static int check_range(cm_storage_t *s, uint64_t offset, uint64_t nbytes, const char *what,
                       const char *role)
{
    char b1[64];
    if (offset > s->byte_len || nbytes > s->byte_len - offset)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "%s of %llu bytes at byte %llu exceeds the %s %s storage", what,
                        (unsigned long long)nbytes, (unsigned long long)offset,
                        BYTES(s->byte_len, b1), role);
    return CM_OK;
}

static int copy_check(cm_cmdbuf_t *cb, cm_storage_t *src, uint64_t src_offset,
                      cm_storage_t *dst, uint64_t dst_offset, uint64_t nbytes)
{
    int rc;
    if ((rc = check_storage(cb, src, "source")) != CM_OK ||
        (rc = check_storage(cb, dst, "destination")) != CM_OK ||
        (rc = check_range(src, src_offset, nbytes, "copy", "source")) != CM_OK ||
        (rc = check_range(dst, dst_offset, nbytes, "copy", "destination")) != CM_OK)
        return rc;
    if (!dst->writable)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot copy into a read-only storage");
    /* A blit between overlapping ranges is undefined on Metal, so refuse
     * it on every backend rather than let the host's memmove hide it. */
    if (src == dst && nbytes > 0 && src_offset < dst_offset + nbytes &&
        dst_offset < src_offset + nbytes)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "copy of %llu bytes from byte %llu to byte %llu of the same "
                        "storage: the ranges overlap",
                        (unsigned long long)nbytes, (unsigned long long)src_offset,
                        (unsigned long long)dst_offset);
    return CM_OK;
}

int cm_cmdbuf_copy(cm_cmdbuf_t *cb, cm_storage_t *src, uint64_t src_offset,
                   cm_storage_t *dst, uint64_t dst_offset, uint64_t nbytes)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_copy: command buffer is NULL");
    int rc = cb_begin(cb, "encode a copy");
    if (rc != CM_OK)
        return rc;
    rc = copy_check(cb, src, src_offset, dst, dst_offset, nbytes);
    /* Zero bytes touch nothing: nothing to run, nothing to hold. */
    if (rc == CM_OK && nbytes > 0 && (rc = cb_reserve_locked(cb, 2)) == CM_OK) {
        cm_op_t *op = &cb->ops[cb->nops++];
        memset(op, 0, sizeof *op);
        op->kind = CM_OP_COPY;
        op->src = src;
        op->dst = dst;
        op->src_offset = src_offset;
        op->dst_offset = dst_offset;
        op->nbytes = nbytes;
        cb_hold_locked(cb, src, false);
        cb_hold_locked(cb, dst, true);
    }
    pthread_mutex_unlock(&cb->enc_lock);
    return rc;
}

static int fill_check(cm_cmdbuf_t *cb, cm_storage_t *s, uint64_t offset, uint64_t nbytes,
                      int value)
{
    int rc;
    if ((rc = check_storage(cb, s, "fill")) != CM_OK ||
        (rc = check_range(s, offset, nbytes, "fill", "target")) != CM_OK)
        return rc;
    if (value < 0 || value > 255)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "fill value %d is not a byte: expected 0 to 255", value);
    if (!s->writable)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot fill a read-only storage");
    return CM_OK;
}

int cm_cmdbuf_fill(cm_cmdbuf_t *cb, cm_storage_t *s, uint64_t offset, uint64_t nbytes,
                   int value)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_fill: command buffer is NULL");
    int rc = cb_begin(cb, "encode a fill");
    if (rc != CM_OK)
        return rc;
    rc = fill_check(cb, s, offset, nbytes, value);
    if (rc == CM_OK && nbytes > 0 && (rc = cb_reserve_locked(cb, 1)) == CM_OK) {
        cm_op_t *op = &cb->ops[cb->nops++];
        memset(op, 0, sizeof *op);
        op->kind = CM_OP_FILL;
        op->dst = s;
        op->dst_offset = offset;
        op->nbytes = nbytes;
        op->value = value;
        cb_hold_locked(cb, s, true);
    }
    pthread_mutex_unlock(&cb->enc_lock);
    return rc;
}

static void op_free_arrays(cm_op_t *op)
{
    free(op->bufs);
    free(op->offsets);
    free(op->consts);
    free(op->const_sizes);
    op->bufs = NULL;
    op->offsets = NULL;
    op->consts = NULL;
    op->const_sizes = NULL;
}

static int dispatch_check(cm_cmdbuf_t *cb, cm_kernel_t *kernel, const uint64_t *grid,
                          const uint64_t *threadgroup, cm_storage_t *const *bufs,
                          const uint64_t *offsets, size_t nbufs, const uint8_t *constants,
                          const uint64_t *const_sizes, size_t nconsts, uint64_t *const_total)
{
    if (kernel == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot dispatch a NULL kernel");
    if (kernel->dev != cb->dev)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "kernel '%s' belongs to another device than the command buffer",
                        kernel->info.name);
    if (grid == NULL || threadgroup == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "grid and threadgroup sizes are required");
    uint64_t tg_total = 1;
    for (int i = 0; i < 3; i++) {
        if (grid[i] == 0 || threadgroup[i] == 0)
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "grid (%llu, %llu, %llu) and threadgroup (%llu, %llu, %llu) "
                            "must be at least 1 in every dimension",
                            (unsigned long long)grid[0], (unsigned long long)grid[1],
                            (unsigned long long)grid[2], (unsigned long long)threadgroup[0],
                            (unsigned long long)threadgroup[1],
                            (unsigned long long)threadgroup[2]);
        if (threadgroup[i] > UINT64_MAX / tg_total)
            tg_total = UINT64_MAX;
        else
            tg_total *= threadgroup[i];
    }
    uint64_t tg_max = kernel->info.max_total_threads_per_threadgroup;
    if (tg_max != 0 && tg_total > tg_max)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "threadgroup of %llu threads exceeds kernel '%s' maximum of %llu",
                        (unsigned long long)tg_total, kernel->info.name,
                        (unsigned long long)tg_max);
    if (nbufs > CM_MAX_KERNEL_ARGS || nconsts > CM_MAX_KERNEL_ARGS - nbufs)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "%zu buffers and %zu constants exceed the %d argument slots",
                        nbufs, nconsts, CM_MAX_KERNEL_ARGS);
    if (nbufs > 0 && bufs == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "%zu buffers given but bufs is NULL", nbufs);
    int rc;
    for (size_t i = 0; i < nbufs; i++) {
        char role[32];
        snprintf(role, sizeof role, "buffer %zu's", i);
        if ((rc = check_storage(cb, bufs[i], role)) != CM_OK)
            return rc;
        uint64_t off = offsets != NULL ? offsets[i] : 0;
        if (off >= bufs[i]->byte_len) {
            char b1[64];
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "buffer %zu binds at byte %llu, past the end of its %s storage",
                            i, (unsigned long long)off, BYTES(bufs[i]->byte_len, b1));
        }
    }
    if (nconsts > 0 && (constants == NULL || const_sizes == NULL))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "%zu constants given but constants or const_sizes is NULL", nconsts);
    *const_total = 0;
    for (size_t i = 0; i < nconsts; i++) {
        if (const_sizes[i] == 0 || const_sizes[i] > CM_MAX_CONSTANT_BYTES)
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "constant %zu has %llu bytes: expected 1 to %d (pass bigger "
                            "data in a buffer)",
                            i, (unsigned long long)const_sizes[i], CM_MAX_CONSTANT_BYTES);
        *const_total += const_sizes[i];
    }
    return CM_OK;
}

int cm_cmdbuf_dispatch(cm_cmdbuf_t *cb, cm_kernel_t *kernel, const uint64_t *grid,
                       const uint64_t *threadgroup, cm_storage_t *const *bufs,
                       const uint64_t *offsets, size_t nbufs, const uint8_t *constants,
                       const uint64_t *const_sizes, size_t nconsts)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_dispatch: command buffer is NULL");
    int rc = cb_begin(cb, "encode a dispatch");
    if (rc != CM_OK)
        return rc;
    uint64_t const_total = 0;
    rc = dispatch_check(cb, kernel, grid, threadgroup, bufs, offsets, nbufs, constants,
                        const_sizes, nconsts, &const_total);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&cb->enc_lock);
        return rc;
    }
    cm_op_t op;
    memset(&op, 0, sizeof op);
    op.kind = CM_OP_DISPATCH;
    op.kernel = kernel;
    for (int i = 0; i < 3; i++) {
        op.grid[i] = grid[i];
        op.threadgroup[i] = threadgroup[i];
    }
    op.nbufs = nbufs;
    op.nconsts = nconsts;
    op.bufs = nbufs ? malloc(nbufs * sizeof *op.bufs) : NULL;
    op.offsets = nbufs ? malloc(nbufs * sizeof *op.offsets) : NULL;
    op.consts = nconsts ? malloc((size_t)const_total) : NULL;
    op.const_sizes = nconsts ? malloc(nconsts * sizeof *op.const_sizes) : NULL;
    if ((nbufs && (op.bufs == NULL || op.offsets == NULL)) ||
        (nconsts && (op.consts == NULL || op.const_sizes == NULL)))
        rc = cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot copy the dispatch arguments");
    if (rc == CM_OK)
        rc = cb_reserve_locked(cb, nbufs);
    if (rc != CM_OK) {
        op_free_arrays(&op);
        pthread_mutex_unlock(&cb->enc_lock);
        return rc;
    }
    for (size_t i = 0; i < nbufs; i++) {
        op.bufs[i] = bufs[i];
        op.offsets[i] = offsets != NULL ? offsets[i] : 0;
    }
    if (nconsts) {
        memcpy(op.consts, constants, (size_t)const_total);
        memcpy(op.const_sizes, const_sizes, nconsts * sizeof *op.const_sizes);
    }
    atomic_fetch_add(&kernel->refcount, 1);
    cb->ops[cb->nops++] = op;
    /* The core cannot see which arguments a kernel writes, so every bound
     * buffer counts as written. */
    for (size_t i = 0; i < nbufs; i++)
        cb_hold_locked(cb, bufs[i], true);
    pthread_mutex_unlock(&cb->enc_lock);
    return CM_OK;
}

/* Release what the ops and holds keep: kernel references, argument copies
 * and storage references. The storages may be destroyed here (residency
 * removal staged, pooled storages back in their pool), so no lock may be
 * held by the caller except cb->enc_lock. */
static void cb_release_holds(cm_cmdbuf_t *cb)
{
    for (size_t i = 0; i < cb->nops; i++) {
        cm_op_t *op = &cb->ops[i];
        if (op->kind == CM_OP_DISPATCH) {
            cm_kernel_release(op->kernel);
            op->kernel = NULL;
            op_free_arrays(op);
        }
    }
    for (size_t i = 0; i < cb->nholds; i++)
        cm_storage_release(cb->holds[i]);
}

static void cb_free(cm_cmdbuf_t *cb)
{
    cm_device_t *dev = cb->dev;
    if (cb->status == CM_CB_NOT_COMMITTED)
        cb_release_holds(cb);
    free(cb->ops);
    free(cb->holds);
    free(cb->writes);
    free(cb->hold_set);
    free(cb->write_set);
    free(cb->error);
    pthread_mutex_destroy(&cb->enc_lock);
    free(cb);
    cm_device_release(dev);
}

void cm_cmdbuf_release(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return;
    if (atomic_fetch_sub_explicit(&cb->refcount, 1, memory_order_acq_rel) == 1)
        cb_free(cb);
}

int cm_cmdbuf_commit(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_commit: command buffer is NULL");
    cm_device_t *dev = cb->dev;
    int rc = cb_begin(cb, "commit");
    if (rc != CM_OK)
        return rc;
    /* The one point where staged residency changes are applied: whatever
     * was added since the last submission is resident before this runs. */
    uint64_t committed;
    pthread_mutex_lock(&dev->submit_lock);
    rc = cm_residency_flush(dev, &committed);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&dev->submit_lock);
        pthread_mutex_unlock(&cb->enc_lock);
        return rc;
    }
    for (size_t i = 0; i < cb->nwrites; i++)
        atomic_fetch_add(&cb->writes[i]->inflight_writers, 1);
    /* The submission's own reference, dropped by cm__cmdbuf_complete. */
    atomic_fetch_add(&cb->refcount, 1);
    /* The status moves before submit: the backend may complete the buffer
     * before submit returns. */
    pthread_mutex_lock(&dev->cb_lock);
    cb->status = CM_CB_COMMITTED;
    cb->seq = ++dev->submitted;
    pthread_mutex_unlock(&dev->cb_lock);
    rc = dev->backend->submit(dev->state, cb);
    if (rc != CM_OK) {
        for (size_t i = 0; i < cb->nwrites; i++)
            atomic_fetch_sub(&cb->writes[i]->inflight_writers, 1);
        pthread_mutex_lock(&dev->cb_lock);
        cb->status = CM_CB_NOT_COMMITTED;
        dev->submitted--;
        pthread_cond_broadcast(&dev->cb_cond);
        pthread_mutex_unlock(&dev->cb_lock);
        atomic_fetch_sub(&cb->refcount, 1);
        pthread_mutex_unlock(&dev->submit_lock);
        pthread_mutex_unlock(&cb->enc_lock);
        return rc;
    }
    pthread_mutex_unlock(&dev->submit_lock);
    pthread_mutex_unlock(&cb->enc_lock);
    keepalive_note_submit(dev);
    return CM_OK;
}

void cm__cmdbuf_complete(cm_cmdbuf_t *cb, int status, const char *message)
{
    cm_device_t *dev = cb->dev;
    /* Writers drop first: their storages are still held, so the counters
     * are live memory; after the holds go they may not be. */
    for (size_t i = 0; i < cb->nwrites; i++)
        atomic_fetch_sub(&cb->writes[i]->inflight_writers, 1);
    /* Holds go before the status changes, so whoever wakes from wait()
     * finds the storages back in their pools and removals staged. */
    cb_release_holds(cb);
    char *err = NULL;
    if (status != CM_OK)
        err = strdup(message != NULL && message[0] ? message : "the command buffer failed");
    pthread_mutex_lock(&dev->cb_lock);
    cb->nholds = 0;
    cb->nwrites = 0;
    if (status == CM_OK) {
        cb->status = CM_CB_COMPLETED;
    } else {
        cb->status = CM_CB_ERROR;
        cb->error = err;
    }
    dev->completed++;
    pthread_cond_broadcast(&dev->cb_cond);
    pthread_mutex_unlock(&dev->cb_lock);
    cm_cmdbuf_release(cb);
}

int cm_cmdbuf_wait(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_wait: command buffer is NULL");
    cm_device_t *dev = cb->dev;
    pthread_mutex_lock(&dev->cb_lock);
    if (cb->status == CM_CB_NOT_COMMITTED || cb->status == CM_CB_DISCARDED) {
        bool discarded = cb->status == CM_CB_DISCARDED;
        pthread_mutex_unlock(&dev->cb_lock);
        return cm__fail(CM_ERR_COMMAND_BUFFER,
                        "cannot wait: the command buffer was %s; commit it first",
                        discarded ? "discarded" : "never committed");
    }
    while (cb->status == CM_CB_COMMITTED)
        pthread_cond_wait(&dev->cb_cond, &dev->cb_lock);
    if (cb->status == CM_CB_ERROR) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", cb->error != NULL ? cb->error : "unknown error");
        pthread_mutex_unlock(&dev->cb_lock);
        return cm__fail(CM_ERR_COMMAND_BUFFER, "command buffer failed: %s", msg);
    }
    pthread_mutex_unlock(&dev->cb_lock);
    return CM_OK;
}

int cm_cmdbuf_discard(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_discard: command buffer is NULL");
    pthread_mutex_lock(&cb->enc_lock);
    int st = cb_status(cb);
    if (st == CM_CB_DISCARDED) {
        pthread_mutex_unlock(&cb->enc_lock);
        return CM_OK;
    }
    if (st != CM_CB_NOT_COMMITTED) {
        pthread_mutex_unlock(&cb->enc_lock);
        return cm__fail(CM_ERR_COMMAND_BUFFER,
                        "cannot discard a command buffer that was already committed");
    }
    cb_release_holds(cb);
    pthread_mutex_lock(&cb->dev->cb_lock);
    cb->nholds = 0;
    cb->nwrites = 0;
    cb->nops = 0;
    cb->status = CM_CB_DISCARDED;
    pthread_mutex_unlock(&cb->dev->cb_lock);
    pthread_mutex_unlock(&cb->enc_lock);
    return CM_OK;
}

int cm_cmdbuf_status(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return CM_CB_ERROR;
    return cb_status(cb);
}

uint64_t cm_cmdbuf_op_count(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return 0;
    pthread_mutex_lock(&cb->enc_lock);
    pthread_mutex_lock(&cb->dev->cb_lock);
    uint64_t n = cb->nops;
    pthread_mutex_unlock(&cb->dev->cb_lock);
    pthread_mutex_unlock(&cb->enc_lock);
    return n;
}

uint64_t cm_cmdbuf_hold_count(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return 0;
    /* Encoders change nholds under enc_lock, completion under cb_lock. */
    pthread_mutex_lock(&cb->enc_lock);
    pthread_mutex_lock(&cb->dev->cb_lock);
    uint64_t n = cb->nholds;
    pthread_mutex_unlock(&cb->dev->cb_lock);
    pthread_mutex_unlock(&cb->enc_lock);
    return n;
}

/* ------------------------------------------------------------------ */
/* Compute                                                             */
/* ------------------------------------------------------------------ */

int cm_library_compile(cm_device_t *dev, const char *source, cm_library_t **out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_library_compile: NULL argument");
    *out = NULL;
    if (source == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "shader source is NULL");
    void *native = NULL;
    int rc = dev->backend->library_compile(dev->state, source, &native);
    if (rc != CM_OK)
        return rc;
    cm_library_t *lib = calloc(1, sizeof *lib);
    if (lib == NULL) {
        dev->backend->library_release(native);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a library record");
    }
    atomic_init(&lib->refcount, 1);
    pthread_mutex_init(&lib->lock, NULL);
    cm__device_retain(dev);
    lib->dev = dev;
    lib->native = native;
    *out = lib;
    return CM_OK;
}

void cm_library_release(cm_library_t *lib)
{
    if (lib == NULL)
        return;
    if (atomic_fetch_sub_explicit(&lib->refcount, 1, memory_order_acq_rel) != 1)
        return;
    cm_kernel_t *k = lib->kernels;
    while (k != NULL) {
        cm_kernel_t *next = k->cache_next;
        cm_kernel_release(k);
        k = next;
    }
    cm_device_t *dev = lib->dev;
    dev->backend->library_release(lib->native);
    pthread_mutex_destroy(&lib->lock);
    free(lib);
    cm_device_release(dev);
}

int cm_library_kernel(cm_library_t *lib, const char *name, cm_kernel_t **out)
{
    if (lib == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_library_kernel: NULL argument");
    *out = NULL;
    if (name == NULL || name[0] == '\0')
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "kernel name is empty");
    size_t len = strlen(name);
    if (len >= CM_NAME_MAX)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "kernel name of %zu characters exceeds the limit of %d", len,
                        CM_NAME_MAX - 1);
    pthread_mutex_lock(&lib->lock);
    for (cm_kernel_t *k = lib->kernels; k != NULL; k = k->cache_next) {
        if (strcmp(k->info.name, name) == 0) {
            atomic_fetch_add(&k->refcount, 1);
            pthread_mutex_unlock(&lib->lock);
            *out = k;
            return CM_OK;
        }
    }
    cm_device_t *dev = lib->dev;
    cm_kernel_t *k = calloc(1, sizeof *k);
    if (k == NULL) {
        pthread_mutex_unlock(&lib->lock);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a kernel record");
    }
    int rc = dev->backend->kernel_create(dev->state, lib->native, name, &k->pipeline, &k->info);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&lib->lock);
        free(k);
        return rc;
    }
    snprintf(k->info.name, CM_NAME_MAX, "%s", name);
    atomic_init(&k->refcount, 2); /* the cache's and the caller's */
    cm__device_retain(dev);
    k->dev = dev;
    k->cache_next = lib->kernels;
    lib->kernels = k;
    pthread_mutex_unlock(&lib->lock);
    *out = k;
    return CM_OK;
}

void cm_kernel_release(cm_kernel_t *k)
{
    if (k == NULL)
        return;
    if (atomic_fetch_sub_explicit(&k->refcount, 1, memory_order_acq_rel) != 1)
        return;
    cm_device_t *dev = k->dev;
    dev->backend->kernel_release(k->pipeline);
    free(k);
    cm_device_release(dev);
}

int cm_kernel_info(cm_kernel_t *k, cm_kernel_info_t *out)
{
    if (k == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_kernel_info: NULL argument");
    *out = k->info;
    return CM_OK;
}
