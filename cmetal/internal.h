/*
 * internal.h -- what the files of the backend-neutral core and the
 * backends share: the layout of the core's objects and the entry points
 * one core file offers another, grouped by the file that defines them.
 * Not part of the ABI; never fed to cffi.
 *
 * The core owns every policy: reference counts, residency staging and
 * sharding, the pool, in-flight holds, statistics, locking, fault
 * injection. A backend is the table of primitives in backend.h.
 *
 * Layers, lowest first. A file calls only into files of lower layers
 * (a layer below reaches one above only through hooks the upper one
 * installs), and only backend.c names a backend:
 *   error.c
 *   safetensors.c                        (the safetensors header scanner)
 *   host.c, metal.m                      (backends)
 *   fork.c
 *   backend.c, memory.c
 *   residency.c
 *   residency_thread.c
 *   device.c
 *   storage.c, compute.c
 *   cmdbuf.c, pool.c
 *   interop.c
 *   pycapsule.c
 * tests/test_c_layers.py checks this against the symbols each file's
 * object defines and needs.
 *
 * Locks, their order and what each guards: LOCKING.md (the one place).
 */
#ifndef CMETAL_INTERNAL_H
#define CMETAL_INTERNAL_H

#include "backend.h"
#include "cmetal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>

#if defined(__GNUC__) || defined(__clang__)
#define CM_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define CM_PRINTF(fmt, args)
#endif

/* ------------------------------------------------------------------ */
/* Errors (error.c)                                                    */
/* ------------------------------------------------------------------ */

/* Record status and a formatted message as this thread's last error and
 * return status, so failures read `return cm__fail(CM_ERR_..., "...")`.
 * errno is left as the caller had it: after a CM_ERR_IO it still names
 * the system call's failure. */
int cm__fail(int status, const char *fmt, ...) CM_PRINTF(2, 3);

/* Format a byte count for messages ("4096 bytes", "3.2 GiB"). */
const char *cm__fmt_bytes(uint64_t n, char *buf, size_t cap);
#define BYTES(n, buf) cm__fmt_bytes((n), (buf), sizeof(buf))

/* ------------------------------------------------------------------ */
/* Core objects                                                        */
/* ------------------------------------------------------------------ */

typedef struct cm_shard {
    void *rset;                       /* backend residency set            */
    uint64_t count;                   /* members (staged view)            */
    uint64_t committed_count;
    uint64_t bytes;                   /* members' allocated bytes         */
    uint64_t commit_count;            /* successful commits               */
    bool pending;
} cm_shard_t;

/* One native allocation in the device's residency set (backend.h,
 * allocation_of): an MTLBuffer however many storages share it, or the
 * heap buffers were cut from. Guarded by dev->lock, in dev->members. */
typedef struct cm_member {
    void *allocation;                 /* borrowed: a registered storage (or
                                         one waiting in the release list)
                                         keeps a buffer of it alive      */
    uint64_t size;                    /* its allocated bytes              */
    uint64_t storages;                /* registered storages; 0 while a
                                         failed removal is owed          */
    unsigned shard;
    struct cm_member *next;           /* hash chain                       */
} cm_member_t;

/* Who keeps a storage once its last reference dies (a pool installs
 * itself when it makes one). The storage holds a reference on its owner
 * until it is freed, and knows only "my owner", never what the owner is.
 * Both hooks run with no lock held. */
typedef struct cm_storage_owner {
    /* The last reference to s died: keep s (true: it lives on in the
     * owner's cache, unreferenced) or refuse (false: s is destroyed). */
    bool (*take_back)(void *owner, cm_storage_t *s);
    /* s was destroyed: drop the reference it held on its owner. */
    void (*release)(void *owner);
} cm_storage_owner_t;

