/*
 * control.m -- the simulator's process-wide state: configuration, fault
 * and raise knobs, the validation log, the kernel registry, statistics
 * and the simulator lock (see sim.h for what it guards).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sim.h"

msim_counters_t msim__c;

static pthread_mutex_t sim_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static pthread_cond_t sim_cond;

/* (Re)initialise the simulator's locks: at load, and in a forked child,
 * where a recursive mutex locked by the parent's thread cannot be
 * unlocked (its owner is a thread the child does not have). */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void init_locks(void)
{
    pthread_mutexattr_t mattr;
    pthread_mutexattr_init(&mattr);
    pthread_mutexattr_settype(&mattr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&sim_lock, &mattr);
    pthread_mutexattr_destroy(&mattr);
    pthread_condattr_t cattr;
    pthread_condattr_init(&cattr);
    pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
    pthread_cond_init(&sim_cond, &cattr);
    pthread_condattr_destroy(&cattr);
    pthread_mutex_init(&log_lock, NULL);
}

void msim__lock(void)
{
    pthread_mutex_lock(&sim_lock);
}

void msim__unlock(void)
{
    pthread_mutex_unlock(&sim_lock);
}

double msim__now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

bool msim__wait_until(double deadline)
{
    if (deadline <= msim__now())
        return false;
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L)
        ts.tv_nsec = 999999999L;
    return pthread_cond_timedwait(&sim_cond, &sim_lock, &ts) != ETIMEDOUT;
}

void msim__broadcast(void)
{
    pthread_cond_broadcast(&sim_cond);
}

/* ---- configuration ------------------------------------------------------------- */

static msim_config_t config;          /* guarded by sim_lock */
static atomic_int default_device_nil;

static uint64_t physical_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0)
        return (uint64_t)8 << 30;
    return (uint64_t)pages * (uint64_t)page;
}

static void set_defaults_locked(void)
{
    uint64_t ram = physical_memory();
    config.macos_major = 15;
    config.latency_us = 0;
    config.max_buffer_length = ram / 2 / MSIM_PAGE_SIZE * MSIM_PAGE_SIZE;
    config.recommended_working_set = ram / 4 * 3;
}

msim_config_t msim__config(void)
{
    msim__lock();
    msim_config_t c = config;
    msim__unlock();
    return c;
}

int msim_configure(int macos_major, uint64_t latency_us, uint64_t max_buffer_length,
                   uint64_t recommended_working_set)
{
    if (macos_major < 11 || macos_major > 99 || latency_us > 10000000 ||
        (max_buffer_length != 0 && max_buffer_length < MSIM_PAGE_SIZE))
        return -1;
    msim__lock();
    uint64_t generation = config.generation;
    set_defaults_locked();
    config.macos_major = macos_major;
    config.latency_us = latency_us;
    if (max_buffer_length)
        config.max_buffer_length = max_buffer_length;
    if (recommended_working_set)
        config.recommended_working_set = recommended_working_set;
    config.generation = generation + 1;
    msim__unlock();
    return 0;
}

bool msim__default_device_nil(void)
{
    return atomic_load(&default_device_nil) != 0;
}

void msim_set_default_device_nil(int on)
{
    atomic_store(&default_device_nil, on != 0);
}

/* ---- faults ------------------------------------------------------------------------ */

static atomic_uint_fast64_t faults[5];

int msim_fail_next(int what, uint64_t count)
{
    if (what < MSIM_FAULT_NEW_BUFFER || what > MSIM_FAULT_LIBRARY)
        return -1;
    atomic_store(&faults[what], count);
    return 0;
}

static atomic_uint_fast64_t misalign;

void msim_misalign_next(uint64_t count)
{
    atomic_store(&misalign, count);
}

bool msim__take_misalign(void)
{
    uint_fast64_t n = atomic_load(&misalign);
    while (n > 0)
        if (atomic_compare_exchange_weak(&misalign, &n, n - 1))
            return true;
    return false;
}

bool msim__take_fault(int what)
{
    uint_fast64_t n = atomic_load(&faults[what]);
    while (n > 0)
        if (atomic_compare_exchange_weak(&faults[what], &n, n - 1))
            return true;
    return false;
}

#define MSIM_MAX_RAISE 8
#define MSIM_SELECTOR_MAX 128

/* What an armed selector does: raise an NSException, or return nil. */
enum { KNOB_RAISE = 1, KNOB_NIL = 2 };

