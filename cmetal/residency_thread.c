/*
 * residency_thread.c -- the residency thread: one background thread per
 * device for the two timers of its residency sets.
 * - Keep-alive: while submissions are recent (within the keep-alive
 *   duration), re-request the residency of every shard once per interval,
 *   so Metal does not page out memory between bursts of work.
 * - Idle release: once the oldest freed storage waiting for its removal's
 *   commit is release_idle seconds old, commit the pending shards and give
 *   back what they released (residency.c), so a program that frees memory
 *   and stops submitting does not keep it resident.
 * One thread for both: they are timers over the same sets, so one thread
 * sleeps until the nearer deadline instead of two, and device teardown
 * and fork() have one thread to stop or to do without. It starts when
 * first needed (keep-alive switched on, or a storage waits for release)
 * and sleeps on a condition variable, without a deadline when neither
 * timer runs.
 *
 * Owns the thread and dev->rt_* / ka_* / release_idle / flush_at under
 * dev->rt_lock, a leaf: the thread drops it before calling residency.c
 * (which takes dev->lock). Giving memory back runs an external owner's
 * release, code from outside the core, which may drop the device's last
 * reference on this thread: the teardown then stops here and the thread
 * finishes it once its loop ends (cm__residency_thread_stop). Lock order:
 * LOCKING.md.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "internal.h"

#include <math.h>
#include <string.h>
#include <time.h>

/* Condition variables take absolute CLOCK_REALTIME deadlines everywhere
 * (macOS has no pthread_condattr_setclock), so convert a relative wait. */
static void rt_timedwait_locked(cm_device_t *dev, double seconds)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (seconds > 1e9)
        seconds = 1e9;
    double whole = (double)(long long)seconds;
    long long ns = (long long)((seconds - whole) * 1e9) + ts.tv_nsec;
    ts.tv_sec += (time_t)whole + (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&dev->rt_cond, &dev->rt_lock, &ts);
}

static bool keepalive_active_locked(const cm_device_t *dev, double now)
{
    return dev->ka_seconds > 0 && dev->ka_last_submit >= 0 &&
           now - dev->ka_last_submit < dev->ka_seconds;
}

static void *residency_thread_main(void *arg)
{
    cm_device_t *dev = arg;
    pthread_mutex_lock(&dev->rt_lock);
    while (!dev->rt_stop) {
        double now = cm__now_seconds();
        double wake = INFINITY;
        if (dev->flush_at >= 0) {
            if (now >= dev->flush_at) {
                double idle = dev->release_idle;
                dev->flush_at = -1.0;
                pthread_mutex_unlock(&dev->rt_lock);
                double next = idle > 0 ? cm__residency_flush_due(dev, idle) : -1.0;
                pthread_mutex_lock(&dev->rt_lock);
                if (next >= 0 && (dev->flush_at < 0 || next < dev->flush_at))
                    dev->flush_at = next;
                continue;
            }
            wake = dev->flush_at;
        }
        if (keepalive_active_locked(dev, now)) {
            if (now >= dev->ka_next_request) {
                pthread_mutex_unlock(&dev->rt_lock);
                cm__residency_request(dev);
                pthread_mutex_lock(&dev->rt_lock);
                /* Wake-ups from submissions must not shorten the interval,
                 * or a busy queue would turn keep-alive into a request
                 * storm. */
                dev->ka_next_request = cm__now_seconds() + dev->ka_interval;
                continue;
            }
            if (dev->ka_next_request < wake)
                wake = dev->ka_next_request;
        } else {
            dev->ka_next_request = 0; /* the next window requests at once */
        }
        if (isinf(wake))
            pthread_cond_wait(&dev->rt_cond, &dev->rt_lock);
        else
            rt_timedwait_locked(dev, wake - now);
    }
    bool finish = dev->rt_finish;
    pthread_mutex_unlock(&dev->rt_lock);
    if (finish)
        dev->finish_teardown(dev);
    return NULL;
}