struct cm_storage {
    atomic_uint_fast64_t refcount;
    cm_device_t *dev;                 /* strong reference                 */
    const cm_storage_owner_t *owner_hooks; /* NULL when nobody keeps it   */
    void *owner;                      /* strong reference, for the hooks  */
    int kind;                         /* CM_STORAGE_*                     */
    int writable;
    uint8_t *contents;                /* CPU address of byte 0            */
    uint64_t byte_len;
    uint64_t requested_len;
    uint64_t allocated;               /* bytes the backend allocated      */
    cm_native_t native;               /* NULL only when not GPU-visible   */
    uint64_t native_offset;           /* byte 0 inside the native buffer  */
    uint64_t alloc_len;               /* length passed to buffer_alloc    */
    /* What gives the memory back once nothing may touch it (a mapping's
     * munmap, an external owner's release). Wrapped memory hands it to
     * the backend (backend_releases), which runs it when the native
     * object dies; an adopted native buffer's runs after buffer_unwrap. */
    void (*ext_release)(void *ctx);
    void *ext_ctx;
    bool backend_releases;
    bool untracked;                   /* backend.h, native_untracked      */
    cm_member_t *member;              /* guarded by dev->lock; NULL when
                                         not registered                   */
    atomic_uint_fast64_t inflight_writers;
    /* the owner's cache links, guarded by the owner's lock while cached */
    cm_storage_t *class_prev, *class_next;
    cm_storage_t *lru_prev, *lru_next;
    /* Once dead and waiting for its removal's commit (residency.c, the
     * release list under dev->lock): the shard and that shard's commit
     * count when the removal was staged, when it was, and the link. A
     * storage whose removal failed keeps its member, the removal owed. */
    bool deferred;
    unsigned grave_shard;
    uint64_t grave_commit;
    double grave_time;
    cm_storage_t *grave_next;
};

/* Operations a command buffer carries; offsets are from byte 0 of the
 * storage (cm_storage.contents); a backend that binds native buffers adds
 * native_offset. */
enum { CM_OP_COPY = 1, CM_OP_FILL = 2, CM_OP_DISPATCH = 3 };

typedef struct cm_op {
    int kind;
    cm_storage_t *src;                /* COPY                             */
    cm_storage_t *dst;                /* COPY, FILL                       */
    uint64_t src_offset, dst_offset, nbytes;
    int value;                        /* FILL                             */
    cm_kernel_t *kernel;              /* DISPATCH (held)                  */
    uint64_t grid[3], threadgroup[3];
    size_t nbufs;
    cm_storage_t **bufs;              /* malloc'd, nbufs                  */
    uint64_t *offsets;                /* malloc'd, nbufs                  */
    size_t nconsts;
    uint8_t *consts;                  /* malloc'd, concatenated           */
    uint64_t *const_sizes;            /* malloc'd, nconsts                */
} cm_op_t;

struct cm_cmdbuf {
    atomic_uint_fast64_t refcount;    /* caller's + one while submitted   */
    cm_device_t *dev;                 /* strong reference                 */
    int status;                       /* CM_CB_*, guarded by dev->cb_lock */
    char *error;                      /* backend message on CM_CB_ERROR   */
    cm_op_t *ops;
    size_t nops, ops_cap;
    cm_storage_t **holds;             /* one reference each               */
    size_t nholds, holds_cap;
    cm_storage_t **writes;            /* subset of holds: inflight_writers */
    size_t nwrites, writes_cap;
    uint64_t seq;                     /* submission order                 */
    void *backend_data;               /* free for the backend's use       */
    /* What the backend runs when the buffer is done (cm__cmdbuf_complete
     * below); set by the core when it creates the buffer. */
    void (*complete)(cm_cmdbuf_t *cb, int status, const char *message);
    /* core only: serialises encoders of one command buffer, and the open-
     * addressing sets that keep holds and writes free of duplicates */
    pthread_mutex_t enc_lock;
    cm_storage_t **hold_set, **write_set;
    size_t hold_set_cap, write_set_cap;
};

/* Backends call this exactly once per submitted command buffer, from any
 * thread, after the ops ran (status CM_OK) or failed (status != CM_OK,
 * message describes it): the core's completion releases the holds, then
 * marks the buffer done and wakes waiters (cmdbuf.c). Through the hook on
 * the buffer, so a backend never names the layer above it. */
static inline void cm__cmdbuf_complete(cm_cmdbuf_t *cb, int status, const char *message)
{
    cb->complete(cb, status, message);
}

struct cm_kernel {
    atomic_uint_fast64_t refcount;
    cm_device_t *dev;                 /* strong reference                 */
    void *pipeline;                   /* backend object                   */
    cm_kernel_info_t info;
    cm_kernel_t *cache_next;          /* library's cache list             */
};

