/*
 * compute.c -- compiled shader libraries and their kernels. A library
 * caches the kernels made from it, so asking twice for one name returns
 * the same kernel; a kernel knows the launch shapes it accepts.
 *
 * Owns the library and kernel records. Takes lib->lock around the kernel
 * cache (and calls the backend's kernel_create under it); nothing else.
 * The fork hooks take lib->lock around fork(); on a device inherited
 * through fork (fork.c) nothing is compiled or created, and releasing
 * leaves the backend's objects alone unless the backend frees in a child.
 * Lock order: LOCKING.md.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void library_fork_lock(void *owner)
{
    pthread_mutex_lock(&((cm_library_t *)owner)->lock);
}

static void library_fork_unlock(void *owner)
{
    pthread_mutex_unlock(&((cm_library_t *)owner)->lock);
}

static const cm_fork_hooks_t library_fork_hooks = {
    .prepare = library_fork_lock,
    .parent = library_fork_unlock,
    .child = library_fork_unlock,
};

int cm_library_compile(cm_device_t *dev, const char *source, uint32_t flags,
                       cm_library_t **out)
{
    if (dev == NULL || out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_library_compile: NULL argument");
    *out = NULL;
    if (source == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "shader source is NULL");
    if (flags & ~(uint32_t)CM_COMPILE_FAST_MATH)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "unknown compile flags 0x%x: the known flag is CM_COMPILE_FAST_MATH (0x%x)",
                        (unsigned)flags, (unsigned)CM_COMPILE_FAST_MATH);
    int rc = cm__fork_refuse(dev, "compile a library");
    if (rc != CM_OK)
        return rc;
    void *native = NULL;
    rc = dev->backend->library_compile(dev->state, source, (flags & CM_COMPILE_FAST_MATH) != 0,
                                       &native);
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
    lib->fork.hooks = &library_fork_hooks;
    lib->fork.owner = lib;
    cm__fork_add(dev, &lib->fork);
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
    cm__fork_remove(dev, &lib->fork);
    if (cm__fork_may_free(dev))
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
    int rc = cm__fork_refuse(lib->dev, "create a kernel");
    if (rc != CM_OK)
        return rc;
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
    rc = dev->backend->kernel_create(dev->state, lib->native, name, &k->pipeline, &k->info);
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
    if (cm__fork_may_free(dev))
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

int cm__kernel_check_launch(const cm_kernel_t *k, const uint64_t *grid,
                            const uint64_t *threadgroup)
{
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
    uint64_t tg_max = k->info.max_total_threads_per_threadgroup;
    if (tg_max != 0 && tg_total > tg_max)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "threadgroup of %llu threads exceeds kernel '%s' maximum of %llu",
                        (unsigned long long)tg_total, k->info.name,
                        (unsigned long long)tg_max);
    return CM_OK;
}
