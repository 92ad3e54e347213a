/*
 * metalsim.h -- the control API of the simulated Metal (metalsim/): the
 * knobs, faults, kernel registry, statistics and validation log that tests
 * (and mlxbuf.metalsim in a simulator build) use. Plain C that cffi's cdef
 * can parse: no macros in declarations, no inline functions.
 *
 * The simulator implements the Metal and Foundation API of
 * cmetal/stubs/sdk on Linux (ObjFW runtime), so cmetal/metal.m runs
 * unchanged against it; this header is everything it adds.
 *
 * Threads: every function may be called from any thread.
 */
#ifndef METALSIM_H
#define METALSIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What msim_fail_next() makes fail. */
#define MSIM_FAULT_NEW_BUFFER 1      /* newBuffer... returns nil            */
#define MSIM_FAULT_COMMAND_BUFFER 2  /* completes with status Error         */
#define MSIM_FAULT_RESIDENCY_SET 3   /* set creation fails with an NSError  */
#define MSIM_FAULT_LIBRARY 4         /* library compilation fails           */

/* The simulated page (Apple Silicon's): allocatedSize granularity. */
#define MSIM_PAGE_SIZE 16384
/* The watchdog: a wait this long becomes a validation error. */
#define MSIM_WATCHDOG_SECONDS 10

/* Configuration of devices opened afterwards (MTLCreateSystemDefaultDevice
 * returns a new device once it changed). macos_major is also what
 * NSProcessInfo reports from now on: below 15 the residency-set API
 * behaves as absent. 0 for max_buffer_length or recommended_working_set
 * picks the default (half and three quarters of physical memory).
 * Returns 0, or -1 for a value out of range (macos_major 11..99,
 * latency_us at most 10 s, max_buffer_length at least one page). */
int msim_configure(int macos_major, uint64_t latency_us, uint64_t max_buffer_length,
                   uint64_t recommended_working_set);

/* Fail the next `count` operations of one kind (MSIM_FAULT_*); count 0
 * disarms. Returns 0, or -1 for an unknown kind. */
int msim_fail_next(int what, uint64_t count);

/* The next `count` calls of the simulated Metal method whose selector is
 * `selector` (e.g. "commit", "addAllocation:") raise an NSException
 * (name "MTLSimulatedFault") before doing anything. count 0 disarms; at
 * most 8 selectors are armed at once. Returns 0 or -1. */
int msim_raise_next(const char *selector, uint64_t count);

/* The next `count` calls of the simulated Metal method `selector` that
 * Apple declares nullable (newCommandQueue, commandBuffer,
 * blitCommandEncoder, computeCommandEncoder, newBufferWithLength:options:,
 * newFunctionWithName:, newComputePipelineStateWithFunction:error:,
 * newComputePipelineStateWithFunction:options:reflection:error:,
 * newHeapWithDescriptor:, newFence, newEvent, newSharedEvent) return nil.
 * Shares the 8 slots of msim_raise_next. Returns 0 or -1. */
int msim_nil_next(const char *selector, uint64_t count);

/* The next `count` newBufferWithLength:options: calls return contents that
 * are not page-aligned (256 bytes past a page boundary, as a Metal that
 * sub-allocates small buffers could: Apple promises no alignment there),
 * so the backend's fallback for that case runs. count 0 disarms. */
void msim_misalign_next(uint64_t count);

/* 1: MTLCreateSystemDefaultDevice() returns nil (MTLCopyAllDevices() still
 * lists the device), as in a command-line process without CoreGraphics. */
void msim_set_default_device_nil(int on);

/* Disarm every fault, raise, misalign and nil-device knob. */
void msim_reset_faults(void);

/* A compute kernel implementation, called on the simulated GPU thread in
 * queue order. buffers[i] points at the byte a setBuffer binding's offset
 * names and spans lengths[i] bytes (to the end of the MTLBuffer); bindings
 * come sorted by argument index. writable[i] is 0 for read-only memory
 * (a read-only file mapping). constants are the setBytes blobs, sorted by
 * index and concatenated. Every pointer is valid during the call only. A
 * kernel returns 0, or non-zero after writing a message into error: the
 * command buffer then completes with status Error. */