/* Something whose locks a forked child may need, registered with fork.c,
 * which runs its hooks inside fork(): a device (in the registry of open
 * devices), or an object of a device (a pool, a library: in the device's
 * list, whose hooks run with the device's own locks held). LOCKING.md,
 * "fork()". */
typedef struct cm_fork_hooks {
    /* In the forking thread before fork(): take the owner's locks. */
    void (*prepare)(void *owner);
    /* In the parent after fork(): release them. */
    void (*parent)(void *owner);
    /* In the child after fork(): release them, and settle the owner for a
     * device that is now inherited (a pool stops caching). */
    void (*child)(void *owner);
} cm_fork_hooks_t;

typedef struct cm_fork_entry {
    const cm_fork_hooks_t *hooks;
    void *owner;
    struct cm_fork_entry *prev, *next; /* the registry's, fork.c's lock   */
} cm_fork_entry_t;

struct cm_library {
    atomic_uint_fast64_t refcount;
    cm_device_t *dev;                 /* strong reference                 */
    void *native;                     /* backend object                   */
    pthread_mutex_t lock;             /* guards the kernel cache          */
    cm_kernel_t *kernels;             /* one reference each               */
    cm_fork_entry_t fork;             /* in dev->fork_entries while alive */
};

/* A cache that can give memory back when an allocation would pass the
 * device's memory limit (a pool). Its owner registers it with the device
 * and unregisters it once the owner's reference count has reached zero,
 * before freeing it; the device knows only "a cache", never what it is.
 * cm__memory_trim walks the registrations under dev->lock but trims with
 * dev->lock dropped, holding a reference on the owner meanwhile (the walk
 * and why it is safe: memory.c). */
typedef struct cm_trimmer_hooks {
    /* Take a reference on owner unless its count already reached zero (it
     * is being freed). Called with dev->lock held: it must not block. */
    bool (*try_retain)(void *owner);
    /* Drop that reference; may free the owner. No lock held. */
    void (*release)(void *owner);
    /* Free what the owner caches; returns the bytes freed. No lock held. */
    uint64_t (*trim)(void *owner);
} cm_trimmer_hooks_t;

typedef struct cm_trimmer {
    const cm_trimmer_hooks_t *hooks;
    void *owner;
    struct cm_trimmer *prev, *next;   /* dev->trimmers, under dev->lock   */
} cm_trimmer_t;

struct cm_device {
    atomic_uint_fast64_t refcount;
    const cm_backend_t *backend;
    void *state;                      /* backend state                    */
    pid_t pid;                        /* the process that opened it       */
    cm_device_info_t info;            /* immutable after open             */

    /* Statistics; atomics so the hot paths need no lock. */
    atomic_uint_fast64_t active_bytes, peak_bytes, live_storages;
    atomic_uint_fast64_t alloc_count, free_count;
    atomic_uint_fast64_t memory_limit;

    /* Allocated bytes of dead device-owned storages waiting for their
     * removal's commit (memory.c; held to the limit with active_bytes). */
    atomic_uint_fast64_t deferred_bytes;

    /* dev->lock guards residency, the trimmers and fault injection. */
    pthread_mutex_t lock;
    cm_shard_t shards[CM_MAX_RESIDENCY_SHARDS];
    unsigned nshards;
    uint64_t shard_cap;
    uint64_t rs_commit_count, rs_adds, rs_removes, keepalive_requests;
    cm_member_t **members;            /* hash of cm_member_t by allocation */
    size_t member_buckets, member_count;
    /* Dead storages whose removal waits for its commit, oldest first, and
     * the bytes of their allocations. */
    cm_storage_t *grave_head, *grave_tail;
    uint64_t grave_count, grave_bytes;
    uint64_t release_threshold;
    /* The first residency failure no caller could be told of, kept for
     * the next commit (0: none). */
    int rs_error;
    char rs_error_msg[512];
    cm_trimmer_t *trimmers;           /* caches to trim, weak             */
    uint64_t fail_nth, fail_min;      /* fault injection                  */

    /* dev->cb_lock guards command-buffer states and the counters below;
     * cb_cond is broadcast on every completion. */
    pthread_mutex_t cb_lock;
    pthread_cond_t cb_cond;
    uint64_t submitted, completed;

