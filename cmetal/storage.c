/*
 * storage.c -- storages: one allocation each, made by the backend
 * (cm_storage_alloc), wrapped from caller memory or a native buffer, or
 * mapped from a file; their reference count, and their end (back to
 * their owner, a pool, or freed with their residency removal staged).
 *
 * Owns the storage record and dev->live_storages / alloc_count /
 * free_count. Takes dev->lock to read storage->member (cm_storage_info)
 * and through memory.c and residency.c, and dev->cb_lock to wait for
 * in-flight writers. A storage is destroyed with no lock held. Lock order:
 * LOCKING.md.
 *
 * In a forked child, a storage of an inherited device (fork.c) keeps its
 * memory, which the child may read and write, and its last reference
 * releases it; the backend frees the memory only if it said it can in the
 * child (cm__fork_may_free), else the memory is left to the child's exit.
 * Nothing new is made on an inherited device.
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
#include <unistd.h>

/* The bytes an allocation of len takes, as far as the device knows before
 * asking the backend: whole pages. */
static uint64_t page_guess(const cm_device_t *dev, uint64_t len)
{
    uint64_t page = dev->info.page_size;
    return len > UINT64_MAX - (page - 1) ? len : (len + page - 1) / page * page;
}

/* Reserve and allocate len bytes, holding what the backend really took
 * (*allocated) to the memory limit; *why says why not. */
static int allocate_once(cm_device_t *dev, uint64_t len, cm_native_t *native,
                         uint8_t **contents, uint64_t *allocated, char *why, size_t cap)
{
    char b1[64], b2[64], b3[64], b4[64];
    uint64_t guess = page_guess(dev, len);
    if (cm__memory_fault_fires(dev, len)) {
        snprintf(why, cap, "injected failure (cm_device_debug_fail_alloc)");
        return CM_ERR_OUT_OF_MEMORY;
    }
    if (!cm__memory_reserve(dev, guess)) {
        snprintf(why, cap, "%s in use and %s waiting for a residency commit, the device "
                 "memory limit is %s",
                 BYTES(atomic_load(&dev->active_bytes), b1),
                 BYTES(atomic_load(&dev->deferred_bytes), b2),
                 BYTES(atomic_load(&dev->memory_limit), b3));
        return CM_ERR_OUT_OF_MEMORY;
    }
    int rc = dev->backend->buffer_alloc(dev->state, len, native, contents, allocated);
    if (rc != CM_OK) {
        cm__memory_release(dev, guess);
        snprintf(why, cap, "%s (%s in use)", cm_last_error(),
                 BYTES(atomic_load(&dev->active_bytes), b1));
        return rc;
    }
    if (*allocated <= guess) {
        cm__memory_release(dev, guess - *allocated);
        return CM_OK;
    }
    /* The backend took more than whole pages of the process (Metal's
     * allocation granule can be coarser): the rest must fit too. */
    if (cm__memory_reserve(dev, *allocated - guess))
        return CM_OK;
    dev->backend->buffer_free(dev->state, *native, *contents, len);
    cm__memory_release(dev, guess);
    snprintf(why, cap, "it takes %s, %s in use and %s waiting for a residency commit, the "
             "device memory limit is %s",
             BYTES(*allocated, b1), BYTES(atomic_load(&dev->active_bytes), b2),
             BYTES(atomic_load(&dev->deferred_bytes), b3),
             BYTES(atomic_load(&dev->memory_limit), b4));
    return CM_ERR_OUT_OF_MEMORY;
}

int cm__storage_new(cm_device_t *dev, uint64_t len, int kind, cm_storage_t **out)
{
    *out = NULL;
    char b1[64];
    int refused = cm__fork_refuse(dev, "allocate");
    if (refused != CM_OK)
        return refused;
    cm_storage_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot allocate %s: no host memory for the storage record",
                        BYTES(len, b1));
    char why[1024];
    cm_native_t native = NULL;
    uint8_t *contents = NULL;
    uint64_t allocated = 0;
    for (int attempt = 0;; attempt++) {
        if (allocate_once(dev, len, &native, &contents, &allocated, why, sizeof why) == CM_OK)
            break;
        /* The device's caches (pools) hold memory we can give back, and
         * freed memory may wait for the residency commit that removes it
         * (a trimmed cache's too); retrying only makes sense when that
         * gave something back. */
        if (attempt > 0 || cm__memory_trim(dev) + cm__residency_flush_deferred(dev) == 0) {
            free(s);
            return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate %s: %s", BYTES(len, b1),
                            why);
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
    s->allocated = allocated;
    s->native = native;
    s->alloc_len = len;
    atomic_fetch_add(&dev->alloc_count, 1);
    atomic_fetch_add(&dev->live_storages, 1);
    *out = s;
    return CM_OK;
}

