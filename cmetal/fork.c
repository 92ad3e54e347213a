/*
 * fork.c -- fork() safety: the registry of open devices and of the other
 * objects whose locks a forked child may need (a device's pools and
 * libraries), the pthread_atfork handlers that take every one of those
 * locks before fork() and release them on both sides of it, and what a
 * device opened before the fork still does in the child.
 *
 * Why: fork() copies the calling thread only. A lock that another thread
 * (a queue worker, the residency thread, a caller inside the core) held
 * at that instant stays locked in the child forever, and the data it
 * guards may be half-updated. The prepare handler takes every lock in
 * LOCKING.md's order, so it waits until no other thread is inside any of
 * them, and the child starts with every lock free and every structure
 * whole.
 *
 * In the child, a device opened before the fork is *inherited*: its queue,
 * residency and backend threads stayed in the parent. Anything that would
 * make something new on it or wait for its threads fails with
 * CM_ERR_DEVICE_NOT_FOUND (cm__fork_refuse), so the child is told instead
 * of hanging; the same on every backend, so what tests see on the host
 * backend holds for Metal. What the child does with an inherited storage:
 * - Its memory is the child's own copy, to read and write. Its last
 *   reference frees it through the backend when the backend said that
 *   works in a child (host: free() or munmap() of the child's copy; a
 *   long-lived child, such as a multiprocessing worker, would otherwise
 *   keep every page it inherited alive after the parent freed its own).
 *   A backend without fork hooks is never called for an inherited device,
 *   and its memory is left to the child's exit: its objects belong to a
 *   framework that need not work after fork() (cm__fork_may_free).
 * - Its residency membership is left alone: the set is the parent's GPU
 *   state, nothing in the child commits it, and a staged removal would
 *   only call the backend for nothing (residency.c). So an inherited
 *   storage's memory goes back at its last reference, never waiting for
 *   a commit; the storages that already waited for one at the fork (the
 *   parent's release list) stay in the child's copy of the list until the
 *   child exits, since no commit comes there, while the parent gives its
 *   own back as usual.
 * - A pooled storage is freed, never cached: its pool serves nothing in
 *   the child (pool.c).
 *
 * Owns the registry and its lock, fork_lock. Every other thread takes
 * fork_lock alone, with no core lock held but perhaps a cb->enc_lock, to
 * add or remove an entry; the prepare handler takes it first and every
 * other lock under it. Order and rules: LOCKING.md.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <stddef.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t fork_lock = PTHREAD_MUTEX_INITIALIZER;
static cm_fork_entry_t *devices;      /* dev->fork of open devices        */

/* The device's own locks, in LOCKING.md's order. A new lock of the device
 * joins the protocol by taking its place here. */
static const size_t device_locks[] = {
    offsetof(cm_device_t, submit_lock),
    offsetof(cm_device_t, lock),
    offsetof(cm_device_t, cb_lock),
    offsetof(cm_device_t, rt_lock),
};
#define NDEVICE_LOCKS (sizeof device_locks / sizeof device_locks[0])

static pthread_mutex_t *device_lock(cm_device_t *dev, size_t i)
{
    return (pthread_mutex_t *)(void *)((char *)dev + device_locks[i]);
}

/* ------------------------------------------------------------------ */
/* The handlers                                                        */
/* ------------------------------------------------------------------ */

/* A device's hooks, run for each registered device: its own locks, then
 * its pools' and libraries' (which never nest with the device's:
 * LOCKING.md), then the backend's, which are the innermost: the core calls
 * the backend under its locks, never the reverse. */
static void device_prepare(void *owner)
{
    cm_device_t *dev = owner;
    for (size_t i = 0; i < NDEVICE_LOCKS; i++)
        pthread_mutex_lock(device_lock(dev, i));
    for (cm_fork_entry_t *e = dev->fork_entries; e != NULL; e = e->next)
        e->hooks->prepare(e->owner);
    if (dev->backend->fork_prepare != NULL)
        dev->backend->fork_prepare(dev->state);
}