    /* Held from the residency flush through backend->submit, so command
     * buffers reach the backend in the order of their seq numbers even
     * when threads commit concurrently (a queue runs them in the order it
     * receives them). */
    pthread_mutex_t submit_lock;

    /* The residency thread (keep-alive requests, idle release commits)
     * and its settings, guarded by rt_lock. flush_at < 0: no commit due.
     * rt_finish: the device's last reference died on the thread itself,
     * which finishes the teardown (finish_teardown) when its loop ends. */
    pthread_mutex_t rt_lock;
    pthread_cond_t rt_cond;
    pthread_t rt_thread;
    bool rt_started, rt_stop, rt_finish;
    double ka_seconds, ka_interval, ka_last_submit, ka_next_request;
    double release_idle, flush_at;
    void (*finish_teardown)(cm_device_t *dev);

    /* What the device's caches (its pools) hold, for cm_device_stats; the
     * caches keep these counts. */
    atomic_uint_fast64_t cached_bytes, cached_storages;

    /* fork.c: the device's entry in the registry of open devices and its
     * objects that join the fork protocol, under fork.c's lock. In a
     * forked child, inherited is set (the device was opened before the
     * fork: its threads stayed in the parent) and inherited_frees says
     * whether its backend can still free its memory here; both are written
     * only by the fork handler, before the child has other threads. */
    cm_fork_entry_t fork;
    cm_fork_entry_t *fork_entries;
    bool inherited, inherited_frees;
};

/* ------------------------------------------------------------------ */
/* Entry points one core file offers the others, by defining file      */
/* ------------------------------------------------------------------ */

/* fork.c: fork() safety; the registry takes fork.c's own lock, so call
 * these with no core lock held (a cb->enc_lock excepted). */
/* Register an open device (installing the fork handlers the first time);
 * fails only when the handlers cannot be installed. */
int cm__fork_add_device(cm_device_t *dev);
void cm__fork_remove_device(cm_device_t *dev);
/* Register / unregister an object of dev whose locks join the protocol. */
void cm__fork_add(cm_device_t *dev, cm_fork_entry_t *e);
void cm__fork_remove(cm_device_t *dev, cm_fork_entry_t *e);
/* CM_OK when dev was opened by this process; else fail with
 * CM_ERR_DEVICE_NOT_FOUND: "cannot <what>: ... open a new device in this
 * process". Every call that would make something new on a device or wait
 * for its threads asks this first, before taking any lock. */
int cm__fork_refuse(const cm_device_t *dev, const char *what);
/* Whether the backend may be asked to free dev's memory and objects: in
 * the process that opened dev, or in a child when dev's backend said so. */
bool cm__fork_may_free(const cm_device_t *dev);

/* memory.c: a device's memory budget, and giving back the memory of
 * dead storages. */
/* Reserve len bytes of active memory under the limit (which holds
 * active_bytes + deferred_bytes); false if they do not fit. */
bool cm__memory_reserve(cm_device_t *dev, uint64_t len);
/* Count len bytes as active without holding them to the limit. */
void cm__memory_add(cm_device_t *dev, uint64_t len);
/* Give back len bytes reserved or added. */
void cm__memory_release(cm_device_t *dev, uint64_t len);
/* s died but its memory waits for its removal's commit: move its
 * allocated bytes from active to deferred (device-owned kinds). */
void cm__memory_defer(cm_device_t *dev, cm_storage_t *s);
/* Give back the native object and memory of a dead storage, through the
 * backend when it may free (cm__fork_may_free; else what releases the
 * memory runs directly), update the statistics, and free the record.
 * Runs outside code (an external owner's release): no lock held. */
void cm__memory_give_back(cm_device_t *dev, cm_storage_t *s);
/* True when fault injection says this allocation of len bytes fails;
 * every call counts as one allocation (dev->lock taken inside). */
bool cm__memory_fault_fires(cm_device_t *dev, uint64_t len);
/* The limit a device starts with, from its backend and info. */
uint64_t cm__memory_default_limit(const cm_device_t *dev);
/* Register / unregister a cache to trim (dev->lock taken inside). */
void cm__memory_add_trimmer(cm_device_t *dev, cm_trimmer_t *t);
void cm__memory_remove_trimmer(cm_device_t *dev, cm_trimmer_t *t);
/* Trim every registered cache of dev; returns the bytes freed. Call with
 * no lock held. */
