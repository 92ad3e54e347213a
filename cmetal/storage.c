/*
 * storage.c -- storages: one allocation each, made by the backend
 * (cm_storage_alloc), wrapped from caller memory or a native buffer, or
 * mapped from a file; their reference count, and their end (back to
 * their owner, a pool, or freed with their residency removal staged).
 *
 * Owns the storage record and dev->live_storages / alloc_count /
 * free_count. Takes dev->lock to read storage->shard (cm_storage_info)
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

int cm__storage_new(cm_device_t *dev, uint64_t len, int kind, cm_storage_t **out)
{
    *out = NULL;
    char b1[64], b2[64], b3[64];
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
    for (int attempt = 0;; attempt++) {
        if (cm__memory_fault_fires(dev, len)) {
            snprintf(why, sizeof why, "injected failure (cm_device_debug_fail_alloc)");
        } else if (!cm__memory_reserve(dev, len)) {
            snprintf(why, sizeof why, "%s in use, the device memory limit is %s",
                     BYTES(atomic_load(&dev->active_bytes), b2),
                     BYTES(atomic_load(&dev->memory_limit), b3));
        } else {
            int rc = dev->backend->buffer_alloc(dev->state, len, &native, &contents);
            if (rc == CM_OK)
                break;
            cm__memory_release(dev, len);
            snprintf(why, sizeof why, "%s (%s in use)", cm_last_error(),
                     BYTES(atomic_load(&dev->active_bytes), b2));
        }
        /* The device's caches (pools) hold memory we can give back;
         * retrying only makes sense when that freed something. */
        if (attempt > 0 || cm__memory_trim(dev) == 0) {
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
    const cm_storage_owner_t *owner_hooks = s->owner_hooks;
    void *owner = s->owner;
    bool backend_frees = cm__fork_may_free(dev);
    cm__residency_remove(dev, s);
    switch (s->kind) {
    case CM_STORAGE_DEVICE:
    case CM_STORAGE_POOLED:
        if (backend_frees)
            dev->backend->buffer_free(dev->state, s->native, s->contents, s->alloc_len);
        cm__memory_release(dev, s->byte_len);
        atomic_fetch_sub(&dev->live_storages, 1);
        atomic_fetch_add(&dev->free_count, 1);
        break;
    case CM_STORAGE_MAPPED:
        if (s->native != NULL && backend_frees)
            dev->backend->buffer_unwrap(dev->state, s->native);
        munmap(s->map_base, (size_t)s->map_len);
        cm__memory_release(dev, s->byte_len);
        atomic_fetch_sub(&dev->live_storages, 1);
        break;
    case CM_STORAGE_EXTERNAL:
    default:
        /* Wrapped memory and adopted native buffers both hold one native
         * reference that buffer_unwrap gives back. */
        if (s->native != NULL && backend_frees)
            dev->backend->buffer_unwrap(dev->state, s->native);
        if (s->ext_release != NULL)
            s->ext_release(s->ext_ctx);
        break;
    }
    free(s);
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
    int rc = cm__fork_refuse(dev, "wrap memory");
    if (rc != CM_OK)
        return rc;
    if (cm__memory_fault_fires(dev, byte_len))
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot wrap %s of external memory: injected failure "
                        "(cm_device_debug_fail_alloc)",
                        BYTES(byte_len, b1));
    cm_native_t native = NULL;
    rc = dev->backend->buffer_wrap(dev->state, ptr, byte_len, &native);
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
    int rc = cm__fork_refuse(dev, "wrap a native buffer");
    if (rc != CM_OK)
        return rc;
    cm_native_t native = NULL;
    uint8_t *contents = NULL;
    uint64_t len = 0;
    rc = dev->backend->buffer_adopt(dev->state, native_handle, &native, &contents, &len);
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
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *base = mmap(NULL, (size_t)map_len, prot, MAP_SHARED, fd, (off_t)aligned);
    if (base == MAP_FAILED)
        return cm__fail(CM_ERR_IO, "cannot map %s of file descriptor %d at offset %llu%s: %s",
                        BYTES(length, b1), fd, (unsigned long long)offset,
                        writable ? " for writing" : "", strerror(errno));
    cm_native_t native = NULL;
    rc = dev->backend->buffer_wrap(dev->state, base, map_len, &native);
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
    cm__memory_add(dev, length);
    atomic_fetch_add(&dev->live_storages, 1);
    rc = cm__residency_add(dev, s);
    if (rc != CM_OK) {
        cm__storage_destroy(s);
        return rc;
    }
    fill_alloc_result(s, out);
    return CM_OK;
}
