/*
 * cmetal.h -- the C ABI of mlxbuf.
 *
 * Everything public is prefixed cm_. Handles are opaque and reference
 * counted. Every function that can fail returns an int status (CM_OK == 0)
 * and writes its results through out-parameters; on failure a thread-local
 * message, read with cm_last_error(), names the bad value and the limit.
 * Nothing here raises, aborts or prints. *_release functions accept NULL.
 *
 * build_ffi.py feeds this file to ffi.cdef after dropping the preprocessor
 * lines (everything starting with '#' except '#define NAME <integer>'), so
 * keep declarations in plain C that cffi can parse: no macros in
 * declarations, no inline functions.
 *
 * Threads: every function may be called from any thread, concurrently,
 * unless its comment says otherwise. The library is built so that cffi can
 * release the GIL around every call.
 */
#ifndef CMETAL_H
#define CMETAL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* Status codes                                                        */
/* ------------------------------------------------------------------ */

#define CM_OK 0
#define CM_ERR_INVALID_ARGUMENT 1    /* a value outside its limit          */
#define CM_ERR_OUT_OF_MEMORY 2       /* allocation failed or over a limit  */
#define CM_ERR_DEVICE_NOT_FOUND 3    /* the backend has no device here     */
#define CM_ERR_UNSUPPORTED 4         /* the backend lacks the capability   */
#define CM_ERR_RESIDENCY 5           /* residency-set operation failed     */
#define CM_ERR_COMMAND_BUFFER 6      /* command buffer misuse or failure   */
#define CM_ERR_SHADER_COMPILATION 7  /* the shader compiler rejected code  */
#define CM_ERR_KERNEL_NOT_FOUND 8    /* no function of that name           */
#define CM_ERR_IO 9                  /* a file operation failed (errno kept) */
#define CM_ERR_INTERNAL 10           /* a broken invariant: a bug          */

/* Backends. CM_BACKEND_AUTO opens Metal where it exists, else host. */
#define CM_BACKEND_AUTO 0
#define CM_BACKEND_HOST 1
#define CM_BACKEND_METAL 2

/* Flags for cm_device_open. */
#define CM_DEVICE_NO_RESIDENCY 1     /* never register anything            */

/* Command buffer states (cm_cmdbuf_status). */
#define CM_CB_NOT_COMMITTED 0
#define CM_CB_COMMITTED 1
#define CM_CB_COMPLETED 2
#define CM_CB_ERROR 3
#define CM_CB_DISCARDED 4

/* Storage kinds (cm_storage_info_t.kind). */
#define CM_STORAGE_DEVICE 0          /* cm_storage_alloc                   */
#define CM_STORAGE_POOLED 1          /* cm_pool_alloc                      */
#define CM_STORAGE_EXTERNAL 2        /* cm_storage_wrap_*                  */
#define CM_STORAGE_MAPPED 3          /* cm_storage_map_file                */

/* Limits. */
#define CM_NAME_MAX 128
#define CM_MAX_RESIDENCY_SHARDS 32   /* Metal: residency sets per queue    */
#define CM_MAX_KERNEL_ARGS 31        /* Metal: buffer argument table size  */
#define CM_COMPILE_FAST_MATH 1       /* cm_library_compile: fast math on   */

/* ------------------------------------------------------------------ */
/* Opaque handles                                                      */
/* ------------------------------------------------------------------ */

typedef struct cm_device cm_device_t;     /* a device and its queue       */
typedef struct cm_storage cm_storage_t;   /* one allocation               */
typedef struct cm_pool cm_pool_t;         /* a size-class buffer cache    */
typedef struct cm_cmdbuf cm_cmdbuf_t;     /* one command buffer           */
typedef struct cm_library cm_library_t;   /* compiled shader library      */
typedef struct cm_kernel cm_kernel_t;     /* compute pipeline             */

/* ------------------------------------------------------------------ */
/* Plain structs filled by the library                                 */
/* ------------------------------------------------------------------ */

