/*
 * residency.c -- residency staging, membership and sharding, and the
 * deferred release of what a residency set still holds.
 *
 * Membership is per native allocation (backend.h, allocation_of): an
 * MTLBuffer however many storages share it (one buffer adopted twice), or
 * the heap its buffers were cut from, which a set makes resident as a
 * whole. The set ignores a second add of one allocation and one remove
 * ends its membership, so the core counts the storages of each member and
 * stages the removal only when the last one goes. A member's add or
 * removal is staged in one shard (one backend residency set) and applied
 * by a commit; the commit of a command buffer flushes only the shards
 * with something pending.
 *
 * A set holds its members until their removal is committed, so a dead
 * storage's native object and memory wait in the device's release list
 * until the commit of the shard its removal was staged in, and are given
 * back right after it (cm__memory_give_back), with no lock held. That
 * commit comes no later than the next submission, the moment the bytes
 * waiting pass the release threshold, or the idle timeout
 * (residency_thread.c): the bound on how long freed memory stays held.
 *
 * A failure of a backend residency primitive is returned to the caller
 * when there is one (an add, an explicit commit); when there is none (a
 * removal staged by a dying storage, a commit by the threshold or the
 * timer, a keep-alive request) the first one is recorded on the device
 * and returned by the next commit, flush or submission, which also
 * retries the work: a shard whose commit failed stays pending, and a
 * removal that failed is owed (its storage keeps its member) and staged
 * again before the next commit.
 *
 * Near 700 lines on purpose: staging, membership and deferred release are
 * three views of one commit (what it adds, what it removes, what it gives
 * back) under one lock; apart, each file would hold half of that commit.
 *
 * Owns dev->shards, nshards, shard_cap, the members, the release list,
 * the residency counters and error, and storage->member, all under
 * dev->lock, which every function here takes (and calls the backend's
 * residency primitives under). cm_residency_info also reads the
 * residency thread's settings under dev->rt_lock, a leaf. Lock order:
 * LOCKING.md.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MIB ((uint64_t)1 << 20)

/* grave_commit of a waiting storage whose allocation stayed in the set. */
#define NO_COMMIT_NEEDED UINT64_MAX

double cm__now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void cm__residency_init(cm_device_t *dev)
{
    /* An eighth of the working set per shard keeps one set's commit cheap
     * while 32 shards still cover four times the working set. */
    dev->shard_cap = dev->info.recommended_max_working_set_size / 8;
    if (dev->shard_cap == 0)
        dev->shard_cap = (uint64_t)1 << 30;
    /* 64 MiB waiting is a few hundred scratch buffers of a decode token
     * (which the next submission commits anyway) but stops a program that
     * frees large buffers and stops submitting from holding them long. */
    dev->release_threshold = 64 * MIB;
    dev->release_idle = 1.0;
    dev->flush_at = -1.0;
}

/* ------------------------------------------------------------------ */
/* Failures no caller can receive                                      */
/* ------------------------------------------------------------------ */

/* Keep this thread's last failure (a backend primitive's) for the next
 * commit, unless an earlier one waits already. */
static void note_failure_locked(cm_device_t *dev, const char *what)
{
    if (dev->rs_error != CM_OK)
        return;
    dev->rs_error = CM_ERR_RESIDENCY;
    snprintf(dev->rs_error_msg, sizeof dev->rs_error_msg, "%s failed earlier: %s", what,
             cm_last_error());
}