/* Start the thread unless it runs; rt_lock held. */
static int start_locked(cm_device_t *dev)
{
    if (dev->rt_started)
        return CM_OK;
    int err = pthread_create(&dev->rt_thread, NULL, residency_thread_main, dev);
    if (err != 0)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot start the residency thread: %s",
                        strerror(err));
    dev->rt_started = true;
    return CM_OK;
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
    pthread_mutex_lock(&dev->rt_lock);
    if (seconds > 0 && (rc = start_locked(dev)) != CM_OK) {
        pthread_mutex_unlock(&dev->rt_lock);
        return rc;
    }
    dev->ka_seconds = seconds;
    if (seconds > 0)
        dev->ka_interval = interval;
    pthread_cond_broadcast(&dev->rt_cond);
    pthread_mutex_unlock(&dev->rt_lock);
    return CM_OK;
}

void cm__keepalive_note_submit(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->rt_lock);
    dev->ka_last_submit = cm__now_seconds();
    if (dev->rt_started && dev->ka_seconds > 0)
        pthread_cond_signal(&dev->rt_cond);
    pthread_mutex_unlock(&dev->rt_lock);
}

void cm__release_timer_arm(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->rt_lock);
    if (dev->release_idle <= 0 || dev->rt_stop) {
        pthread_mutex_unlock(&dev->rt_lock);
        return;
    }
    if (start_locked(dev) != CM_OK) {
        /* No thread, no timer: commit now rather than hold the memory
         * until something else does. */
        pthread_mutex_unlock(&dev->rt_lock);
        cm__residency_flush_deferred(dev);
        return;
    }
    /* The thread reads the oldest waiting storage's age when it wakes; a
     * deadline already set is never later than this one. */
    double due = cm__now_seconds() + dev->release_idle;
    if (dev->flush_at < 0 || due < dev->flush_at) {
        dev->flush_at = due;
        pthread_cond_signal(&dev->rt_cond);
    }
    pthread_mutex_unlock(&dev->rt_lock);
}

int cm_residency_set_release_policy(cm_device_t *dev, uint64_t threshold_bytes,
                                    double idle_seconds, uint64_t *old_threshold,
                                    double *old_idle)
{
    if (dev == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "cm_residency_set_release_policy: device is NULL");
    /* Written to reject NaN too. */
    if (!(idle_seconds == 0 || (idle_seconds >= 1e-3 && idle_seconds <= 1e9)))
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "release idle timeout %g s is out of range: expected 0 (off) or "
                        "0.001 to 1e9 s",
                        idle_seconds);
    if (!dev->info.residency_enabled)
        return cm__residency_off(dev);
    int rc = cm__fork_refuse(dev, "set the residency release policy");
    if (rc != CM_OK)
        return rc;
    pthread_mutex_lock(&dev->lock);
    uint64_t prev_threshold = dev->release_threshold;
    dev->release_threshold = threshold_bytes;
    bool over = dev->grave_bytes > threshold_bytes;
    bool waiting = dev->grave_head != NULL;
    pthread_mutex_unlock(&dev->lock);
    pthread_mutex_lock(&dev->rt_lock);
    double prev_idle = dev->release_idle;
    dev->release_idle = idle_seconds;
    /* The deadline was computed with the old timeout: have the thread
     * recompute it from the oldest waiting storage. */
    if (dev->flush_at >= 0) {
        dev->flush_at = 0;
        pthread_cond_signal(&dev->rt_cond);
    }
    bool arm = waiting && dev->flush_at < 0 && idle_seconds > 0;
    pthread_mutex_unlock(&dev->rt_lock);
    if (over)
        cm__residency_flush_deferred(dev);
    else if (arm)
        cm__release_timer_arm(dev);
    if (old_threshold != NULL)
        *old_threshold = prev_threshold;
    if (old_idle != NULL)
        *old_idle = prev_idle;
    return CM_OK;
}

bool cm__residency_thread_stop(cm_device_t *dev)
{
    pthread_mutex_lock(&dev->rt_lock);
    dev->rt_stop = true;
    bool started = dev->rt_started;
    bool self = started && pthread_equal(pthread_self(), dev->rt_thread);
    if (self)
        dev->rt_finish = true;
    pthread_cond_broadcast(&dev->rt_cond);
    pthread_mutex_unlock(&dev->rt_lock);
    if (self) {
        /* Joining ourselves would deadlock: the loop ends after this
         * return and finishes the teardown; nobody joins a detached
         * thread. */
        pthread_detach(pthread_self());
        return false;
    }
    if (started)
        pthread_join(dev->rt_thread, NULL);
    return true;
}