typedef struct cm_device_info {
    int backend;                          /* CM_BACKEND_HOST / _METAL     */
    char name[CM_NAME_MAX];
    int has_unified_memory;
    uint64_t max_buffer_length;           /* bytes, per storage           */
    uint64_t recommended_max_working_set_size;
    uint64_t page_size;                   /* allocation granularity       */
    uint64_t registry_id;                 /* Metal registryID; 0 on host  */
    int residency_enabled;
    char residency_disabled_reason[CM_NAME_MAX]; /* "" when enabled       */
} cm_device_info_t;

/* Byte counts of memory are *allocated* bytes: what the backend took for
 * a storage, whole pages (16 KiB on Apple Silicon: a 64-byte storage
 * occupies 16384), not the bytes asked for (cm_storage_info_t has both). */
typedef struct cm_device_stats {
    uint64_t active_bytes;      /* allocated bytes of live device-owned
                                   storages (allocations, pool storages,
                                   file mappings), pool caches included;
                                   external storages excluded             */
    uint64_t peak_bytes;        /* max of active_bytes since reset        */
    uint64_t live_storages;     /* device-owned storages alive            */
    uint64_t cached_bytes;      /* part of active_bytes idle in pool caches */
    uint64_t cached_storages;
    uint64_t deferred_release_bytes; /* allocated bytes of freed device-
                                   owned storages whose memory waits for
                                   the residency commit that removes them
                                   (not in active_bytes)                  */
    uint64_t memory_limit;      /* an allocation that would take
                                   active_bytes + deferred_release_bytes
                                   above this fails                       */
    uint64_t current_allocated_size; /* what the backend reports it holds
                                   for this device: Metal's
                                   currentAllocatedSize (every resource,
                                   made by mlxbuf or not); host: its own
                                   allocations and wraps, in pages        */
    uint64_t alloc_count;       /* backend allocations made               */
    uint64_t free_count;        /* backend frees made                     */
    uint64_t submitted;         /* command buffers submitted              */
    uint64_t completed;         /* command buffers completed              */
} cm_device_stats_t;

/* What an allocation returns: the storage (one reference, owned by the
 * caller), its CPU-visible base address and its length in bytes. */
typedef struct cm_alloc_result {
    cm_storage_t *storage;
    uint8_t *contents;
    uint64_t byte_len;
} cm_alloc_result_t;

typedef struct cm_storage_info {
    uint8_t *contents;          /* CPU address of byte 0                  */
    uint64_t byte_len;          /* bytes addressable from contents        */
    uint64_t requested_len;     /* bytes asked for (pool: before rounding) */
    uint64_t allocated_size;    /* bytes the backend allocated for it:
                                   whole pages (external storages: the
                                   pages wrapped; an adopted native
                                   buffer: its allocatedSize)             */
    int kind;                   /* CM_STORAGE_*                           */
    int resident;               /* registered in the device's residency   */
    int shard;                  /* residency shard index, -1 if none      */
    int writable;
    uint64_t native_handle;     /* MTLBuffer pointer on Metal, else 0     */
    uint64_t native_offset;     /* byte 0's offset inside the native buffer */
    uint64_t refcount;          /* C references (Python's, holds, ...)    */
    uint64_t inflight_writers;  /* submitted command buffers writing it   */
} cm_storage_info_t;

/* Membership is per native allocation: an MTLBuffer (however many
 * storages share it), or the MTLHeap a buffer was cut from (a buffer of a
 * heap makes the whole heap resident). allocation_count counts those, and
 * allocated_size their allocated bytes (a heap: all of it). */
typedef struct cm_residency_info {
    int enabled;
    uint64_t allocation_count;            /* staged view                  */
    uint64_t committed_allocation_count;  /* as of the last commit        */
    uint64_t allocated_size;              /* bytes, staged view           */
    int pending;                          /* staged since last commit     */
    uint64_t commit_count;                /* native commits issued        */
    uint64_t staged_adds;                 /* adds staged, ever            */
    uint64_t staged_removes;              /* removes staged, ever         */
    uint64_t shard_count;
    uint64_t shard_cap_bytes;             /* a shard's soft size cap      */
    uint64_t keepalive_requests;          /* requestResidency calls made  */
    double keepalive_seconds;             /* 0 = keep-alive off           */
    double keepalive_interval;
    uint64_t pending_release_count;       /* freed storages whose removal
                                             awaits its commit            */
    uint64_t pending_release_bytes;       /* their allocations' bytes     */
    uint64_t release_threshold_bytes;     /* pending above this: commit   */
    double release_idle_seconds;          /* oldest pending this old:
                                             commit; 0 = no idle commit   */
} cm_residency_info_t;