typedef struct msim_kernel_args {
    const char *name;
    uint64_t grid[3];
    uint64_t threadgroup[3];
    size_t nbuffers;
    uint8_t *const *buffers;
    const uint64_t *lengths;
    const int *writable;
    const uint64_t *indices;
    const uint8_t *constants;
    uint64_t constants_len;
    char *error;
    size_t error_cap;
} msim_kernel_args_t;

typedef int (*msim_kernel_fn)(void *ctx, const msim_kernel_args_t *args);

/* Register (or, with fn NULL, remove) the implementation of the kernel
 * function `name`. The backend's own helper kernels (mlxbuf_copy_bytes,
 * mlxbuf_fill_bytes) have built-in implementations. Returns 0, or -1 for
 * an empty or over-long name (127 characters at most). */
int msim_register_kernel(const char *name, msim_kernel_fn fn, void *ctx);

/* Remove every implementation registered with this ctx (the built-ins
 * stay). */
void msim_unregister_kernels_with_ctx(void *ctx);

/* Metal objects made outside mlxbuf, as integer handles that own one
 * reference (give it back with msim_release): for tests that hand Metal
 * objects to mlxbuf (Buffer.from_raw). msim_new_buffer makes an MTLBuffer
 * on the current default device (options are MTLResourceOptions;
 * heap_size > 0 sub-allocates it from a new heap of that size);
 * msim_new_fence makes a Metal object that is not a buffer. 0 when Metal
 * returned nil. */
uint64_t msim_new_buffer(uint64_t length, uint64_t options, uint64_t heap_size);
uint64_t msim_new_fence(void);
void msim_release(uint64_t handle);

/* Counters since the process started (bytes are allocatedSize, 16 KiB
 * pages). */
typedef struct msim_stats {
    uint64_t live_buffers;              /* MTLBuffer objects alive          */
    uint64_t live_bytes;                /* their bytes (heap buffers: 0)    */
    uint64_t live_heaps;
    uint64_t live_heap_bytes;
    uint64_t live_objects;              /* every simulated object alive     */
    uint64_t buffers_created;
    uint64_t deallocators_run;          /* newBufferWithBytesNoCopy blocks  */
    uint64_t nocopy_unmapped_before_release; /* nil-deallocator no-copy
                                           buffers whose memory was gone
                                           when their last reference went */
    uint64_t residency_sets_live;
    uint64_t residency_commits;         /* native commit calls on sets      */
    uint64_t residency_adds;            /* addAllocation: calls             */
    uint64_t residency_removes;         /* removeAllocation: calls          */
    uint64_t residency_requests;        /* requestResidency calls           */
    uint64_t residency_members;         /* committed members, all sets      */
    uint64_t residency_held_bytes;      /* buffers only residency sets hold */
    uint64_t command_buffers_created;
    uint64_t command_buffers_committed;
    uint64_t command_buffers_completed; /* status Completed or Error        */
    uint64_t command_buffers_failed;    /* status Error                     */
    uint64_t command_buffers_blocked;   /* commandBuffer calls that waited  */
    uint64_t encoders_created;
    uint64_t fences_created;            /* newFence                         */
    uint64_t event_commands;            /* encodeSignalEvent/WaitForEvent   */
    uint64_t blits;
    uint64_t dispatches;
    uint64_t libraries_compiled;
    uint64_t libraries_fast_math;       /* compiled with fast math on       */
    uint64_t exceptions_raised;         /* by msim_raise_next               */
    uint64_t validation_errors;
} msim_stats_t;

void msim_get_stats(msim_stats_t *out);

/* The validation log: every broken rule, in order. The first
 * msim_validation_count() messages were recorded; the newest 4096 are
 * kept. msim_validation_message copies message `index` (0-based) into buf
 * and returns its length, or 0 when it is no longer kept. */
uint64_t msim_validation_count(void);
size_t msim_validation_message(uint64_t index, char *buf, size_t cap);

/* Block until every committed command buffer has completed and its
 * completion handlers have run. */
void msim_drain(void);

#ifdef __cplusplus
}
#endif

#endif /* METALSIM_H */
