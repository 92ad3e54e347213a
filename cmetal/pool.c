/*
 * pool.c -- the BufferPool: a cache of idle storages by size class.
 *
 * Size classes (cm_size_class). A request of n bytes gets the smallest
 * multiple of a granule g at or above n:
 *
 *   n <  1 MiB:  g = max(16, 2^(floor(log2 n) - 3))
 *                8 classes per power of two; waste < 12.5 % for n >= 128
 *                (below 128 bytes the 16-byte granule dominates, and the
 *                storage occupies a page anyway).
 *   n >= 1 MiB:  g = max(page_size, 2^(floor(log2 n) - 6))
 *                64 classes per power of two; waste < 1.6 %, and every
 *                class is a whole number of pages.
 *
 * For comparison, the Rust mlx-native crate's power-of-two buckets waste up
 * to 100 % (its own example: 17.26 GB of weights became 25.55 GB). If a
 * class would pass the device's max_buffer_length while n does not, the
 * class is n rounded up to the page, capped at max_buffer_length, so every
 * request the device could serve unpooled is served pooled too. All
 * arithmetic is checked: a request whose rounding would pass 2^64 is
 * refused, never wrapped.
 *
 * Policy:
 * - A storage returns to its pool only when its last reference dies, so a
 *   clone, view or in-flight command-buffer hold keeps it out of the cache
 *   and two live buffers never share bytes.
 * - Reuse is newest first within a class (warm in caches and TLBs);
 *   eviction is oldest first across classes, whenever the cached bytes
 *   would pass cache_limit (so they never do). The cache is held to its
 *   limit in allocated bytes, what its storages really occupy (a 64-byte
 *   class takes a whole 16 KiB page on Apple Silicon); the statistics give
 *   class bytes (free_bytes, in_use_bytes: what the classes promise) and
 *   allocated bytes (free_allocated_bytes, in_use_allocated_bytes).
 * - Cached storages stay registered in the residency set: steady-state
 *   churn (alloc, drop, submit) stages nothing and costs no commit. They
 *   leave the set when evicted, cleared or trimmed.
 * - Reused storages are not re-zeroed unless the caller asks (zero != 0).
 * - On out-of-memory the core trims every cache of the device and retries
 *   once: each pool registers its trimmer with the device
 *   (cm__memory_trim).
 * - A released pool frees instead of caching.
 * - In a forked child, a pool of an inherited device (fork.c) allocates
 *   nothing and caches nothing: the storages that come back are freed, as
 *   by a released pool. Its cache empties when it is cleared or released.
 *
 * Locking: pool->lock guards the cache and the statistics; dev->lock the
 * device's list of trimmers. The two never nest, and storages are
 * destroyed with no pool lock held (destruction takes dev->lock and can
 * drop the pool's last reference); order and rules in LOCKING.md. The
 * fork hooks take pool->lock around fork(). The hit path is one lock, a
 * hash probe and a list unlink: O(1), no allocation.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KIB ((uint64_t)1 << 10)
#define MIB ((uint64_t)1 << 20)
#define GIB ((uint64_t)1 << 30)

/* One entry per size class ever cached. Entries are never removed, so the
 * table needs no tombstones; the number of classes a process touches is
 * small (a few hundred at most). */
typedef struct cm_class_slot {
    uint64_t size;                    /* 0 = empty slot                   */
    cm_storage_t *head;               /* newest cached storage of the class */
} cm_class_slot_t;

struct cm_pool {
    atomic_uint_fast64_t refcount;    /* caller's + one per pooled storage */
    cm_device_t *dev;                 /* strong reference                 */
    cm_trimmer_t trimmer;             /* in dev->trimmers until count 0   */
    cm_fork_entry_t fork;             /* in dev->fork_entries until then  */

    pthread_mutex_t lock;
    bool closed;
    uint64_t cache_limit;
    cm_class_slot_t *slots;
    size_t slot_cap, slot_count;
    cm_storage_t *lru_oldest, *lru_newest;
    uint64_t free_count, free_bytes, free_allocated;
    uint64_t in_use_count, in_use_bytes, in_use_allocated, requested_bytes;
    uint64_t hits, misses, evictions;
};

/* ------------------------------------------------------------------ */
/* Size classes                                                        */
/* ------------------------------------------------------------------ */

static unsigned floor_log2(uint64_t n)
{
#if defined(__GNUC__) || defined(__clang__)
    return 63u - (unsigned)__builtin_clzll(n);
#else
    unsigned k = 0;
    while (n >>= 1)
        k++;
    return k;
#endif
}

