/*
 * backend.h -- the contract between the core and a backend: the table of
 * primitive operations a backend fills in (cm_backend_t), and the registry
 * of backends this build has (backend.c).
 *
 * A backend is the table and nothing more, so the behaviour tests observe
 * on the host backend is the code that runs on Metal. The core reaches a
 * backend only through its table (backend.c alone names the tables), and
 * a backend names no file of the core above error.c: what it may use is
 * the objects it is handed (their layout is in internal.h), cm__fail /
 * cm__fmt_bytes, and cm__cmdbuf_complete, which runs the completion the
 * core put on the command buffer.
 * Locking: see LOCKING.md.
 */
#ifndef CMETAL_BACKEND_H
#define CMETAL_BACKEND_H

#include "cmetal.h"

#include <stdbool.h>
#include <stdint.h>

/* A backend-native object: an id<MTLBuffer> (bridged, +1) on Metal; on
 * the host backend the contents pointer itself. Opaque to the core. */
typedef void *cm_native_t;

typedef struct cm_backend {
    const char *name;       /* "host" / "metal"                           */
    int kind;               /* CM_BACKEND_*                               */

    int (*available)(void);

    /* Create the backend's per-device state (queue, worker thread, ...)
     * and fill info: name, has_unified_memory, max_buffer_length,
     * recommended_max_working_set_size, page_size, registry_id. Set
     * info->residency_enabled = 0 with a reason when the backend cannot
     * make residency sets (Metal before macOS 15); the core clears it too
     * when the caller asked for no residency. */
    int (*open)(cm_device_t *dev, void **state, cm_device_info_t *info);

    /* Optional. The bytes this backend's buffers can take before the
     * machine suffers, which the core makes the device's default memory
     * limit: the host backend's buffers are plain process memory, so past
     * the machine's RAM the OS swaps or kills the process. NULL or 0: GPU
     * memory, which can page past the recommended working set; the core
     * then allows the working set and half as much again. */
    uint64_t (*memory_ceiling)(void *state);

    /* Optional, all three or none: fork() support (fork.c, LOCKING.md).
     * Called for each open device of this backend, inside fork(), with
     * the core's locks of the device held. fork_prepare (in the forking
     * thread): take every lock of state, so that no thread of the backend
     * is inside one at the fork; a backend thread must never hold one of
     * them while it waits for the core or runs a completion. fork_parent:
     * release them. fork_child (in the child, where the backend's threads
     * no longer run): release them, never join or signal those threads,
     * and return whether this process may still free the device's memory
     * and objects (buffer_free, buffer_unwrap, library_release,
     * kernel_release): true for plain process memory. The core never
     * submits to, allocates on or waits for an inherited device. Without
     * these hooks, the child leaves the device's memory to its exit. */
    void (*fork_prepare)(void *state);
    void (*fork_parent)(void *state);
    bool (*fork_child)(void *state);

    /* Tear the state down. Called once, when the device's last reference
     * dies; every storage, shard, command buffer and kernel is gone by
     * then. May run on one of the backend's own threads (a completion
     * dropped the last reference): the backend must then not join that
     * thread but let it finish the teardown itself. */
    void (*close)(void *state);

    /* len bytes (already checked: 0 < len <= max_buffer_length),
     * zero-filled, page-aligned, CPU-visible at *contents; *allocated is
     * what the allocation really occupies (Metal: allocatedSize, whole
     * 16 KiB pages on Apple Silicon; host: len rounded up to its page). */
    int (*buffer_alloc)(void *state, uint64_t len, cm_native_t *native,
                        uint8_t **contents, uint64_t *allocated);
    void (*buffer_free)(void *state, cm_native_t native, uint8_t *contents,
                        uint64_t len);

    /* Make a native buffer over caller memory without copying (file
     * mappings, external memory), *allocated as for buffer_alloc. ptr is
     * page-aligned and len a whole number of pages when the core calls it
     * for a mapping. The backend reports CM_ERR_UNSUPPORTED for memory it
     * cannot wrap. release(ctx) (may be NULL) gives the memory back: on
     * success the backend runs it exactly once, on any thread, when the
     * native object dies, which may be after buffer_unwrap (Metal: from
     * the buffer's deallocator, once command buffers and residency sets
     * let go; host: in buffer_unwrap); on failure never. */
    int (*buffer_wrap)(void *state, void *ptr, uint64_t len, void (*release)(void *ctx),
                       void *ctx, cm_native_t *native, uint64_t *allocated);
    void (*buffer_unwrap)(void *state, cm_native_t native);

    /* Adopt (retain) a native buffer given by its handle: its contents,
     * length and allocated size. buffer_unwrap gives the reference back. */
    int (*buffer_adopt)(void *state, uint64_t handle, cm_native_t *native,
                        uint8_t **contents, uint64_t *len, uint64_t *allocated);

    /* The integer handle users see (MTLBuffer pointer) or 0. */
    uint64_t (*native_handle)(cm_native_t native);

    /* The native allocation a residency set holds for a buffer, and its
     * allocated bytes: the buffer itself, or the heap it was cut from (a
     * buffer of a heap makes the whole heap resident). *allocation stays
     * valid as long as the buffer. len is what the core knows of the
     * buffer (host: the buffer itself, len rounded up to its page). */
    void (*allocation_of)(void *state, cm_native_t native, uint64_t len, void **allocation,
                          uint64_t *allocated);

    /* Bytes the backend holds for this device, for statistics (Metal:
     * currentAllocatedSize; host: its own allocations and wraps). */
    uint64_t (*current_allocated_size)(void *state);

    /* Optional. Whether the backend leaves the ordering of work on an
     * adopted native buffer to its user (Metal: the buffer's hazard
     * tracking is Untracked, as MLX allocates); the storage then says so
     * (cm_storage.untracked) and submit orders the work on it itself. The
     * buffers a backend makes are always ordered. */
    bool (*native_untracked)(cm_native_t native);

    /* Residency-set primitives, called with the device's lock held; never
     * called when residency is off. rset_create makes shard `index` and
     * attaches it to the device's queue. add/remove (of an allocation
     * named by allocation_of) only stage; commit applies; request
     * re-requests residency (keep-alive). Each returns CM_OK or fails
     * with CM_ERR_RESIDENCY and a message (an add or remove that failed
     * staged nothing; a commit that failed applied nothing). rset_destroy
     * detaches and releases a shard at the device's teardown, when no
     * caller is left to tell: it cannot fail. */
    int (*rset_create)(void *state, unsigned index, void **rset);
    void (*rset_destroy)(void *state, void *rset);
    int (*rset_add)(void *rset, void *allocation);
    int (*rset_remove)(void *rset, void *allocation);
    int (*rset_commit)(void *rset);
    int (*rset_request)(void *rset);

    /* Optional, both or neither. prepare makes what a submission needs
     * that may block (Metal: the command buffer, which Metal makes the
     * caller wait for while the queue has 64 uncompleted ones). The core
     * calls it in the committing thread before the commit takes any lock,
     * so a thread waiting there stalls no other (LOCKING.md); *prepared
     * then goes to submit, or to unprepare when the commit fails before
     * it reaches submit. */
    int (*prepare)(void *state, void **prepared);
    void (*unprepare)(void *state, void *prepared);

    /* Run cb's ops (cb->ops[0..nops)) after every command buffer submitted
     * before it, without blocking the caller, and then call
     * cm__cmdbuf_complete(cb, status, message) exactly once from any
     * thread. A non-zero return means nothing was submitted and
     * cm__cmdbuf_complete must not be called. prepared is what prepare
     * made (NULL without one); submit owns it, whether it succeeds or
     * fails. The core calls submit for one device at a time, in the order
     * of the buffers' seq numbers (it holds its submit lock), so what a
     * backend keeps per device for submissions needs no lock of its own. */
    int (*submit)(void *state, cm_cmdbuf_t *cb, void *prepared);

    /* Compute; a backend without compute reports CM_ERR_UNSUPPORTED from
     * library_compile, so the others are never reached. fast_math: the
     * compiler may trade IEEE semantics for speed; else it must not. */
    int (*library_compile)(void *state, const char *source, bool fast_math, void **lib);
    void (*library_release)(void *lib);
    int (*kernel_create)(void *state, void *lib, const char *name,
                         void **pipeline, cm_kernel_info_t *info);
    void (*kernel_release)(void *pipeline);
} cm_backend_t;

extern const cm_backend_t cm_host_backend;
#if defined(CM_HAVE_METAL)
extern const cm_backend_t cm_metal_backend;
#endif

/* backend.c: the backend a device opens on. CM_BACKEND_AUTO takes the
 * first available backend in order of preference (Metal, then host); an
 * explicit kind that this build lacks or that is unavailable fails with
 * CM_ERR_DEVICE_NOT_FOUND, an unknown one with CM_ERR_INVALID_ARGUMENT. */
int cm__backend_pick(int backend, const cm_backend_t **out);

#endif /* CMETAL_BACKEND_H */
