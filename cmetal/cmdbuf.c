/*
 * cmdbuf.c -- command buffers: encoding copies, fills and dispatches with
 * a hold on every storage they touch, committing (the one point where
 * staged residency is applied), completion, waiting and discarding.
 *
 * Owns the command-buffer record. Takes cb->enc_lock around encoding and
 * commit, dev->submit_lock from the residency flush through the backend's
 * submit, dev->lock through residency.c, and dev->cb_lock (a leaf) for
 * states and counters; a commit calls the backend's prepare, which may
 * block, before it takes any of them. Holds are released with no lock held but
 * cb->enc_lock, since a release can destroy a storage. Lock order:
 * LOCKING.md.
 *
 * Over 600 lines on purpose: encoding, commit and completion share the
 * command-buffer record and its lock protocol, and splitting them would
 * spread that protocol over files that each see half of it.
 *
 * On a device inherited through fork() (fork.c) every call that would
 * encode, submit or wait fails before it takes a lock: the buffer's
 * enc_lock may be held by a thread that did not survive the fork, and
 * the queue that would complete it stayed in the parent. Dropping the
 * last reference still releases an uncommitted buffer's holds.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Constant blobs go through setBytes:length:atIndex:, which Apple limits
 * to 4 KiB; bigger constants belong in a buffer. */
#define CM_MAX_CONSTANT_BYTES 4096

/* Metal binds a device-space buffer at an offset aligned to the argument's
 * data type (setBuffer:offset:atIndex:); a kernel's reflection gives that
 * alignment per argument, and where it says nothing, or less, a word is
 * what a kernel reading floats or ints needs. */
#define CM_MIN_BIND_ALIGNMENT 4

static void cmdbuf_complete(cm_cmdbuf_t *cb, int status, const char *message);