static struct {
    char selector[MSIM_SELECTOR_MAX];
    int what;
    uint64_t count;
} raise_knobs[MSIM_MAX_RAISE];    /* guarded by sim_lock */
static atomic_int raise_armed;

static int arm(const char *selector, int what, uint64_t count)
{
    if (!selector || !*selector || strlen(selector) >= MSIM_SELECTOR_MAX)
        return -1;
    int rc = -1, armed = 0;
    msim__lock();
    int slot = -1;
    for (int i = 0; i < MSIM_MAX_RAISE; i++) {
        if (raise_knobs[i].count && raise_knobs[i].what == what &&
            strcmp(raise_knobs[i].selector, selector) == 0)
            slot = i;
        else if (slot < 0 && !raise_knobs[i].count)
            slot = i;
    }
    if (slot >= 0) {
        snprintf(raise_knobs[slot].selector, MSIM_SELECTOR_MAX, "%s", selector);
        raise_knobs[slot].what = what;
        raise_knobs[slot].count = count;
        rc = 0;
    }
    for (int i = 0; i < MSIM_MAX_RAISE; i++)
        armed |= raise_knobs[i].count != 0;
    atomic_store(&raise_armed, armed);
    msim__unlock();
    return rc;
}

int msim_raise_next(const char *selector, uint64_t count)
{
    return arm(selector, KNOB_RAISE, count);
}

int msim_nil_next(const char *selector, uint64_t count)
{
    return arm(selector, KNOB_NIL, count);
}

void msim_reset_faults(void)
{
    for (int i = 0; i < 5; i++)
        atomic_store(&faults[i], 0);
    atomic_store(&misalign, 0);
    msim__lock();
    memset(raise_knobs, 0, sizeof raise_knobs);
    atomic_store(&raise_armed, 0);
    msim__unlock();
    atomic_store(&default_device_nil, 0);
}

/* The armed knob (KNOB_*) that fires for this call, or 0. */
static int take_knob(SEL cmd, bool nullable)
{
    if (!atomic_load_explicit(&raise_armed, memory_order_relaxed))
        return 0;
    const char *name = sel_getName(cmd);
    int fired = 0, armed = 0;
    msim__lock();
    for (int i = 0; i < MSIM_MAX_RAISE; i++) {
        if (!fired && raise_knobs[i].count && strcmp(raise_knobs[i].selector, name) == 0 &&
            (raise_knobs[i].what == KNOB_RAISE || nullable)) {
            raise_knobs[i].count--;
            fired = raise_knobs[i].what;
        }
        armed |= raise_knobs[i].count != 0;
    }
    atomic_store(&raise_armed, armed);
    msim__unlock();
    return fired;
}

static void fire_raise(id self, SEL cmd)
{
    MSIM_COUNT(exceptions_raised, 1);
    msim__raise(@"MTLSimulatedFault", "simulated exception from -[%s %s]",
                class_getName(object_getClass(self)), sel_getName(cmd));
}

void msim__entry(id self, SEL cmd)
{
    if (take_knob(cmd, false) == KNOB_RAISE)
        fire_raise(self, cmd);
}

bool msim__entry_nullable(id self, SEL cmd)
{
    int fired = take_knob(cmd, true);
    if (fired == KNOB_RAISE)
        fire_raise(self, cmd);
    return fired == KNOB_NIL;
}

/* ---- validation log ------------------------------------------------------------------ */

#define MSIM_LOG_KEEP 4096

static char *log_ring[MSIM_LOG_KEEP];    /* guarded by log_lock */
static uint64_t log_total;

void msim__invalid(const char *rule, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *what = NULL;
    int n = vasprintf(&what, fmt, ap);
    va_end(ap);
    char *line = NULL;
    if (n < 0 || asprintf(&line, "[%s] %s", rule, what) < 0)
        line = NULL;
    free(what);
    if (getenv("METALSIM_VERBOSE"))
        fprintf(stderr, "metalsim: validation error: %s\n", line ? line : rule);
    pthread_mutex_lock(&log_lock);
    uint64_t slot = log_total++ % MSIM_LOG_KEEP;
    free(log_ring[slot]);
    log_ring[slot] = line;
    pthread_mutex_unlock(&log_lock);
}

uint64_t msim_validation_count(void)
{
    pthread_mutex_lock(&log_lock);
    uint64_t n = log_total;
    pthread_mutex_unlock(&log_lock);
    return n;
}