int cm_size_class(uint64_t n, uint64_t page_size, uint64_t *out)
{
    if (out != NULL)
        *out = 0;
    if (out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_size_class: out is NULL");
    if (n == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "a request of 0 bytes has no size class: request at least 1 byte");
    if (page_size == 0 || (page_size & (page_size - 1)) != 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "page size %llu is not a power of two",
                        (unsigned long long)page_size);
    unsigned k = floor_log2(n);
    uint64_t g;
    if (n < MIB) {
        g = k >= 7 ? (uint64_t)1 << (k - 3) : 16;
    } else {
        g = (uint64_t)1 << (k - 6);
        if (g < page_size)
            g = page_size;
    }
    if (n > UINT64_MAX - (g - 1))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "a request of %llu bytes has no size class: rounding it up to a "
                        "multiple of %llu overflows 64 bits",
                        (unsigned long long)n, (unsigned long long)g);
    *out = (n + g - 1) & ~(g - 1);
    return CM_OK;
}

/* The class this device gives n bytes, with the max_buffer_length rule. */
static int pool_class(cm_device_t *dev, uint64_t n, uint64_t *out)
{
    char b1[64], b2[64];
    uint64_t max = dev->info.max_buffer_length;
    if (n == 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cannot allocate 0 bytes: byte_len must be at least 1");
    if (n > max) /* out of memory, as in cm_storage_alloc */
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot allocate %s: device maximum buffer length is %s",
                        BYTES(n, b1), BYTES(max, b2));
    int rc = cm_size_class(n, dev->info.page_size, out);
    if (rc != CM_OK)
        return rc;
    if (*out > max) {
        uint64_t page = dev->info.page_size;
        /* n <= max < 2^64, and max is far below 2^64 - page on any real
         * device, but check rather than trust it. */
        uint64_t up = n > UINT64_MAX - (page - 1) ? max : (n + page - 1) & ~(page - 1);
        *out = up > max ? max : up;
    }
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Class table and cache lists (all _locked: pool->lock held)          */
/* ------------------------------------------------------------------ */

static size_t slot_hash(uint64_t size, size_t cap)
{
    uint64_t h = size;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & (cap - 1);
}

static cm_class_slot_t *slot_find_locked(cm_pool_t *pool, uint64_t size)
{
    if (pool->slot_cap == 0)
        return NULL;
    size_t i = slot_hash(size, pool->slot_cap);
    while (pool->slots[i].size != 0) {
        if (pool->slots[i].size == size)
            return &pool->slots[i];
        i = (i + 1) & (pool->slot_cap - 1);
    }
    return NULL;
}

static cm_class_slot_t *slot_insert_raw(cm_class_slot_t *slots, size_t cap, uint64_t size)
{
    size_t i = slot_hash(size, cap);
    while (slots[i].size != 0 && slots[i].size != size)
        i = (i + 1) & (cap - 1);
    slots[i].size = size;
    return &slots[i];
}

/* The slot of a class, created if needed; NULL only when growing the
 * table fails (the caller then frees the storage instead of caching it). */
static cm_class_slot_t *slot_get_locked(cm_pool_t *pool, uint64_t size)
{
    cm_class_slot_t *slot = slot_find_locked(pool, size);
    if (slot != NULL)
        return slot;
    if ((pool->slot_count + 1) * 2 > pool->slot_cap) {
        size_t ncap = pool->slot_cap ? pool->slot_cap * 2 : 64;
        cm_class_slot_t *ns = calloc(ncap, sizeof *ns);
        if (ns == NULL)
            return NULL;
        for (size_t i = 0; i < pool->slot_cap; i++) {
            if (pool->slots[i].size != 0)
                slot_insert_raw(ns, ncap, pool->slots[i].size)->head = pool->slots[i].head;
        }
        free(pool->slots);
        pool->slots = ns;
        pool->slot_cap = ncap;
    }
    pool->slot_count++;
    return slot_insert_raw(pool->slots, pool->slot_cap, size);
}

static void cache_push_locked(cm_pool_t *pool, cm_class_slot_t *slot, cm_storage_t *s)
{
    s->class_prev = NULL;
    s->class_next = slot->head;
    if (slot->head != NULL)
        slot->head->class_prev = s;
    slot->head = s;

    s->lru_next = NULL;
    s->lru_prev = pool->lru_newest;
    if (pool->lru_newest != NULL)
        pool->lru_newest->lru_next = s;
    else
        pool->lru_oldest = s;
    pool->lru_newest = s;

    pool->free_count++;
    pool->free_bytes += s->byte_len;
    pool->free_allocated += s->allocated;
    atomic_fetch_add(&pool->dev->cached_bytes, s->allocated);
    atomic_fetch_add(&pool->dev->cached_storages, 1);
}

static void cache_unlink_locked(cm_pool_t *pool, cm_class_slot_t *slot, cm_storage_t *s)
{
    if (s->class_prev != NULL)
        s->class_prev->class_next = s->class_next;
    else
        slot->head = s->class_next;
    if (s->class_next != NULL)
        s->class_next->class_prev = s->class_prev;

    if (s->lru_prev != NULL)
        s->lru_prev->lru_next = s->lru_next;
    else
        pool->lru_oldest = s->lru_next;
    if (s->lru_next != NULL)
        s->lru_next->lru_prev = s->lru_prev;
    else
        pool->lru_newest = s->lru_prev;

    s->class_prev = s->class_next = NULL;
    s->lru_prev = s->lru_next = NULL;
    pool->free_count--;
    pool->free_bytes -= s->byte_len;
    pool->free_allocated -= s->allocated;
    atomic_fetch_sub(&pool->dev->cached_bytes, s->allocated);
    atomic_fetch_sub(&pool->dev->cached_storages, 1);
}

/* Unlink oldest-first until the cache holds at most `limit` bytes; the
 * victims come back chained through lru_next, to be destroyed once the
 * lock is dropped. */
static cm_storage_t *cache_shrink_locked(cm_pool_t *pool, uint64_t limit, uint64_t *freed)
{
    cm_storage_t *victims = NULL;
    while (pool->free_allocated > limit && pool->lru_oldest != NULL) {
        cm_storage_t *s = pool->lru_oldest;
        cm_class_slot_t *slot = slot_find_locked(pool, s->byte_len);
        cache_unlink_locked(pool, slot, s);
        *freed += s->allocated;
        s->lru_next = victims;
        victims = s;
    }
    return victims;
}

static void destroy_chain(cm_storage_t *victims)
{
    while (victims != NULL) {
        cm_storage_t *next = victims->lru_next;
        victims->lru_next = NULL;
        cm__storage_destroy(victims);
        victims = next;
    }
}

/* ------------------------------------------------------------------ */
/* Lifetime                                                            */
/* ------------------------------------------------------------------ */

static void pool_drop_ref(cm_pool_t *pool)
{
    if (atomic_fetch_sub_explicit(&pool->refcount, 1, memory_order_acq_rel) != 1)
        return;
    cm_device_t *dev = pool->dev;
    cm__memory_remove_trimmer(dev, &pool->trimmer);
    cm__fork_remove(dev, &pool->fork);
    free(pool->slots);
    pthread_mutex_destroy(&pool->lock);
    free(pool);
    cm_device_release(dev);
}

/* The storage-owner hooks of a pooled storage: its last reference gives it
 * back here, and once destroyed it drops its reference on the pool. */
static bool pool_take_back(void *owner, cm_storage_t *s)
{
    cm_pool_t *pool = owner;
    uint64_t freed = 0;
    cm_storage_t *victims = NULL;
    bool kept = false;
    pthread_mutex_lock(&pool->lock);
    pool->in_use_count--;
    pool->in_use_bytes -= s->byte_len;
    pool->in_use_allocated -= s->allocated;
    pool->requested_bytes -= s->requested_len;
    if (!pool->closed && s->allocated <= pool->cache_limit) {
        cm_class_slot_t *slot = slot_get_locked(pool, s->byte_len);
        if (slot != NULL) {
            cache_push_locked(pool, slot, s);
            kept = true;
            victims = cache_shrink_locked(pool, pool->cache_limit, &freed);
            for (cm_storage_t *v = victims; v != NULL; v = v->lru_next)
                pool->evictions++;
        }
    }
    pthread_mutex_unlock(&pool->lock);
    destroy_chain(victims);
    return kept;
}

static void pool_release_owner(void *owner)
{
    pool_drop_ref(owner);
}

static const cm_storage_owner_t pool_storage_owner = {
    .take_back = pool_take_back,
    .release = pool_release_owner,
};

/* Empty the cache; returns the bytes freed. */
static uint64_t pool_clear(cm_pool_t *pool, bool close)
{
    uint64_t freed = 0;
    pthread_mutex_lock(&pool->lock);
    if (close)
        pool->closed = true;
    cm_storage_t *victims = cache_shrink_locked(pool, 0, &freed);
    pthread_mutex_unlock(&pool->lock);
    destroy_chain(victims);
    return freed;
}

/* The trimmer hooks: under memory pressure the device empties the cache
 * (the pool is then still usable), holding a reference on the pool. */
static bool pool_try_retain(void *owner)
{
    cm_pool_t *pool = owner;
    uint64_t rc = atomic_load(&pool->refcount);
    while (rc != 0) {
        if (atomic_compare_exchange_weak(&pool->refcount, &rc, rc + 1))
            return true;
    }
    return false;
}

static uint64_t pool_trim(void *owner)
{
    return pool_clear(owner, false);
}

static const cm_trimmer_hooks_t pool_trimmer_hooks = {
    .try_retain = pool_try_retain,
    .release = pool_release_owner,
    .trim = pool_trim,
};

/* The fork hooks: the cache is whole at the fork, and in the child the
 * pool serves nothing more (its device makes nothing new there), so it is
 * closed: what comes back is freed, not cached. */
static void pool_fork_prepare(void *owner)
{
    pthread_mutex_lock(&((cm_pool_t *)owner)->lock);
}

static void pool_fork_parent(void *owner)
{
    pthread_mutex_unlock(&((cm_pool_t *)owner)->lock);
}

static void pool_fork_child(void *owner)
{
    cm_pool_t *pool = owner;
    pool->closed = true;
    pthread_mutex_unlock(&pool->lock);
}

static const cm_fork_hooks_t pool_fork_hooks = {
    .prepare = pool_fork_prepare,
    .parent = pool_fork_parent,
    .child = pool_fork_child,
};

int cm_pool_create(cm_device_t *dev, int64_t cache_limit, cm_pool_t **out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_create: NULL argument");
    *out = NULL;
    int rc = cm__fork_refuse(dev, "create a buffer pool");
    if (rc != CM_OK)
        return rc;
    cm_pool_t *pool = calloc(1, sizeof *pool);
    if (pool == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a pool record");
    atomic_init(&pool->refcount, 1);
    pthread_mutex_init(&pool->lock, NULL);
    if (cache_limit < 0) {
        /* A quarter of the working set leaves room for the model itself;
         * 1 GiB bounds what an idle cache can pin on big machines while
         * still holding thousands of small scratch storages. */
        uint64_t quarter = dev->info.recommended_max_working_set_size / 4;
        pool->cache_limit = quarter != 0 && quarter < GIB ? quarter : GIB;
    } else {
        pool->cache_limit = (uint64_t)cache_limit;
    }
    cm__device_retain(dev);
    pool->dev = dev;
    pool->trimmer.hooks = &pool_trimmer_hooks;
    pool->trimmer.owner = pool;
    cm__memory_add_trimmer(dev, &pool->trimmer);
    pool->fork.hooks = &pool_fork_hooks;
    pool->fork.owner = pool;
    cm__fork_add(dev, &pool->fork);
    *out = pool;
    return CM_OK;
}

void cm_pool_release(cm_pool_t *pool)
{
    if (pool == NULL)
        return;
    pool_clear(pool, true);
    pool_drop_ref(pool);
}

int cm_pool_clear(cm_pool_t *pool)
{
    if (pool == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_clear: pool is NULL");
    pool_clear(pool, false);
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Allocation                                                          */
/* ------------------------------------------------------------------ */

static void fill_result(cm_storage_t *s, cm_alloc_result_t *out)
{
    out->storage = s;
    out->contents = s->contents;
    out->byte_len = s->byte_len;
}

static int pool_alloc_class(cm_pool_t *pool, uint64_t n, uint64_t cls, int zero,
                            cm_alloc_result_t *out)
{
    cm_storage_t *s = NULL;
    pthread_mutex_lock(&pool->lock);
    cm_class_slot_t *slot = slot_find_locked(pool, cls);
    if (slot != NULL && slot->head != NULL) {
        s = slot->head;
        cache_unlink_locked(pool, slot, s);
        pool->hits++;
        pool->in_use_count++;
        pool->in_use_bytes += cls;
        pool->in_use_allocated += s->allocated;
        pool->requested_bytes += n;
        pthread_mutex_unlock(&pool->lock);
        /* Nobody else can reach a cached storage, so the count restarts. */
        atomic_store(&s->refcount, 1);
        s->requested_len = n;
        if (zero)
            memset(s->contents, 0, (size_t)s->byte_len);
        fill_result(s, out);
        return CM_OK;
    }
    pthread_mutex_unlock(&pool->lock);

    int rc = cm__storage_new(pool->dev, cls, CM_STORAGE_POOLED, &s);
    if (rc != CM_OK)
        return rc;
    atomic_fetch_add(&pool->refcount, 1);
    s->owner_hooks = &pool_storage_owner;
    s->owner = pool;
    s->requested_len = n;
    rc = cm__residency_add(pool->dev, s);
    if (rc != CM_OK) {
        cm__storage_destroy(s);
        return rc;
    }
    pthread_mutex_lock(&pool->lock);
    pool->misses++;
    pool->in_use_count++;
    pool->in_use_bytes += cls;
    pool->in_use_allocated += s->allocated;
    pool->requested_bytes += n;
    pthread_mutex_unlock(&pool->lock);
    fill_result(s, out);
    return CM_OK;
}

int cm_pool_alloc(cm_pool_t *pool, uint64_t byte_len, int zero, cm_alloc_result_t *out)
{
    if (pool == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_alloc: NULL argument");
    memset(out, 0, sizeof *out);
    int rc = cm__fork_refuse(pool->dev, "allocate from a buffer pool");
    if (rc != CM_OK)
        return rc;
    uint64_t cls = 0;
    rc = pool_class(pool->dev, byte_len, &cls);
    if (rc != CM_OK)
        return rc;
    return pool_alloc_class(pool, byte_len, cls, zero, out);
}

int cm_pool_alloc_batch(cm_pool_t *pool, const uint64_t *byte_lens, size_t n, int zero,
                        cm_alloc_result_t *out)
{
    if (pool == NULL || (n > 0 && (byte_lens == NULL || out == NULL)))
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_alloc_batch: NULL argument");
    if (n == 0)
        return CM_OK;
    memset(out, 0, n * sizeof *out);
    int refused = cm__fork_refuse(pool->dev, "allocate from a buffer pool");
    if (refused != CM_OK)
        return refused;
    /* Every request is checked before anything is allocated, so a bad one
     * leaves the pool exactly as it was. The classes wait in out. */
    for (size_t i = 0; i < n; i++) {
        int rc = pool_class(pool->dev, byte_lens[i], &out[i].byte_len);
        if (rc != CM_OK) {
            memset(out, 0, n * sizeof *out);
            return cm__fail(rc, "batch request %zu of %zu: %s", i, n, cm_last_error());
        }
    }
    for (size_t i = 0; i < n; i++) {
        int rc = pool_alloc_class(pool, byte_lens[i], out[i].byte_len, zero, &out[i]);
        if (rc != CM_OK) {
            /* Save the message: releasing may run code that fails too. */
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", cm_last_error());
            for (size_t j = 0; j < i; j++)
                cm_storage_release(out[j].storage);
            memset(out, 0, n * sizeof *out);
            return cm__fail(rc, "batch request %zu of %zu: %s", i, n, msg);
        }
    }
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Settings and statistics                                             */
/* ------------------------------------------------------------------ */

int cm_pool_stats(cm_pool_t *pool, cm_pool_stats_t *out)
{
    if (pool == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_stats: NULL argument");
    pthread_mutex_lock(&pool->lock);
    out->free_count = pool->free_count;
    out->free_bytes = pool->free_bytes;
    out->free_allocated_bytes = pool->free_allocated;
    out->in_use_count = pool->in_use_count;
    out->in_use_bytes = pool->in_use_bytes;
    out->in_use_allocated_bytes = pool->in_use_allocated;
    out->requested_bytes = pool->requested_bytes;
    out->cache_limit = pool->cache_limit;
    out->hits = pool->hits;
    out->misses = pool->misses;
    out->evictions = pool->evictions;
    pthread_mutex_unlock(&pool->lock);
    return CM_OK;
}

int cm_pool_set_cache_limit(cm_pool_t *pool, uint64_t limit, uint64_t *old)
{
    if (pool == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_set_cache_limit: pool is NULL");
    uint64_t freed = 0;
    pthread_mutex_lock(&pool->lock);
    uint64_t prev = pool->cache_limit;
    pool->cache_limit = limit;
    cm_storage_t *victims = cache_shrink_locked(pool, limit, &freed);
    for (cm_storage_t *v = victims; v != NULL; v = v->lru_next)
        pool->evictions++;
    pthread_mutex_unlock(&pool->lock);
    destroy_chain(victims);
    if (old != NULL)
        *old = prev;
    return CM_OK;
}

int cm_pool_size_class(cm_pool_t *pool, uint64_t n, uint64_t *out)
{
    if (pool == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_pool_size_class: NULL argument");
    *out = 0;
    return pool_class(pool->dev, n, out);
}