static void device_unlock(cm_device_t *dev)
{
    for (size_t i = NDEVICE_LOCKS; i-- > 0;)
        pthread_mutex_unlock(device_lock(dev, i));
}

static void device_parent(void *owner)
{
    cm_device_t *dev = owner;
    if (dev->backend->fork_parent != NULL)
        dev->backend->fork_parent(dev->state);
    for (cm_fork_entry_t *e = dev->fork_entries; e != NULL; e = e->next)
        e->hooks->parent(e->owner);
    device_unlock(dev);
}

/* Every lock was taken by this thread, the child's only one, so unlocking
 * is legal. The condition variables of an inherited device may still
 * list waiters that did not survive the fork; nothing in the child waits
 * on or signals them, because everything that would is refused. */
static void device_child(void *owner)
{
    cm_device_t *dev = owner;
    dev->inherited = true;
    dev->inherited_frees =
        dev->backend->fork_child != NULL && dev->backend->fork_child(dev->state);
    for (cm_fork_entry_t *e = dev->fork_entries; e != NULL; e = e->next)
        e->hooks->child(e->owner);
    device_unlock(dev);
}

static const cm_fork_hooks_t device_hooks = {
    .prepare = device_prepare,
    .parent = device_parent,
    .child = device_child,
};

static void prepare(void)
{
    pthread_mutex_lock(&fork_lock);
    for (cm_fork_entry_t *e = devices; e != NULL; e = e->next)
        e->hooks->prepare(e->owner);
}

static void parent(void)
{
    for (cm_fork_entry_t *e = devices; e != NULL; e = e->next)
        e->hooks->parent(e->owner);
    pthread_mutex_unlock(&fork_lock);
}

static void child(void)
{
    for (cm_fork_entry_t *e = devices; e != NULL; e = e->next)
        e->hooks->child(e->owner);
    pthread_mutex_unlock(&fork_lock);
}

static pthread_once_t install_once = PTHREAD_ONCE_INIT;
static int install_error;

static void install(void)
{
    install_error = pthread_atfork(prepare, parent, child);
}

/* ------------------------------------------------------------------ */
/* The registry                                                        */
/* ------------------------------------------------------------------ */

static void link_entry(cm_fork_entry_t **head, cm_fork_entry_t *e)
{
    pthread_mutex_lock(&fork_lock);
    e->prev = NULL;
    e->next = *head;
    if (*head != NULL)
        (*head)->prev = e;
    *head = e;
    pthread_mutex_unlock(&fork_lock);
}

static void unlink_entry(cm_fork_entry_t **head, cm_fork_entry_t *e)
{
    pthread_mutex_lock(&fork_lock);
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        *head = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    e->prev = e->next = NULL;
    pthread_mutex_unlock(&fork_lock);
}

int cm__fork_add_device(cm_device_t *dev)
{
    pthread_once(&install_once, install);
    if (install_error != 0)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot install the fork handlers: %s",
                        strerror(install_error));
    dev->fork.hooks = &device_hooks;
    dev->fork.owner = dev;
    link_entry(&devices, &dev->fork);
    return CM_OK;
}

void cm__fork_remove_device(cm_device_t *dev)
{
    unlink_entry(&devices, &dev->fork);
}

void cm__fork_add(cm_device_t *dev, cm_fork_entry_t *e)
{
    link_entry(&dev->fork_entries, e);
}

void cm__fork_remove(cm_device_t *dev, cm_fork_entry_t *e)
{
    unlink_entry(&dev->fork_entries, e);
}

/* ------------------------------------------------------------------ */
/* An inherited device                                                 */
/* ------------------------------------------------------------------ */

int cm__fork_refuse(const cm_device_t *dev, const char *what)
{
    if (!dev->inherited)
        return CM_OK;
    return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                    "cannot %s: this %s device was opened in process %ld, which this "
                    "process (%ld) was forked from, and its command queue and threads "
                    "stayed there; open a new device in this process",
                    what, dev->backend->name, (long)dev->pid, (long)getpid());
}

bool cm__fork_may_free(const cm_device_t *dev)
{
    return !dev->inherited || dev->inherited_frees;
}
