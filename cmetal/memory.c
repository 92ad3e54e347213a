/*
 * memory.c -- a device's memory budget: the memory limit and the active,
 * deferred and peak byte counts held to it (allocated bytes: whole pages),
 * the caches it trims when an allocation would pass the limit, fault
 * injection for allocations, the default limit a device starts with, and
 * giving back the native object and memory of a dead storage.
 *
 * Owns dev->active_bytes, deferred_bytes, peak_bytes and memory_limit
 * (atomics: the allocation paths take no lock for them), and
 * dev->trimmers and dev->fail_nth / fail_min under dev->lock, which it
 * takes for short holds and drops before calling a cache's trim or
 * release. Giving back runs with no lock held: an external owner's
 * release is code from outside the core. Lock order: LOCKING.md.
 */
#include "internal.h"

#include <stdlib.h>

static void note_peak(cm_device_t *dev, uint64_t now)
{
    uint64_t peak = atomic_load_explicit(&dev->peak_bytes, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak(&dev->peak_bytes, &peak, now)) {
    }
}

/* A compare-and-swap instead of check-then-add, so two threads cannot both
 * squeeze under the limit with the last free bytes. Memory waiting for its
 * removal's commit is still held, so it counts against the limit; a dying
 * storage adds to deferred_bytes before it leaves active_bytes, so the sum
 * read here is never short. */
bool cm__memory_reserve(cm_device_t *dev, uint64_t len)
{
    uint64_t limit = atomic_load(&dev->memory_limit);
    uint64_t cur = atomic_load(&dev->active_bytes);
    do {
        uint64_t held = cur + atomic_load(&dev->deferred_bytes);
        if (held < cur || held > limit || len > limit - held)
            return false;
    } while (!atomic_compare_exchange_weak(&dev->active_bytes, &cur, cur + len));
    note_peak(dev, cur + len);
    return true;
}

void cm__memory_add(cm_device_t *dev, uint64_t len)
{
    uint64_t now = atomic_fetch_add(&dev->active_bytes, len) + len;
    note_peak(dev, now);
}

void cm__memory_release(cm_device_t *dev, uint64_t len)
{
    atomic_fetch_sub(&dev->active_bytes, len);
}

static bool counted(const cm_storage_t *s)
{
    return s->kind != CM_STORAGE_EXTERNAL;
}

void cm__memory_defer(cm_device_t *dev, cm_storage_t *s)
{
    s->deferred = true;
    if (!counted(s))
        return;
    atomic_fetch_add(&dev->deferred_bytes, s->allocated);
    atomic_fetch_sub(&dev->active_bytes, s->allocated);
}

void cm__memory_give_back(cm_device_t *dev, cm_storage_t *s)
{
    bool backend_frees = cm__fork_may_free(dev);
    bool release_here = s->ext_release != NULL;
    if (s->kind == CM_STORAGE_DEVICE || s->kind == CM_STORAGE_POOLED) {
        if (backend_frees)
            dev->backend->buffer_free(dev->state, s->native, s->contents, s->alloc_len);
        atomic_fetch_add(&dev->free_count, 1);
    } else if (s->native != NULL && backend_frees) {
        /* Wrapped memory goes back when the native object dies, from the
         * backend (Metal may hold the buffer past this call); an adopted
         * buffer's release runs once our reference is given back. In a
         * child that may not free, the native object is never released,
         * so the memory's release runs here instead. */
        dev->backend->buffer_unwrap(dev->state, s->native);
        release_here = release_here && !s->backend_releases;
    }
    if (release_here)
        s->ext_release(s->ext_ctx);
    if (counted(s))
        atomic_fetch_sub(s->deferred ? &dev->deferred_bytes : &dev->active_bytes, s->allocated);
    free(s);
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

bool cm__memory_fault_fires(cm_device_t *dev, uint64_t len)
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

uint64_t cm__memory_default_limit(const cm_device_t *dev)
{
    /* A backend of plain process memory names its ceiling (the host's RAM,
     * beyond which the OS would swap or kill us). GPU memory: unified
     * memory lets a process go past the recommended working set, at the
     * price of paging; half as much again is where MLX-style allocators
     * stop too. */
    const cm_backend_t *be = dev->backend;
    uint64_t limit = be->memory_ceiling != NULL ? be->memory_ceiling(dev->state) : 0;
    if (limit == 0) {
        uint64_t rec = dev->info.recommended_max_working_set_size;
        limit = rec + rec / 2;
    }
    if (limit == 0)
        limit = UINT64_MAX;
    return limit;
}

void cm__memory_add_trimmer(cm_device_t *dev, cm_trimmer_t *t)
{
    pthread_mutex_lock(&dev->lock);
    t->prev = NULL;
    t->next = dev->trimmers;
    if (dev->trimmers != NULL)
        dev->trimmers->prev = t;
    dev->trimmers = t;
    pthread_mutex_unlock(&dev->lock);
}

void cm__memory_remove_trimmer(cm_device_t *dev, cm_trimmer_t *t)
{
    pthread_mutex_lock(&dev->lock);
    if (t->prev != NULL)
        t->prev->next = t->next;
    else
        dev->trimmers = t->next;
    if (t->next != NULL)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
    pthread_mutex_unlock(&dev->lock);
}

uint64_t cm__memory_trim(cm_device_t *dev)
{
    /* dev->trimmers is weak: an owner whose count already reached zero is
     * being freed and unregisters under dev->lock, so try_retain refuses
     * it and the walk passes it by. The owner being trimmed stays
     * referenced until the next one is, which keeps the walk on a
     * registered node while dev->lock is dropped (trimming takes the
     * owner's lock and destroys storages, which takes dev->lock): an owner
     * unregisters only once its count is zero, and the walk's reference
     * keeps it above zero. A release may free its owner, so it runs with
     * no lock held and the walk never touches that node again. */
    uint64_t freed = 0;
    cm_trimmer_t *held = NULL;
    pthread_mutex_lock(&dev->lock);
    cm_trimmer_t *t = dev->trimmers;
    while (t != NULL) {
        if (!t->hooks->try_retain(t->owner)) {
            t = t->next;
            continue;
        }
        pthread_mutex_unlock(&dev->lock);
        if (held != NULL)
            held->hooks->release(held->owner);
        held = t;
        freed += t->hooks->trim(t->owner);
        pthread_mutex_lock(&dev->lock);
        t = t->next;
    }
    pthread_mutex_unlock(&dev->lock);
    if (held != NULL)
        held->hooks->release(held->owner);
    return freed;
}
