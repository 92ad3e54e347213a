/*
 * device.c -- devices: opening one on a backend, its reference count and
 * teardown, its immutable info, its statistics, and waiting for everything
 * it was given to finish.
 *
 * Owns the device record: it creates every lock of the device and destroys
 * them, and registers the device with fork.c from open to teardown. Takes
 * dev->cb_lock (cm_device_stats, cm_device_synchronize); teardown takes
 * dev->rt_lock and dev->lock through residency_thread.c and residency.c.
 * Lock order: LOCKING.md.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void free_record(cm_device_t *dev)
{
    pthread_mutex_destroy(&dev->lock);
    pthread_mutex_destroy(&dev->cb_lock);
    pthread_mutex_destroy(&dev->submit_lock);
    pthread_cond_destroy(&dev->cb_cond);
    pthread_mutex_destroy(&dev->rt_lock);
    pthread_cond_destroy(&dev->rt_cond);
    free(dev);
}

static void device_finish_teardown(cm_device_t *dev);

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
    int rc = cm__backend_pick(backend, &be);
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
    atomic_init(&dev->deferred_bytes, 0);
    pthread_mutex_init(&dev->lock, NULL);
    pthread_mutex_init(&dev->cb_lock, NULL);
    pthread_mutex_init(&dev->submit_lock, NULL);
    pthread_cond_init(&dev->cb_cond, NULL);
    pthread_mutex_init(&dev->rt_lock, NULL);
    pthread_cond_init(&dev->rt_cond, NULL);
    dev->backend = be;
    dev->finish_teardown = device_finish_teardown;
    dev->pid = getpid();
    dev->ka_interval = 1.0;
    dev->ka_last_submit = -1.0;

    dev->info.residency_enabled = 1;
    rc = be->open(dev, &dev->state, &dev->info);
    if (rc != CM_OK) {
        free_record(dev);
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
    cm__residency_init(dev);
    atomic_store(&dev->memory_limit, cm__memory_default_limit(dev));
    /* Last, once the device is whole: the fork handlers lock what they
     * find registered. */
    rc = cm__fork_add_device(dev);
    if (rc != CM_OK) {
        dev->backend->close(dev->state);
        free_record(dev);
        return rc;
    }

    *out = dev;
    return CM_OK;
}

void cm__device_retain(cm_device_t *dev)
{
    atomic_fetch_add_explicit(&dev->refcount, 1, memory_order_relaxed);
}

/* After the residency thread is stopped: give back what the residency
 * sets held, then the backend's state and the record. */
static void device_finish_teardown(cm_device_t *dev)
{
    cm__residency_close(dev);
    dev->backend->close(dev->state);
    free_record(dev);
}

static void device_destroy(cm_device_t *dev)
{
    /* In a child forked from the process that opened the device, the queue
     * and residency threads did not survive the fork: joining them, or
     * destroying the condition variables they waited on (glibc waits for
     * the waiters), would hang the child's exit. Leave the record, still
     * registered, to the child's exit instead. */
    if (dev->inherited)
        return;
    cm__fork_remove_device(dev);
    /* An external owner's release, run by the residency thread, can drop
     * the last reference there: the thread finishes the teardown. */
    if (cm__residency_thread_stop(dev))
        device_finish_teardown(dev);
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
    out->deferred_release_bytes = atomic_load(&dev->deferred_bytes);
    out->memory_limit = atomic_load(&dev->memory_limit);
    out->current_allocated_size = dev->backend->current_allocated_size(dev->state);
    out->alloc_count = atomic_load(&dev->alloc_count);
    out->free_count = atomic_load(&dev->free_count);
    pthread_mutex_lock(&dev->cb_lock);
    out->submitted = dev->submitted;
    out->completed = dev->completed;
    pthread_mutex_unlock(&dev->cb_lock);
    return CM_OK;
}

int cm_device_synchronize(cm_device_t *dev)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_device_synchronize: device is NULL");
    int rc = cm__fork_refuse(dev, "synchronize the device");
    if (rc != CM_OK)
        return rc;
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