int cm_cmdbuf_create(cm_device_t *dev, cm_cmdbuf_t **out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_create: NULL argument");
    *out = NULL;
    int rc = cm__fork_refuse(dev, "create a command buffer");
    if (rc != CM_OK)
        return rc;
    cm_cmdbuf_t *cb = calloc(1, sizeof *cb);
    if (cb == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a command buffer record");
    atomic_init(&cb->refcount, 1);
    pthread_mutex_init(&cb->enc_lock, NULL);
    cm__device_retain(dev);
    cb->dev = dev;
    cb->status = CM_CB_NOT_COMMITTED;
    cb->complete = cmdbuf_complete;
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
    int rc = cm__fork_refuse(cb->dev, what);
    if (rc != CM_OK)
        return rc;
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

/* Offsets are checked where the backend binds them: from the native
 * buffer's start, which a file mapping puts at the page before its first
 * byte. */
static int check_bind_alignment(const cm_kernel_t *kernel, size_t i, const cm_storage_t *s,
                                uint64_t off)
{
    uint64_t need = kernel->info.buffer_alignment[i];
    if (need < CM_MIN_BIND_ALIGNMENT)
        need = CM_MIN_BIND_ALIGNMENT;
    uint64_t bound = off + s->native_offset;
    if (bound % need == 0)
        return CM_OK;
    char where[64] = "";
    if (s->native_offset != 0)
        snprintf(where, sizeof where, " (byte %llu of its native buffer)",
                 (unsigned long long)bound);
    return cm__fail(CM_ERR_INVALID_ARGUMENT,
                    "buffer %zu binds at byte offset %llu%s, but kernel '%s' needs the "
                    "offset of buffer %zu aligned to %llu bytes (its element alignment, at "
                    "least 4): bind an aligned copy instead (Buffer.copy() makes one at "
                    "offset 0)",
                    i, (unsigned long long)off, where, kernel->info.name, i,
                    (unsigned long long)need);
}

static const char *read_only_what(const cm_storage_t *s)
{
    return s->kind == CM_STORAGE_MAPPED ? "a read-only file mapping" : "read-only memory";
}

static int dispatch_check(cm_cmdbuf_t *cb, cm_kernel_t *kernel, const uint64_t *grid,
                          const uint64_t *threadgroup, cm_storage_t *const *bufs,
                          const uint64_t *offsets, const uint8_t *writes, size_t nbufs,
                          const uint8_t *constants, const uint64_t *const_sizes,
                          size_t nconsts, uint64_t *const_total)
{
    if (kernel == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot dispatch a NULL kernel");
    if (kernel->dev != cb->dev)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "kernel '%s' belongs to another device than the command buffer",
                        kernel->info.name);
    int rc = cm__kernel_check_launch(kernel, grid, threadgroup);
    if (rc != CM_OK)
        return rc;
    if (nbufs > CM_MAX_KERNEL_ARGS || nconsts > CM_MAX_KERNEL_ARGS - nbufs)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "%zu buffers and %zu constants exceed the %d argument slots",
                        nbufs, nconsts, CM_MAX_KERNEL_ARGS);
    if (nbufs > 0 && bufs == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "%zu buffers given but bufs is NULL", nbufs);
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
        if ((rc = check_bind_alignment(kernel, i, bufs[i], off)) != CM_OK)
            return rc;
        if ((writes == NULL || writes[i]) && !bufs[i]->writable)
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "buffer %zu is %s, which kernel '%s' may not write, %s",
                            i, read_only_what(bufs[i]), kernel->info.name,
                            writes == NULL ? "and without writes= every buffer counts as "
                                             "written: pass writes= with the indices of the "
                                             "buffers the kernel writes"
                                           : "but writes= lists it");
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
                       const uint64_t *offsets, const uint8_t *writes, size_t nbufs,
                       const uint8_t *constants, const uint64_t *const_sizes,
                       size_t nconsts)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_dispatch: command buffer is NULL");
    int rc = cb_begin(cb, "encode a dispatch");
    if (rc != CM_OK)
        return rc;
    uint64_t const_total = 0;
    rc = dispatch_check(cb, kernel, grid, threadgroup, bufs, offsets, writes, nbufs, constants,
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
    /* Only what the kernel writes makes its storage wait for the GPU
     * (cm_storage_wait_idle); the caller says which, or every buffer. */
    for (size_t i = 0; i < nbufs; i++)
        cb_hold_locked(cb, bufs[i], writes == NULL || writes[i] != 0);
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

static void unprepare(cm_device_t *dev, void *prepared)
{
    if (prepared != NULL)
        dev->backend->unprepare(dev->state, prepared);
}

int cm_cmdbuf_commit(cm_cmdbuf_t *cb)
{
    if (cb == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_cmdbuf_commit: command buffer is NULL");
    cm_device_t *dev = cb->dev;
    int rc = cm__fork_refuse(dev, "commit");
    if (rc != CM_OK)
        return rc;
    /* What may block (Metal makes the caller wait for a command buffer
     * while its queue has 64 uncompleted) is made before any lock is
     * taken, so a commit waiting for the GPU stalls no other thread: not
     * this buffer's readers, not other commits, not fork() (LOCKING.md).
     * A buffer already committed is not worth the wait; cb_begin checks
     * again under the lock. */
    void *prepared = NULL;
    if (dev->backend->prepare != NULL && cb_status(cb) == CM_CB_NOT_COMMITTED &&
        (rc = dev->backend->prepare(dev->state, &prepared)) != CM_OK)
        return rc;
    rc = cb_begin(cb, "commit");
    if (rc != CM_OK) {
        unprepare(dev, prepared);
        return rc;
    }
    /* The one point where staged residency changes are applied: whatever
     * was added since the last submission is resident before this runs.
     * What the commit let go is given back once no lock is held (an
     * external owner's release is code from outside the core). */
    cm_storage_t *released;
    pthread_mutex_lock(&dev->submit_lock);
    rc = cm__residency_flush_detach(dev, &released);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&dev->submit_lock);
        pthread_mutex_unlock(&cb->enc_lock);
        unprepare(dev, prepared);
        cm__residency_give_back(dev, released);
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
    rc = dev->backend->submit(dev->state, cb, prepared);
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
        cm__residency_give_back(dev, released);
        return rc;
    }
    pthread_mutex_unlock(&dev->submit_lock);
    pthread_mutex_unlock(&cb->enc_lock);
    cm__residency_give_back(dev, released);
    cm__keepalive_note_submit(dev);
    return CM_OK;
}

/* The completion every command buffer carries (cb->complete), run by the
 * backend through cm__cmdbuf_complete. */
static void cmdbuf_complete(cm_cmdbuf_t *cb, int status, const char *message)
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
    int rc = cm__fork_refuse(dev, "wait for a command buffer");
    if (rc != CM_OK)
        return rc;
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
    int rc = cm__fork_refuse(cb->dev, "discard a command buffer");
    if (rc != CM_OK)
        return rc;
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

/* A count of cb read under both locks that change it: encoders hold
 * enc_lock, completion cb_lock. On an inherited device nothing encodes any
 * more and enc_lock may be held by a thread that did not survive the fork,
 * so cb_lock alone is taken there. */
static uint64_t cb_count(cm_cmdbuf_t *cb, const size_t *count)
{
    bool encoders = !cb->dev->inherited;
    if (encoders)
        pthread_mutex_lock(&cb->enc_lock);
    pthread_mutex_lock(&cb->dev->cb_lock);
    uint64_t n = *count;
    pthread_mutex_unlock(&cb->dev->cb_lock);
    if (encoders)
        pthread_mutex_unlock(&cb->enc_lock);
    return n;
}

uint64_t cm_cmdbuf_op_count(cm_cmdbuf_t *cb)
{
    return cb != NULL ? cb_count(cb, &cb->nops) : 0;
}

uint64_t cm_cmdbuf_hold_count(cm_cmdbuf_t *cb)
{
    return cb != NULL ? cb_count(cb, &cb->nholds) : 0;
}