typedef struct cm_residency_shard_info {
    uint64_t allocation_count;
    uint64_t committed_allocation_count;
    uint64_t allocated_size;
    int pending;
    uint64_t commit_count;
} cm_residency_shard_info_t;

/* Class bytes are what a size class promises (a storage's byte_len);
 * allocated bytes what its storages occupy (whole pages). */
typedef struct cm_pool_stats {
    uint64_t free_count;        /* storages idle in the cache             */
    uint64_t free_bytes;        /* their class bytes                      */
    uint64_t free_allocated_bytes; /* their allocated bytes               */
    uint64_t in_use_count;      /* pooled storages alive outside the cache */
    uint64_t in_use_bytes;      /* their class bytes                      */
    uint64_t in_use_allocated_bytes; /* their allocated bytes             */
    uint64_t requested_bytes;   /* bytes asked for by the in-use storages */
    uint64_t cache_limit;       /* free_allocated_bytes never exceeds this */
    uint64_t hits;              /* allocations served from the cache      */
    uint64_t misses;            /* allocations that went to the device    */
    uint64_t evictions;         /* cached storages freed by the limit     */
} cm_pool_stats_t;

typedef struct cm_kernel_info {
    char name[CM_NAME_MAX];
    uint64_t max_total_threads_per_threadgroup;
    uint64_t thread_execution_width;
    /* The offset alignment the kernel's buffer argument i needs (its
     * element's alignment, from the compiler's reflection); 0 where the
     * backend could not tell. A dispatch requires at least 4 in any case. */
    uint32_t buffer_alignment[CM_MAX_KERNEL_ARGS];
} cm_kernel_info_t;

/* ------------------------------------------------------------------ */
/* Errors and library facts                                            */
/* ------------------------------------------------------------------ */

/* The message of the last failure on the calling thread ("" if none).
 * The pointer stays valid until this thread's next failing call. */
const char *cm_last_error(void);

/* The status code of the last failure on the calling thread. */
int cm_last_status(void);

/* "major.minor.patch" of the C core. */
const char *cm_version(void);

/* 1 if the backend can open a device in this process, else 0. */
int cm_backend_available(int backend);

/* Size class of a pool request of n bytes for the given page size: the
 * byte_len a pooled storage gets. 0 (and CM_ERR_INVALID_ARGUMENT) when n is
 * 0 or rounding would overflow. Pure function; see pool.c for the classes. */
int cm_size_class(uint64_t n, uint64_t page_size, uint64_t *out);

/* ------------------------------------------------------------------ */
/* Device                                                              */
/* ------------------------------------------------------------------ */

/* Open a new device of the given backend with its own queue, residency
 * shards and counters. The caller owns one reference. */
int cm_device_open(int backend, int flags, cm_device_t **out);

/* Drop the caller's reference. Storages, pools and command buffers keep
 * their own references, so the device lives until the last of them. */
void cm_device_release(cm_device_t *dev);

int cm_device_info(cm_device_t *dev, cm_device_info_t *out);
int cm_device_stats(cm_device_t *dev, cm_device_stats_t *out);
void cm_device_reset_peak(cm_device_t *dev);

/* Allocations that would take active_bytes + deferred_release_bytes (in
 * allocated bytes) above limit fail, after the device's pools have given
 * back their caches and the removals holding freed memory were committed.
 * Writes the old limit. */
int cm_device_set_memory_limit(cm_device_t *dev, uint64_t limit, uint64_t *old);