size_t msim_validation_message(uint64_t index, char *buf, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&log_lock);
    if (index < log_total && index + MSIM_LOG_KEEP >= log_total) {
        const char *line = log_ring[index % MSIM_LOG_KEEP];
        if (!line)
            line = "(out of memory recording this message)";
        n = strlen(line);
        if (buf && cap)
            snprintf(buf, cap, "%s", line);
    }
    pthread_mutex_unlock(&log_lock);
    return n;
}

/* ---- kernel registry --------------------------------------------------------------------- */

#define MSIM_MAX_KERNELS 256
#define MSIM_KERNEL_NAME_MAX 128

typedef struct msim_kernel {
    char name[MSIM_KERNEL_NAME_MAX];
    msim_kernel_fn fn;
    void *ctx;
} msim_kernel_t;

static msim_kernel_t kernels[MSIM_MAX_KERNELS];   /* guarded by sim_lock */
static size_t nkernels;

int msim_register_kernel(const char *name, msim_kernel_fn fn, void *ctx)
{
    if (!name || !*name || strlen(name) >= MSIM_KERNEL_NAME_MAX)
        return -1;
    int rc = 0;
    msim__lock();
    size_t i = 0;
    while (i < nkernels && strcmp(kernels[i].name, name) != 0)
        i++;
    if (!fn) {
        if (i < nkernels)
            kernels[i] = kernels[--nkernels];
    } else if (i < nkernels) {
        kernels[i].fn = fn;
        kernels[i].ctx = ctx;
    } else if (nkernels < MSIM_MAX_KERNELS) {
        snprintf(kernels[nkernels].name, MSIM_KERNEL_NAME_MAX, "%s", name);
        kernels[nkernels].fn = fn;
        kernels[nkernels].ctx = ctx;
        nkernels++;
    } else {
        rc = -1;
    }
    msim__unlock();
    return rc;
}

void msim_unregister_kernels_with_ctx(void *ctx)
{
    msim__lock();
    for (size_t i = 0; i < nkernels;) {
        if (kernels[i].ctx == ctx)
            kernels[i] = kernels[--nkernels];
        else
            i++;
    }
    msim__unlock();
}

bool msim__kernel_find(const char *name, msim_kernel_fn *fn, void **ctx)
{
    bool found = false;
    msim__lock();
    for (size_t i = 0; i < nkernels; i++) {
        if (strcmp(kernels[i].name, name) == 0) {
            *fn = kernels[i].fn;
            *ctx = kernels[i].ctx;
            found = true;
            break;
        }
    }
    msim__unlock();
    return found;
}

/* ---- statistics --------------------------------------------------------------------------- */

void msim_get_stats(msim_stats_t *out)
{
    memset(out, 0, sizeof *out);
#define COPY(f) out->f = atomic_load(&msim__c.f)
    COPY(live_buffers);
    COPY(live_bytes);
    COPY(live_heaps);
    COPY(live_heap_bytes);
    COPY(buffers_created);
    COPY(deallocators_run);
    COPY(nocopy_unmapped_before_release);
    COPY(residency_sets_live);
    COPY(residency_commits);
    COPY(residency_adds);
    COPY(residency_removes);
    COPY(residency_requests);
    COPY(residency_members);
    COPY(command_buffers_created);
    COPY(command_buffers_committed);
    COPY(command_buffers_completed);
    COPY(command_buffers_failed);
    COPY(command_buffers_blocked);
    COPY(encoders_created);
    COPY(fences_created);
    COPY(event_commands);
    COPY(blits);
    COPY(dispatches);
    COPY(libraries_compiled);
    COPY(libraries_fast_math);
    COPY(exceptions_raised);
#undef COPY
    out->live_objects = msim__live_objects();
    out->residency_held_bytes = msim__held_bytes();
    out->validation_errors = msim_validation_count();
}

/* ---- process set-up ----------------------------------------------------------------------- */

void msim__builtin_kernels_register(void);
void msim__gpu_atfork_child(void);

static void atfork_prepare(void)
{
    pthread_mutex_lock(&log_lock);
    pthread_mutex_lock(&sim_lock);
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&sim_lock);
    pthread_mutex_unlock(&log_lock);
}

static void atfork_child(void)
{
    init_locks();
    msim__gpu_atfork_child();
}

__attribute__((constructor)) static void msim_init(void)
{
    init_locks();
    set_defaults_locked();
    msim__install_runtime_hooks();
    msim__builtin_kernels_register();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
