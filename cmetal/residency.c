/*
 * residency.c -- residency staging and sharding. A storage's add or
 * removal is staged in one shard (one backend residency set) and applied
 * by a commit; the commit of a command buffer flushes only the shards
 * with something pending.
 *
 * Owns dev->shards, nshards, shard_cap, the residency counters and
 * storage->shard, all under dev->lock, which every function here takes
 * (and calls the backend's residency primitives under). cm_residency_info
 * also reads the keep-alive settings under dev->ka_lock, a leaf. Lock
 * order: LOCKING.md.
 */
#include "internal.h"

#include <string.h>

void cm__residency_init(cm_device_t *dev)
{
    /* An eighth of the working set per shard keeps one set's commit cheap
     * while 32 shards still cover four times the working set. */
    dev->shard_cap = dev->info.recommended_max_working_set_size / 8;
    if (dev->shard_cap == 0)
        dev->shard_cap = (uint64_t)1 << 30;
}

void cm__residency_close(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->lock);
    for (unsigned i = 0; i < dev->nshards; i++) {
        if (dev->shards[i].rset != NULL)
            dev->backend->rset_destroy(dev->state, dev->shards[i].rset);
        dev->shards[i].rset = NULL;
    }
    dev->nshards = 0;
    pthread_mutex_unlock(&dev->lock);
}

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
    /* In a forked child, an inherited device's set is the parent's GPU
     * state: nothing here will ever commit it, and its backend objects are
     * not this process's to touch (fork.c). Its books stay as the fork
     * left them. */
    if (dev->inherited)
        return;
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

int cm__residency_off(cm_device_t *dev)
{
    return cm__fail(CM_ERR_RESIDENCY, "residency is off on this device: %s",
                    dev->info.residency_disabled_reason);
}

int cm_residency_commit(cm_device_t *dev)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_commit: device is NULL");
    if (!dev->info.residency_enabled)
        return cm__residency_off(dev);
    int rc = cm__fork_refuse(dev, "commit the residency set");
    if (rc != CM_OK)
        return rc;
    pthread_mutex_lock(&dev->lock);
    /* An explicit commit always counts, even before anything was staged,
     * so callers can rely on commit_count moving. */
    if (dev->nshards == 0) {
        rc = shard_create_locked(dev, 0);
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
    int rc = cm__fork_refuse(dev, "flush the residency set");
    if (rc != CM_OK)
        return rc;
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
        return cm__residency_off(dev);
    int rc = cm__fork_refuse(dev, "register a storage in the residency set");
    if (rc != CM_OK)
        return rc;
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

void cm__residency_request(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->lock);
    for (unsigned i = 0; i < dev->nshards; i++) {
        dev->backend->rset_request(dev->shards[i].rset);
        dev->keepalive_requests++;
    }
    pthread_mutex_unlock(&dev->lock);
}