/* Block until every command buffer submitted so far has completed and
 * released its holds. */
int cm_device_synchronize(cm_device_t *dev);

/* Test-only fault injection. The allocation that is the fail_nth-th from
 * now (1 = the next one) fails, and with min_bytes > 0 every allocation of
 * at least min_bytes fails. fail_nth = 0 and min_bytes = 0 switch it off.
 * Applies to every backend allocation: device, pool, external wrap and
 * file mapping. */
int cm_device_debug_fail_alloc(cm_device_t *dev, uint64_t fail_nth, uint64_t min_bytes);

/* ------------------------------------------------------------------ */
/* Storage                                                             */
/* ------------------------------------------------------------------ */

/* Allocate byte_len (> 0, <= max_buffer_length) zero-filled, page-aligned
 * bytes and stage their residency add. out->storage carries one reference
 * owned by the caller. 0 bytes: CM_ERR_INVALID_ARGUMENT; more than
 * max_buffer_length: CM_ERR_OUT_OF_MEMORY, like any request the device
 * cannot satisfy. */
int cm_storage_alloc(cm_device_t *dev, uint64_t byte_len, cm_alloc_result_t *out);

void cm_storage_retain(cm_storage_t *s);

/* Drop one reference. The last one frees the storage: a pooled storage goes
 * back to its pool's cache, any other stages its residency removal and
 * returns its memory. Safe on any thread, including after the Python
 * interpreter has shut down. */
void cm_storage_release(cm_storage_t *s);

int cm_storage_info(cm_storage_t *s, cm_storage_info_t *out);

/* The device that owns the storage (borrowed: no reference is taken). */
cm_device_t *cm_storage_device(cm_storage_t *s);

/* Block until no submitted command buffer writes the storage. */
int cm_storage_wait_idle(cm_storage_t *s);

/* Wrap caller-owned memory as a storage without copying. release(ctx) runs
 * once, on any thread, once nothing may touch the memory any more: after
 * the storage is freed, every command buffer that used it completed, its
 * residency removal (if it was registered) was committed and the backend
 * let go of its native buffer (Metal: from the MTLBuffer's deallocator);
 * release may be NULL. Host: any address.
 * Metal: ptr must be page-aligned (CM_ERR_UNSUPPORTED otherwise, so the
 * caller can copy). Not registered in the residency set; not counted in
 * active_bytes. On failure release is NOT called. */
int cm_storage_wrap_external(cm_device_t *dev, void *ptr, uint64_t byte_len,
                             int writable, void (*release)(void *ctx), void *ctx,
                             cm_alloc_result_t *out);

/* Wrap a native buffer object (Metal: an id<MTLBuffer> with Shared
 * storage, retained by the storage). The host backend has no native
 * buffers: CM_ERR_UNSUPPORTED. Not registered in the residency set. */
int cm_storage_wrap_native(cm_device_t *dev, uint64_t native_handle,
                           cm_alloc_result_t *out);

/* Map length bytes of an open file from offset (any offset: the mapping
 * is rounded to pages internally) without copying. length 0 = to the end
 * of the file. The mapping is independent of fd once this returns and is
 * unmapped when the storage is freed. Writable mappings are shared with
 * the file. Mapped storages join the residency set and count in
 * active_bytes. */
int cm_storage_map_file(cm_device_t *dev, int fd, uint64_t offset, uint64_t length,
                        int writable, cm_alloc_result_t *out);

/* ------------------------------------------------------------------ */
/* Residency (per device; bookkept identically on every backend)       */
/* ------------------------------------------------------------------ */

int cm_residency_info(cm_device_t *dev, cm_residency_info_t *out);
int cm_residency_shard_info(cm_device_t *dev, uint64_t index,
                            cm_residency_shard_info_t *out);

/* Residency-set failures: a failing call returns CM_ERR_RESIDENCY. A
 * failure no call can report (a removal staged when a storage's last
 * reference died, a commit made by the release threshold or the idle
 * timer, a keep-alive request) is recorded on the device, and the work is
 * retried at the next commit; the next cm_residency_commit,
 * cm_residency_flush or cm_cmdbuf_commit does that work and then returns
 * the recorded failure (cm_cmdbuf_commit submits nothing then: commit it
 * again). */