void cm__storage_destroy(cm_storage_t *s)
{
    cm_device_t *dev = s->dev;
    const cm_storage_owner_t *owner_hooks = s->owner_hooks;
    void *owner = s->owner;
    if (s->kind != CM_STORAGE_EXTERNAL)
        atomic_fetch_sub(&dev->live_storages, 1);
    /* Once deferred, s belongs to the release list: not touched again. */
    switch (cm__residency_remove(dev, s)) {
    case CM_REMOVAL_NONE:
        cm__memory_give_back(dev, s);
        break;
    case CM_REMOVAL_FIRST:
        cm__release_timer_arm(dev);
        break;
    case CM_REMOVAL_OVER:
        cm__residency_flush_deferred(dev);
        break;
    default:
        break;
    }
    if (owner != NULL)
        owner_hooks->release(owner);
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
    /* Out of memory, not a bad argument: the request is well formed but
     * the device cannot satisfy it (numpy raises MemoryError alike). */
    if (byte_len > dev->info.max_buffer_length)
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
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
    if (s->owner != NULL && s->owner_hooks->take_back(s->owner, s))
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
    out->allocated_size = s->allocated;
    out->kind = s->kind;
    out->writable = s->writable;
    out->native_handle = s->native != NULL ? s->dev->backend->native_handle(s->native) : 0;
    out->native_offset = s->native_offset;
    out->refcount = atomic_load(&s->refcount);
    out->inflight_writers = atomic_load(&s->inflight_writers);
    pthread_mutex_lock(&s->dev->lock);
    out->shard = s->member != NULL ? (int)s->member->shard : -1;
    out->resident = s->member != NULL;
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
    /* In a forked child the writers never finish: they were the parent's. */
    int rc = cm__fork_refuse(dev, "wait for the command buffers writing this storage");
    if (rc != CM_OK)
        return rc;
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
    return s;
}

/* A storage over memory the backend wraps: the record comes first, so that
 * once the backend holds the release (which it runs when the native
 * object dies) nothing can fail. On failure nothing was released. */
static int wrap_memory(cm_device_t *dev, int kind, void *ptr, uint64_t len,
                       void (*release)(void *ctx), void *ctx, cm_storage_t **out)
{
    cm_storage_t *s = storage_record(dev, kind);
    if (s == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a storage record");
    int rc = dev->backend->buffer_wrap(dev->state, ptr, len, release, ctx, &s->native,
                                       &s->allocated);
    if (rc != CM_OK) {
        free(s);
        return rc;
    }
    cm__device_retain(dev);
    s->contents = ptr;
    s->byte_len = len;
    s->requested_len = len;
    s->ext_release = release;
    s->ext_ctx = ctx;
    s->backend_releases = true;
    *out = s;
    return CM_OK;
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
    int rc = cm__fork_refuse(dev, "wrap memory");
    if (rc != CM_OK)
        return rc;
    if (cm__memory_fault_fires(dev, byte_len))
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot wrap %s of external memory: injected failure "
                        "(cm_device_debug_fail_alloc)",
                        BYTES(byte_len, b1));
    cm_storage_t *s;
    rc = wrap_memory(dev, CM_STORAGE_EXTERNAL, ptr, byte_len, release, ctx, &s);
    if (rc != CM_OK)
        return rc;
    s->writable = writable != 0;
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
    int rc = cm__fork_refuse(dev, "wrap a native buffer");
    if (rc != CM_OK)
        return rc;
    cm_native_t native = NULL;
    uint8_t *contents = NULL;
    uint64_t len = 0, allocated = 0;
    rc = dev->backend->buffer_adopt(dev->state, native_handle, &native, &contents, &len,
                                    &allocated);
    if (rc != CM_OK)
        return rc;
    if (cm__memory_fault_fires(dev, len)) {
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
    s->untracked = dev->backend->native_untracked != NULL && dev->backend->native_untracked(native);
    s->contents = contents;
    s->byte_len = len;
    s->requested_len = len;
    s->allocated = allocated;
    s->native = native;
    fill_alloc_result(s, out);
    return CM_OK;
}

/* A file mapping's pages, given back when nothing may touch them. */
typedef struct cm_region {
    void *base;
    size_t len;
} cm_region_t;

static void unmap_region(void *ctx)
{
    cm_region_t *r = ctx;
    munmap(r->base, r->len);
    free(r);
}

int cm_storage_map_file(cm_device_t *dev, int fd, uint64_t offset, uint64_t length,
                        int writable, cm_alloc_result_t *out)
{
    char b1[64], b2[64];
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_storage_map_file: NULL argument");
    memset(out, 0, sizeof *out);
    int rc = cm__fork_refuse(dev, "map a file");
    if (rc != CM_OK)
        return rc;
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
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot map %s: device maximum buffer length is %s",
                        BYTES(length, b1), BYTES(dev->info.max_buffer_length, b2));
    if ((uint64_t)(size_t)map_len != map_len)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot map %s: larger than the address space",
                        BYTES(length, b1));
    if (cm__memory_fault_fires(dev, length))
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot map %s: injected failure (cm_device_debug_fail_alloc)",
                        BYTES(length, b1));
    cm_region_t *region = malloc(sizeof *region);
    if (region == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a mapping record");
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *base = mmap(NULL, (size_t)map_len, prot, MAP_SHARED, fd, (off_t)aligned);
    if (base == MAP_FAILED) {
        int err = errno;
        free(region);
        return cm__fail(CM_ERR_IO, "cannot map %s of file descriptor %d at offset %llu%s: %s",
                        BYTES(length, b1), fd, (unsigned long long)offset,
                        writable ? " for writing" : "", strerror(err));
    }
    region->base = base;
    region->len = (size_t)map_len;
    cm_storage_t *s;
    rc = wrap_memory(dev, CM_STORAGE_MAPPED, base, map_len, unmap_region, region, &s);
    if (rc != CM_OK) {
        unmap_region(region);
        return rc;
    }
    s->writable = writable != 0;
    s->contents = (uint8_t *)base + delta;
    s->byte_len = length;
    s->requested_len = length;
    s->native_offset = delta;
    /* Mapped pages are file-backed, so the OS can drop them under
     * pressure: they count in active_bytes but are not held to the memory
     * limit. */
    cm__memory_add(dev, s->allocated);
    atomic_fetch_add(&dev->live_storages, 1);
    rc = cm__residency_add(dev, s);
    if (rc != CM_OK) {
        cm__storage_destroy(s);
        return rc;
    }
    fill_alloc_result(s, out);
    return CM_OK;
}
