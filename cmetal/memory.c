/*
 * memory.c -- a device's memory budget: the memory limit and the active
 * and peak byte counts held to it, the caches it trims when an allocation
 * would pass the limit, fault injection for allocations, and the default
 * limit a device starts with.
 *
 * Owns dev->active_bytes, peak_bytes and memory_limit (atomics: the
 * allocation paths take no lock for them), and dev->trimmers and
 * dev->fail_nth / fail_min under dev->lock, which it takes for short
 * holds and drops before calling a cache's trim or release. Lock order:
 * LOCKING.md.
 */
#include "internal.h"

static void note_peak(cm_device_t *dev, uint64_t now)
{
    uint64_t peak = atomic_load_explicit(&dev->peak_bytes, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak(&dev->peak_bytes, &peak, now)) {
    }
}

/* A compare-and-swap instead of check-then-add, so two threads cannot both
 * squeeze under the limit with the last free bytes. */
bool cm__memory_reserve(cm_device_t *dev, uint64_t len)
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

void cm__memory_add(cm_device_t *dev, uint64_t len)
{
    uint64_t now = atomic_fetch_add(&dev->active_bytes, len) + len;
    note_peak(dev, now);
}

void cm__memory_release(cm_device_t *dev, uint64_t len)
{
    atomic_fetch_sub(&dev->active_bytes, len);
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