/* Commit every shard now, pending or not. */
int cm_residency_commit(cm_device_t *dev);

/* Commit the shards with staged changes; *committed = native commits made
 * (0 when nothing was pending). */
int cm_residency_flush(cm_device_t *dev, uint64_t *committed);

/* *out = 1 if the storage's native allocation is in the set (staged
 * view), whether this storage registered it or another storage over the
 * same MTLBuffer (or heap) did. */
int cm_residency_contains(cm_device_t *dev, cm_storage_t *s, int *out);

/* Stage an add for a storage that is not registered (external or wrapped
 * storages); idempotent. CM_ERR_INVALID_ARGUMENT for another device's
 * storage, CM_ERR_RESIDENCY when residency is off. */
int cm_residency_register(cm_device_t *dev, cm_storage_t *s);

/* Soft byte cap of one shard: a new storage goes to the first shard with
 * room, a new shard opens when none has room (at most
 * CM_MAX_RESIDENCY_SHARDS; then the least-filled shard takes it).
 * Storages already placed stay. Writes the old cap. */
int cm_residency_set_shard_cap(cm_device_t *dev, uint64_t cap_bytes, uint64_t *old);

/* Keep-alive: for `seconds` after each submission, re-request residency of
 * every shard every `interval` seconds from a background thread that sleeps
 * while there is nothing to keep alive. seconds = 0 switches it off. */
int cm_residency_set_keepalive(cm_device_t *dev, double seconds, double interval);

/* Deferred release. A residency set holds its members until a removal is
 * committed, so a freed storage's native buffer and memory wait for the
 * commit that removes it, and are released right after it (never while a
 * command buffer holds the storage). That commit comes no later than the
 * first of: the next submission (cm_cmdbuf_commit), the moment the bytes
 * waiting pass threshold_bytes (0: every removal commits at once;
 * UINT64_MAX: never for size), and idle_seconds after the oldest waiting
 * removal was staged (0: never for time; else 1e-3 to 1e9 s), from a
 * background thread that sleeps while nothing waits. Defaults: 64 MiB and
 * 1 s. Writes the old values (either pointer may be NULL).
 * CM_ERR_RESIDENCY when residency is off (nothing is deferred then). */
int cm_residency_set_release_policy(cm_device_t *dev, uint64_t threshold_bytes,
                                    double idle_seconds, uint64_t *old_threshold,
                                    double *old_idle);

/* ------------------------------------------------------------------ */
/* Pool                                                                */
/* ------------------------------------------------------------------ */

/* A cache of storages by size class. cache_limit < 0 picks the default
 * (cm_pool_stats_t.cache_limit tells it). The caller owns one reference;
 * storages the pool handed out keep the pool alive. */
int cm_pool_create(cm_device_t *dev, int64_t cache_limit, cm_pool_t **out);

/* Drop the caller's reference: the cache is freed now, storages still in
 * use are freed (not cached) when their last reference dies. */
void cm_pool_release(cm_pool_t *pool);

/* A storage of byte_len's size class: a cached one when there is one
 * (not re-zeroed unless zero != 0), else a fresh zero-filled one. */
int cm_pool_alloc(cm_pool_t *pool, uint64_t byte_len, int zero, cm_alloc_result_t *out);

/* n allocations, all or nothing: on failure nothing stays allocated. */
int cm_pool_alloc_batch(cm_pool_t *pool, const uint64_t *byte_lens, size_t n,
                        int zero, cm_alloc_result_t *out);

/* Free every cached storage (and stage its residency removal). */
int cm_pool_clear(cm_pool_t *pool);

int cm_pool_stats(cm_pool_t *pool, cm_pool_stats_t *out);

/* Evicts oldest-first until the cache fits. Writes the old limit. */
int cm_pool_set_cache_limit(cm_pool_t *pool, uint64_t limit, uint64_t *old);

