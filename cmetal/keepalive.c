/*
 * keepalive.c -- residency keep-alive: a thread per device that, while
 * submissions are recent (within the keep-alive duration), re-requests the
 * residency of every shard once per interval, so Metal does not page out
 * memory between bursts of work.
 *
 * Owns the keep-alive thread and dev->ka_* under dev->ka_lock, a leaf:
 * the thread drops it before re-requesting residency (residency.c takes
 * dev->lock). Lock order: LOCKING.md.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <string.h>
#include <time.h>

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Condition variables take absolute CLOCK_REALTIME deadlines everywhere
 * (macOS has no pthread_condattr_setclock), so convert a relative wait. */
static void ka_timedwait_locked(cm_device_t *dev, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double whole = (double)(long long)seconds;
    long long ns = (long long)((seconds - whole) * 1e9) + ts.tv_nsec;
    ts.tv_sec += (time_t)whole + (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&dev->ka_cond, &dev->ka_lock, &ts);
}

static void *keepalive_main(void *arg)
{
    cm_device_t *dev = arg;
    pthread_mutex_lock(&dev->ka_lock);
    while (!dev->ka_stop) {
        double now = now_seconds();
        bool active = dev->ka_seconds > 0 && dev->ka_last_submit >= 0 &&
                      now - dev->ka_last_submit < dev->ka_seconds;
        if (!active) {
            pthread_cond_wait(&dev->ka_cond, &dev->ka_lock);
            continue;
        }
        pthread_mutex_unlock(&dev->ka_lock);
        cm__residency_request(dev);
        pthread_mutex_lock(&dev->ka_lock);
        /* Wake-ups from submissions must not shorten the interval, or a
         * busy queue would turn keep-alive into a request storm. */
        double deadline = now_seconds() + dev->ka_interval;
        while (!dev->ka_stop && dev->ka_seconds > 0) {
            double left = deadline - now_seconds();
            if (left <= 0)
                break;
            ka_timedwait_locked(dev, left);
        }
    }
    pthread_mutex_unlock(&dev->ka_lock);
    return NULL;
}

int cm_residency_set_keepalive(cm_device_t *dev, double seconds, double interval)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_residency_set_keepalive: device is NULL");
    /* Written to reject NaN too. */
    if (!(seconds >= 0 && seconds <= 1e9))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "keep-alive duration %g s is out of range: expected 0 (off) "
                        "to 1e9 s",
                        seconds);
    if (seconds > 0 && !(interval >= 1e-3 && interval <= 1e9))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "keep-alive interval %g s is out of range: expected 0.001 to 1e9 s",
                        interval);
    if (seconds > 0 && !dev->info.residency_enabled)
        return cm__residency_off(dev);
    int rc = cm__fork_refuse(dev, "set the residency keep-alive");
    if (rc != CM_OK)
        return rc;
    pthread_mutex_lock(&dev->ka_lock);
    if (seconds > 0 && !dev->ka_started) {
        int err = pthread_create(&dev->ka_thread, NULL, keepalive_main, dev);
        if (err != 0) {
            pthread_mutex_unlock(&dev->ka_lock);
            return cm__fail(CM_ERR_OUT_OF_MEMORY,
                            "cannot start the keep-alive thread: %s", strerror(err));
        }
        dev->ka_started = true;
    }
    dev->ka_seconds = seconds;
    if (seconds > 0)
        dev->ka_interval = interval;
    pthread_cond_broadcast(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
    return CM_OK;
}

void cm__keepalive_note_submit(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->ka_lock);
    dev->ka_last_submit = now_seconds();
    if (dev->ka_started && dev->ka_seconds > 0)
        pthread_cond_signal(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
}

void cm__keepalive_stop(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->ka_lock);
    dev->ka_stop = true;
    bool started = dev->ka_started;
    pthread_cond_broadcast(&dev->ka_cond);
    pthread_mutex_unlock(&dev->ka_lock);
    if (started)
        pthread_join(dev->ka_thread, NULL);
}