/* Take the recorded failure: its status, its message in msg. */
static int take_failure_locked(cm_device_t *dev, char *msg, size_t cap)
{
    int rc = dev->rs_error;
    if (rc != CM_OK) {
        snprintf(msg, cap, "%s", dev->rs_error_msg);
        dev->rs_error = CM_OK;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Members: a chained hash by allocation                               */
/* ------------------------------------------------------------------ */

static size_t bucket_of(const void *allocation, size_t buckets)
{
    uint64_t h = (uint64_t)(uintptr_t)allocation;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & (buckets - 1);
}

static cm_member_t *member_find_locked(cm_device_t *dev, const void *allocation)
{
    if (dev->member_buckets == 0)
        return NULL;
    cm_member_t *m = dev->members[bucket_of(allocation, dev->member_buckets)];
    while (m != NULL && m->allocation != allocation)
        m = m->next;
    return m;
}

/* Grow the table before it is fuller than one member per bucket. */
static int members_reserve_locked(cm_device_t *dev)
{
    if (dev->member_count < dev->member_buckets)
        return CM_OK;
    size_t n = dev->member_buckets ? dev->member_buckets * 2 : 64;
    cm_member_t **table = calloc(n, sizeof *table);
    if (table == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot grow the residency member table");
    for (size_t i = 0; i < dev->member_buckets; i++) {
        cm_member_t *m = dev->members[i];
        while (m != NULL) {
            cm_member_t *next = m->next;
            size_t b = bucket_of(m->allocation, n);
            m->next = table[b];
            table[b] = m;
            m = next;
        }
    }
    free(dev->members);
    dev->members = table;
    dev->member_buckets = n;
    return CM_OK;
}

static void member_unlink_locked(cm_device_t *dev, cm_member_t *m)
{
    cm_member_t **at = &dev->members[bucket_of(m->allocation, dev->member_buckets)];
    while (*at != m)
        at = &(*at)->next;
    *at = m->next;
    dev->member_count--;
}

/* A storage registers an allocation whose removal is owed: the membership
 * lives on, and the waiting storage that owed it needs no commit. */
static void cancel_owed_locked(cm_device_t *dev, cm_member_t *m)
{
    for (cm_storage_t *s = dev->grave_head; s != NULL; s = s->grave_next) {
        if (s->member == m) {
            s->member = NULL;
            s->grave_commit = NO_COMMIT_NEEDED;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Shards                                                              */
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

/* A member goes to the first shard with room under the cap (an empty
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

static int shard_commit_locked(cm_device_t *dev, cm_shard_t *sh)
{
    int rc = dev->backend->rset_commit(sh->rset);
    if (rc != CM_OK)
        return rc;
    sh->committed_count = sh->count;
    sh->commit_count++;
    sh->pending = false;
    dev->rs_commit_count++;
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Staging                                                             */
/* ------------------------------------------------------------------ */

int cm__residency_add(cm_device_t *dev, cm_storage_t *s)
{
    if (!dev->info.residency_enabled)
        return CM_OK;
    if (s->native == NULL)
        return cm__fail(CM_ERR_RESIDENCY,
                        "cannot register a storage without a native buffer");
    pthread_mutex_lock(&dev->lock);
    if (s->member != NULL) {
        pthread_mutex_unlock(&dev->lock);
        return CM_OK;
    }
    void *allocation = NULL;
    uint64_t size = 0;
    dev->backend->allocation_of(dev->state, s->native, s->allocated, &allocation, &size);
    cm_member_t *m = member_find_locked(dev, allocation);
    if (m != NULL) {
        /* Another storage registered this allocation (or its removal
         * failed and is owed): share the membership. */
        if (m->storages == 0)
            cancel_owed_locked(dev, m);
        m->storages++;
        s->member = m;
        pthread_mutex_unlock(&dev->lock);
        return CM_OK;
    }
    int rc = members_reserve_locked(dev);
    m = rc == CM_OK ? calloc(1, sizeof *m) : NULL;
    if (rc == CM_OK && m == NULL)
        rc = cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a residency member");
    unsigned idx = 0;
    if (rc == CM_OK)
        rc = pick_shard_locked(dev, size, &idx);
    if (rc == CM_OK)
        rc = dev->backend->rset_add(dev->shards[idx].rset, allocation);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&dev->lock);
        free(m);
        return rc;
    }
    m->allocation = allocation;
    m->size = size;
    m->storages = 1;
    m->shard = idx;
    size_t b = bucket_of(allocation, dev->member_buckets);
    m->next = dev->members[b];
    dev->members[b] = m;
    dev->member_count++;
    cm_shard_t *sh = &dev->shards[idx];
    sh->count++;
    sh->bytes += size;
    sh->pending = true;
    s->member = m;
    dev->rs_adds++;
    pthread_mutex_unlock(&dev->lock);
    return CM_OK;
}

/* Stage m's removal; the member ends, or stays owed when the backend
 * failed (the failure is recorded). */
static bool stage_removal_locked(cm_device_t *dev, cm_member_t *m)
{
    cm_shard_t *sh = &dev->shards[m->shard];
    if (dev->backend->rset_remove(sh->rset, m->allocation) != CM_OK) {
        note_failure_locked(dev, "removing a freed buffer from the residency set");
        return false;
    }
    member_unlink_locked(dev, m);
    sh->count--;
    sh->bytes -= m->size;
    sh->pending = true;
    dev->rs_removes++;
    free(m);
    return true;
}

int cm__residency_remove(cm_device_t *dev, cm_storage_t *s)
{
    /* In a forked child, an inherited device's set is the parent's GPU
     * state: nothing here will ever commit it, and its backend objects are
     * not this process's to touch (fork.c). Its books stay as the fork
     * left them, and nothing waits for a commit that never comes. */
    if (dev->inherited || s->member == NULL)
        return CM_REMOVAL_NONE;
    pthread_mutex_lock(&dev->lock);
    cm_member_t *m = s->member;
    s->member = NULL;
    if (--m->storages > 0) {
        /* Other storages keep the allocation in the set (and alive). */
        pthread_mutex_unlock(&dev->lock);
        return CM_REMOVAL_NONE;
    }
    unsigned shard = m->shard;
    if (!stage_removal_locked(dev, m))
        s->member = m;
    /* The removal is applied by the shard's next successful commit; until
     * then the set may hold the allocation, so s waits. */
    s->grave_shard = shard;
    s->grave_commit = dev->shards[shard].commit_count;
    s->grave_time = cm__now_seconds();
    s->grave_next = NULL;
    cm__memory_defer(dev, s);
    bool first = dev->grave_head == NULL;
    if (first)
        dev->grave_head = s;
    else
        dev->grave_tail->grave_next = s;
    dev->grave_tail = s;
    dev->grave_count++;
    dev->grave_bytes += s->allocated;
    bool over = dev->grave_bytes > dev->release_threshold;
    pthread_mutex_unlock(&dev->lock);
    return over ? CM_REMOVAL_OVER : first ? CM_REMOVAL_FIRST : CM_REMOVAL_DEFERRED;
}

/* ------------------------------------------------------------------ */
/* Flushing and giving back                                            */
/* ------------------------------------------------------------------ */

/* Stage again the removals that failed, if their allocation still has no
 * storage (one registered since keeps the membership, and its waiting
 * storage needs no removal any more). */
static void retry_owed_locked(cm_device_t *dev)
{
    for (cm_storage_t *s = dev->grave_head; s != NULL; s = s->grave_next) {
        if (s->member != NULL && stage_removal_locked(dev, s->member)) {
            s->member = NULL;
            s->grave_commit = dev->shards[s->grave_shard].commit_count;
        }
    }
}

/* Commit the pending shards (every shard when all); the first failure's
 * status (its message is this thread's last error), else CM_OK. */
static int commit_locked(cm_device_t *dev, bool all, uint64_t *committed)
{
    int first = CM_OK;
    char msg[512] = "";
    retry_owed_locked(dev);
    for (unsigned i = 0; i < dev->nshards; i++) {
        cm_shard_t *sh = &dev->shards[i];
        if (!all && !sh->pending)
            continue;
        int rc = shard_commit_locked(dev, sh);
        if (rc == CM_OK) {
            (*committed)++;
        } else if (first == CM_OK) {
            first = rc;
            snprintf(msg, sizeof msg, "%s", cm_last_error());
        }
    }
    return first == CM_OK ? CM_OK : cm__fail(first, "%s", msg);
}

/* Unlink the waiting storages whose removal a commit has applied. */
static cm_storage_t *detach_released_locked(cm_device_t *dev)
{
    cm_storage_t *released = NULL, **tail = &released;
    cm_storage_t **at = &dev->grave_head, *prev = NULL;
    while (*at != NULL) {
        cm_storage_t *s = *at;
        bool done = s->member == NULL &&
                    (s->grave_commit == NO_COMMIT_NEEDED ||
                     dev->shards[s->grave_shard].commit_count > s->grave_commit);
        if (!done) {
            prev = s;
            at = &s->grave_next;
            continue;
        }
        *at = s->grave_next;
        dev->grave_count--;
        dev->grave_bytes -= s->allocated;
        s->grave_next = NULL;
        *tail = s;
        tail = &s->grave_next;
    }
    dev->grave_tail = prev;
    return released;
}

void cm__residency_give_back(cm_device_t *dev, cm_storage_t *released)
{
    while (released != NULL) {
        cm_storage_t *next = released->grave_next;
        cm__memory_give_back(dev, released);
        released = next;
    }
}

/* The flush of a caller that cannot report: commit, record a failure,
 * detach what was released. */
static cm_storage_t *flush_unreported_locked(cm_device_t *dev)
{
    uint64_t committed = 0;
    if (commit_locked(dev, false, &committed) != CM_OK)
        note_failure_locked(dev, "a residency commit made to release freed memory");
    return detach_released_locked(dev);
}

static uint64_t give_back_bytes(cm_device_t *dev, cm_storage_t *released)
{
    uint64_t bytes = 0;
    for (cm_storage_t *s = released; s != NULL; s = s->grave_next)
        bytes += s->allocated;
    cm__residency_give_back(dev, released);
    return bytes;
}

uint64_t cm__residency_flush_deferred(cm_device_t *dev)
{
    if (!dev->info.residency_enabled || dev->inherited)
        return 0;
    pthread_mutex_lock(&dev->lock);
    cm_storage_t *released = dev->grave_head != NULL ? flush_unreported_locked(dev) : NULL;
    pthread_mutex_unlock(&dev->lock);
    return give_back_bytes(dev, released);
}

double cm__residency_flush_due(cm_device_t *dev, double idle)
{
    cm_storage_t *released = NULL;
    pthread_mutex_lock(&dev->lock);
    if (dev->grave_head != NULL && cm__now_seconds() - dev->grave_head->grave_time >= idle)
        released = flush_unreported_locked(dev);
    /* What a failed commit left waits another idle period. */
    double next = -1.0;
    if (dev->grave_head != NULL) {
        double due = dev->grave_head->grave_time + idle, now = cm__now_seconds();
        next = due > now ? due : now + idle;
    }
    pthread_mutex_unlock(&dev->lock);
    cm__residency_give_back(dev, released);
    return next;
}

/* A reporting commit: the pending shards (all of them when all), then a
 * failure recorded earlier. *released: what the commits released. */
static int flush_reported(cm_device_t *dev, bool all, uint64_t *committed,
                          cm_storage_t **released)
{
    char msg[512];
    *committed = 0;
    pthread_mutex_lock(&dev->lock);
    int rc = commit_locked(dev, all, committed);
    *released = detach_released_locked(dev);
    int earlier = take_failure_locked(dev, msg, sizeof msg);
    pthread_mutex_unlock(&dev->lock);
    if (rc == CM_OK && earlier != CM_OK)
        rc = cm__fail(earlier, "%s", msg);
    return rc;
}

int cm__residency_flush_detach(cm_device_t *dev, cm_storage_t **released)
{
    uint64_t committed;
    *released = NULL;
    if (!dev->info.residency_enabled)
        return CM_OK;
    int rc = cm__fork_refuse(dev, "flush the residency set");
    if (rc != CM_OK)
        return rc;
    return flush_reported(dev, false, &committed, released);
}

/* ------------------------------------------------------------------ */
/* The ABI                                                             */
/* ------------------------------------------------------------------ */

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
    out->pending_release_count = dev->grave_count;
    out->pending_release_bytes = dev->grave_bytes;
    out->release_threshold_bytes = dev->release_threshold;
    pthread_mutex_unlock(&dev->lock);
    pthread_mutex_lock(&dev->rt_lock);
    out->keepalive_seconds = dev->ka_seconds;
    out->keepalive_interval = dev->ka_interval;
    out->release_idle_seconds = dev->release_idle;
    pthread_mutex_unlock(&dev->rt_lock);
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
    /* An explicit commit always counts, even before anything was staged,
     * so callers can rely on commit_count moving. */
    pthread_mutex_lock(&dev->lock);
    rc = dev->nshards == 0 ? shard_create_locked(dev, 0) : CM_OK;
    pthread_mutex_unlock(&dev->lock);
    if (rc != CM_OK)
        return rc;
    uint64_t committed;
    cm_storage_t *released;
    rc = flush_reported(dev, true, &committed, &released);
    cm__residency_give_back(dev, released);
    return rc;
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
        cm_storage_t *released;
        rc = flush_reported(dev, false, &n, &released);
        cm__residency_give_back(dev, released);
    }
    if (committed != NULL)
        *committed = n;
    return rc;
}

int cm_residency_contains(cm_device_t *dev, cm_storage_t *s, int *out)
{
    if (dev == NULL || s == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_contains: NULL argument");
    *out = 0;
    if (s->dev != dev || !dev->info.residency_enabled || s->native == NULL)
        return CM_OK;
    pthread_mutex_lock(&dev->lock);
    if (s->member != NULL) {
        *out = s->member->storages > 0;
    } else {
        void *allocation = NULL;
        uint64_t size = 0;
        dev->backend->allocation_of(dev->state, s->native, s->allocated, &allocation, &size);
        cm_member_t *m = member_find_locked(dev, allocation);
        *out = m != NULL && m->storages > 0;
    }
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
        if (dev->backend->rset_request(dev->shards[i].rset) != CM_OK)
            note_failure_locked(dev, "a keep-alive residency request");
        dev->keepalive_requests++;
    }
    pthread_mutex_unlock(&dev->lock);
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
    /* The sets are gone and hold nothing: everything waiting goes back. */
    cm_storage_t *released = dev->grave_head;
    dev->grave_head = dev->grave_tail = NULL;
    dev->grave_count = dev->grave_bytes = 0;
    for (size_t i = 0; i < dev->member_buckets; i++) {
        while (dev->members[i] != NULL) {
            cm_member_t *m = dev->members[i];
            dev->members[i] = m->next;
            free(m);
        }
    }
    free(dev->members);
    dev->members = NULL;
    dev->member_buckets = dev->member_count = 0;
    pthread_mutex_unlock(&dev->lock);
    for (cm_storage_t *s = released; s != NULL; s = s->grave_next)
        s->member = NULL;
    cm__residency_give_back(dev, released);
}