/* The size class this pool gives a request of n bytes. */
int cm_pool_size_class(cm_pool_t *pool, uint64_t n, uint64_t *out);

/* ------------------------------------------------------------------ */
/* Command buffers                                                     */
/* ------------------------------------------------------------------ */

/* A new, empty command buffer. The caller owns one reference; a submitted
 * command buffer keeps itself alive until it completes. */
int cm_cmdbuf_create(cm_device_t *dev, cm_cmdbuf_t **out);

/* Drop the caller's reference. A command buffer never committed is
 * discarded: its holds are released and nothing runs. */
void cm_cmdbuf_release(cm_cmdbuf_t *cb);

/* Encode a copy of nbytes from src+src_offset to dst+dst_offset (offsets
 * from byte 0 of each storage). Holds both storages until completion. */
int cm_cmdbuf_copy(cm_cmdbuf_t *cb, cm_storage_t *src, uint64_t src_offset,
                   cm_storage_t *dst, uint64_t dst_offset, uint64_t nbytes);

/* Encode setting nbytes from offset to value (0..255). */
int cm_cmdbuf_fill(cm_cmdbuf_t *cb, cm_storage_t *s, uint64_t offset,
                   uint64_t nbytes, int value);

/* Encode a compute dispatch of grid threads in threadgroups of tg threads.
 * Buffers bind at indices 0..nbufs-1 at their offsets (NULL: all at 0),
 * each a multiple of the kernel's buffer_alignment for it (at least 4);
 * writes[i] != 0 says the kernel writes buffer i (NULL: it writes them
 * all). Only written storages count as in-flight writers, and a read-only
 * storage may not be one. Constant blobs (concatenated in `constants`,
 * sizes in const_sizes) bind after the buffers. */
int cm_cmdbuf_dispatch(cm_cmdbuf_t *cb, cm_kernel_t *kernel,
                       const uint64_t *grid, const uint64_t *threadgroup,
                       cm_storage_t *const *bufs, const uint64_t *offsets,
                       const uint8_t *writes, size_t nbufs,
                       const uint8_t *constants, const uint64_t *const_sizes,
                       size_t nconsts);

/* Flush pending residency (at most one native commit per dirty shard),
 * then submit. Returns without waiting. */
int cm_cmdbuf_commit(cm_cmdbuf_t *cb);

/* Block until the command buffer completed and released its holds.
 * CM_ERR_COMMAND_BUFFER if it failed (message from the backend) or was
 * never committed. */
int cm_cmdbuf_wait(cm_cmdbuf_t *cb);

/* Release the holds of a command buffer never committed; nothing runs. */
int cm_cmdbuf_discard(cm_cmdbuf_t *cb);

int cm_cmdbuf_status(cm_cmdbuf_t *cb);           /* CM_CB_*                */
uint64_t cm_cmdbuf_op_count(cm_cmdbuf_t *cb);
uint64_t cm_cmdbuf_hold_count(cm_cmdbuf_t *cb);  /* storages held now      */

/* ------------------------------------------------------------------ */
/* Compute                                                             */
/* ------------------------------------------------------------------ */

/* Compile shader source (Metal Shading Language). flags: 0, or
 * CM_COMPILE_FAST_MATH to let the compiler trade IEEE semantics for speed
 * (no NaN or infinity, reassociation); without it floating point follows
 * IEEE 754. The compiler's message is in cm_last_error() on
 * CM_ERR_SHADER_COMPILATION. Host backend: CM_ERR_UNSUPPORTED. */
int cm_library_compile(cm_device_t *dev, const char *source, uint32_t flags,
                       cm_library_t **out);
void cm_library_release(cm_library_t *lib);

/* The compute pipeline for a function; cached per (library, name), so a
 * second call returns the same kernel with a new reference. */
int cm_library_kernel(cm_library_t *lib, const char *name, cm_kernel_t **out);
void cm_kernel_release(cm_kernel_t *k);
int cm_kernel_info(cm_kernel_t *k, cm_kernel_info_t *out);

#ifdef __cplusplus
}
#endif

#endif /* CMETAL_H */