uint64_t cm__memory_trim(cm_device_t *dev);

/* residency.c: membership per native allocation, shards, and the list of
 * dead storages whose removal waits for its commit. Each takes dev->lock
 * but cm__residency_init, which runs before the device is shared; those
 * that give memory back do it after dropping every lock they took. */
/* Set the shard cap and release policy a device starts with. */
void cm__residency_init(cm_device_t *dev);
/* Register a storage: its allocation joins the set (an add is staged)
 * unless another storage registered it already. */
int cm__residency_add(cm_device_t *dev, cm_storage_t *s);
/* What cm__residency_remove did with a dying storage. */
enum {
    CM_REMOVAL_NONE,        /* nothing to wait for: give its memory back now */
    CM_REMOVAL_DEFERRED,    /* s waits in the release list (not the caller's) */
    CM_REMOVAL_FIRST,       /* ... and was the first: arm the idle timer      */
    CM_REMOVAL_OVER,        /* ... and the list passed the threshold: flush   */
};
/* Unregister a dying storage; its allocation's removal is staged when it
 * was the last storage of it, and then s goes to the release list. */
int cm__residency_remove(cm_device_t *dev, cm_storage_t *s);
/* Commit the pending shards and give back what their commits released;
 * a failure is recorded for the next commit. Returns the allocated bytes
 * given back. No lock held. */
uint64_t cm__residency_flush_deferred(cm_device_t *dev);
/* The same for the idle timer: only when the oldest waiting removal was
 * staged idle seconds ago or more. Returns when the next one is due
 * (monotonic seconds), or -1 when nothing waits. No lock held. */
double cm__residency_flush_due(cm_device_t *dev, double idle);
/* The flush of a submission, under its locks: commits the pending shards
 * and detaches into *released what their commits released; the caller
 * gives that back (cm__residency_give_back) once it holds no lock. */
int cm__residency_flush_detach(cm_device_t *dev, cm_storage_t **released);
void cm__residency_give_back(cm_device_t *dev, cm_storage_t *released);
/* Fail with CM_ERR_RESIDENCY, giving the reason residency is off. */
int cm__residency_off(cm_device_t *dev);
/* Re-request residency of every shard (keep-alive). */
void cm__residency_request(cm_device_t *dev);
/* Destroy every shard and give back every dead storage still waiting;
 * the device's last reference died. */
void cm__residency_close(cm_device_t *dev);
/* Monotonic seconds. */
double cm__now_seconds(void);

/* residency_thread.c */
/* A command buffer was submitted: restart the keep-alive window. */
void cm__keepalive_note_submit(cm_device_t *dev);
/* The release list was empty and has an entry now: make sure the idle
 * timer commits it (starting the thread if needed). */
void cm__release_timer_arm(cm_device_t *dev);
/* Stop and join the residency thread, if it runs. Returns false when
 * called on that thread itself: it then finishes the device's teardown
 * (dev->finish_teardown) when its loop ends, and the caller must not. */
bool cm__residency_thread_stop(cm_device_t *dev);

/* device.c */
void cm__device_retain(cm_device_t *dev);

/* storage.c */
/* Create a storage of exactly len bytes through the backend, applying the
 * memory limit (trimming the device's caches, committing the removals
 * that hold memory back, and retrying once), fault injection and
 * statistics. Does not register residency. */
int cm__storage_new(cm_device_t *dev, uint64_t len, int kind, cm_storage_t **out);
/* End a storage whose refcount reached zero and that its owner does not
 * keep: unregister it (staging its allocation's removal), give its memory
 * back now or once that removal is committed, update statistics, then
 * drop the storage's references on its owner and device. */
void cm__storage_destroy(cm_storage_t *s);

/* compute.c: fail unless kernel k accepts a launch of this grid and
 * threadgroup (every dimension at least 1, no more threads per
 * threadgroup than its pipeline allows). */
int cm__kernel_check_launch(const cm_kernel_t *k, const uint64_t *grid,
                            const uint64_t *threadgroup);

#endif /* CMETAL_INTERNAL_H */
