/*
 * metal.m -- the Metal backend: the primitives of cm_backend_t over Metal,
 * in Objective-C with ARC. Built on macOS (CM_HAVE_METAL); on Linux it is
 * type-checked against cmetal/stubs by cmetal/check_objc.sh, and a
 * simulator build (MLXBUF_METAL_SIM=1) runs this same file against the
 * simulated Metal in metalsim/.
 *
 * The core (the C files beside this one) owns every policy: refcounts,
 * residency staging and sharding, pools, in-flight holds, locking. This
 * file only translates primitive requests into Metal calls, so it keeps no
 * bookkeeping of its own beyond the device, its queue, two lazily built
 * helper pipelines and the event that orders work on untracked buffers
 * (see "Untracked buffers").
 *
 * It is longer than the core's files because it is one concept, the
 * backend table over Metal, whose entries share private state (the device
 * record, the helper pipelines, the ordering event) and helpers that would
 * have to be exported to split it; its sections follow the table's order.
 *
 * Rules every entry point follows:
 * - It runs inside @autoreleasepool: Python's threads have no pool, and
 *   commandBuffer, the encoders, NSError out-parameters and NSString
 *   conversions all hand back autoreleased objects.
 * - No Objective-C exception and no nil result escapes: Metal calls that can
 *   raise sit in @try, and failures come back as a status code with a
 *   message from cm__fail() quoting Metal's own text. Metal reports API
 *   misuse with assertions rather than exceptions, so arguments are checked
 *   before they reach Metal.
 * - Every Metal object the C side keeps is a +1 reference made with
 *   __bridge_retained and dropped with __bridge_transfer (release_bridged).
 *   Borrowed uses are plain __bridge casts.
 * - Nothing here blocks on the GPU: the core waits on the signal that
 *   cm__cmdbuf_complete() raises, because waitUntilCompleted can return
 *   before completion handlers have run.
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

/* Residency sets exist from the macOS 15 / iOS 18 SDK on. Defining
 * CM_METAL_NO_RESIDENCY_SDK simulates an older SDK (check_objc.sh does, so
 * both branches are type-checked). */
#if !defined(CM_METAL_NO_RESIDENCY_SDK) && __has_include(<Metal/MTLResidencySet.h>)
#define CM_METAL_RESIDENCY 1
#else
#define CM_METAL_RESIDENCY 0
#endif

#define CM_AVAILABLE_RESIDENCY                             \
    __attribute__((availability(macos, introduced = 15.0), \
                   availability(ios, introduced = 18.0)))

/* Is the macOS 15 / iOS 18 API there at run time? On Apple targets this is
 * @available, which also keeps clang's compile-time availability check
 * (-Wunguarded-availability) honest. Elsewhere clang compiles @available
 * to constant true, so a non-Apple build (the simulated Metal on Linux)
 * asks NSProcessInfo for the running OS version instead. */
#if defined(__APPLE__)
#define CM_MACOS15_AVAILABLE @available(macOS 15.0, iOS 18.0, *)
#else
#define CM_MACOS15_AVAILABLE cm_os_at_least(15)
static inline bool cm_os_at_least(NSInteger major)
{
    NSOperatingSystemVersion v = {major, 0, 0};
    return [[NSProcessInfo processInfo] isOperatingSystemAtLeastVersion:v];
}
#endif

/* Shared storage is the point of the library: CPU and GPU see the same
 * bytes with no copy. Default hazard tracking lets Metal order command
 * buffers and encoders that touch the same buffer, which the core's
 * "runs after everything submitted before it" promise relies on. */
static const MTLResourceOptions kSharedOptions =
    MTLResourceStorageModeShared | MTLResourceCPUCacheModeDefaultCache |
    MTLResourceHazardTrackingModeDefault;

/* Apple documents setBytes:length:atIndex: for data under 4 KiB; larger
 * constants must go in a buffer. */
#define CM_METAL_MAX_SET_BYTES 4096u

/* The byte-granular copy/fill pipelines (see "Byte-granular copy"). */
typedef struct cm_metal_builtins {
    void *copy_bytes;                 /* id<MTLComputePipelineState>, +1 */
    void *fill_bytes;                 /* id<MTLComputePipelineState>, +1 */
    uint64_t copy_max_threads, fill_max_threads;
} cm_metal_builtins_t;

/* Per-device state. Read-only after open except `builtins`. */
typedef struct cm_metal_state {
    void *device;                     /* id<MTLDevice>, +1                */
    void *queue;                      /* id<MTLCommandQueue>, +1          */
    uint64_t registry_id;
    uint64_t page_size;
    uint64_t max_buffer_length;
    /* Byte-granular copy/fill kernels, compiled on first need and
     * published with a compare-and-swap, so no lock is needed. */
    _Atomic(cm_metal_builtins_t *) builtins;
    /* Untracked buffers' order across command buffers (see "Untracked
     * buffers"): id<MTLSharedEvent> (+1, made on first need) and the value
     * the last committed command buffer with untracked work signals; both
     * guarded by the core's submit lock. */
    void *order_event;
    uint64_t order_value;
} cm_metal_state_t;

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

static inline id<MTLDevice> st_device(const cm_metal_state_t *st)
{
    return (__bridge id<MTLDevice>)st->device;
}

static inline id<MTLCommandQueue> st_queue(const cm_metal_state_t *st)
{
    return (__bridge id<MTLCommandQueue>)st->queue;
}

static inline id<MTLBuffer> as_buffer(cm_native_t native)
{
    return (__bridge id<MTLBuffer>)native;
}

/* Drop a +1 reference made with __bridge_retained. NULL is fine. */
static void release_bridged(void *p)
{
    if (p) {
        id obj = (__bridge_transfer id)p;
        (void)obj;
    }
}

/* UTF8String is an inner pointer: ARC keeps the string alive until the
 * enclosing @autoreleasepool drains, so callers use the result (e.g. pass
 * it to cm__fail, which copies) before their entry point returns. */
static const char *ns_text(NSString *s, const char *fallback)
{
    const char *c = s ? s.UTF8String : NULL;
    return (c && *c) ? c : fallback;
}

static const char *error_text(NSError *e)
{
    return e ? ns_text(e.localizedDescription, "Metal gave no description")
             : "Metal reported no error object";
}

static const char *exception_text(NSException *e)
{
    if (!e)
        return "unknown exception";
    const char *reason = ns_text(e.reason, NULL);
    return reason ? reason : ns_text(e.name, "unnamed exception");
}

static NSString *ns_string(const char *s)
{
    return [NSString stringWithCString:s encoding:NSUTF8StringEncoding];
}

static void copy_cstr(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

/* n rounded up to a whole number of pages, or 0 on overflow. */
static uint64_t round_to_pages(uint64_t n, uint64_t page)
{
    if (n > UINT64_MAX - (page - 1))
        return 0;
    return (n + page - 1) / page * page;
}

/* ------------------------------------------------------------------ */
/* Residency sets (macOS 15)                                           */
/* ------------------------------------------------------------------ */
/* The primitives are called with the device's lock held, which matters:
 * residency-set methods are not thread-safe. An exception from the set
 * becomes CM_ERR_RESIDENCY with Metal's reason; the core reports it to the
 * caller, or records it for the next commit when there is none. Built
 * with an SDK older than macOS 15 (no MTLResidencySet.h), the backend
 * still builds and runs with residency off. */

#if CM_METAL_RESIDENCY

CM_AVAILABLE_RESIDENCY
static id<MTLResidencySet> new_residency_set(id<MTLDevice> device, const char *label,
                                             NSError **error)
{
    MTLResidencySetDescriptor *desc = [[MTLResidencySetDescriptor alloc] init];
    desc.label = ns_string(label);
    return [device newResidencySetWithDescriptor:desc error:error];
}

/* Decide whether residency sets work here by making one: the API needs
 * macOS 15, and even there creation is reported to fail in VMs, so a nil
 * set is an expected outcome that turns residency off with its reason.
 * GPUs before Apple family 6 (Intel Macs' AMD/Intel GPUs) must not even be
 * asked: Metal's validation layer aborts with "device does not support
 * residency sets" instead of returning nil (seen in llama.cpp #11903). */
static void probe_residency(id<MTLDevice> device, cm_device_info_t *info)
{
    if (CM_MACOS15_AVAILABLE) {
        if (![device supportsFamily:MTLGPUFamilyApple6]) {
            info->residency_enabled = 0;
            copy_cstr(info->residency_disabled_reason, sizeof info->residency_disabled_reason,
                      "residency sets need an Apple GPU (MTLGPUFamilyApple6 or later)");
            return;
        }
        NSError *err = nil;
        id<MTLResidencySet> probe = new_residency_set(device, "mlxbuf probe", &err);
        if (probe) {
            info->residency_enabled = 1;
            info->residency_disabled_reason[0] = '\0';
        } else {
            info->residency_enabled = 0;
            snprintf(info->residency_disabled_reason, sizeof info->residency_disabled_reason,
                     "residency set creation failed: %s", error_text(err));
        }
        return;
    }
    info->residency_enabled = 0;
    copy_cstr(info->residency_disabled_reason, sizeof info->residency_disabled_reason,
              "MTLResidencySet needs macOS 15.0 or later");
}

static int metal_rset_create(void *state, unsigned index, void **rset)
{
    cm_metal_state_t *st = state;
    @autoreleasepool {
        if (CM_MACOS15_AVAILABLE) {
            char label[48];
            snprintf(label, sizeof label, "mlxbuf shard %u", index);
            @try {
                NSError *err = nil;
                id<MTLResidencySet> set = new_residency_set(st_device(st), label, &err);
                if (!set)
                    return cm__fail(CM_ERR_RESIDENCY, "cannot create residency set '%s': %s",
                                    label, error_text(err));
                /* A queue's sets join every command buffer it commits, so
                 * nothing per submission is needed. Metal allows 32 sets
                 * per queue (CM_MAX_RESIDENCY_SHARDS). */
                [st_queue(st) addResidencySet:set];
                *rset = (__bridge_retained void *)set;
                return CM_OK;
            } @catch (NSException *e) {
                return cm__fail(CM_ERR_RESIDENCY, "Metal raised %s creating residency set '%s'",
                                exception_text(e), label);
            }
        }
        return cm__fail(CM_ERR_RESIDENCY, "residency sets need macOS 15.0 or later");
    }
}

static void metal_rset_destroy(void *state, void *rset)
{
    cm_metal_state_t *st = state;
    if (!rset)
        return;
    @autoreleasepool {
        if (CM_MACOS15_AVAILABLE) {
            id<MTLResidencySet> set = (__bridge id<MTLResidencySet>)rset;
            @try {
                /* Detach first so no later command buffer picks it up, and
                 * keep the queue under its limit of 32 sets. */
                [st_queue(st) removeResidencySet:set];
                [set endResidency];
                [set removeAllAllocations];
            } @catch (NSException *e) {
                (void)e;
            }
        }
        release_bridged(rset);
    }
}

/* Send one staging or commit message to a set; what Metal raises becomes
 * a status. */
typedef enum { RSET_ADD, RSET_REMOVE, RSET_COMMIT, RSET_REQUEST } rset_op_t;

static int rset_send(void *rset, rset_op_t op, void *allocation)
{
    static const char *const names[] = {"addAllocation:", "removeAllocation:", "commit",
                                         "requestResidency"};
    @autoreleasepool {
        if (CM_MACOS15_AVAILABLE) {
            id<MTLResidencySet> set = (__bridge id<MTLResidencySet>)rset;
            id<MTLAllocation> a = (__bridge id<MTLAllocation>)allocation;
            @try {
                switch (op) {
                case RSET_ADD: [set addAllocation:a]; break;
                case RSET_REMOVE: [set removeAllocation:a]; break;
                case RSET_COMMIT: [set commit]; break;
                case RSET_REQUEST: [set requestResidency]; break;
                }
                return CM_OK;
            } @catch (NSException *e) {
                return cm__fail(CM_ERR_RESIDENCY, "Metal raised %s in -[MTLResidencySet %s]",
                                exception_text(e), names[op]);
            }
        }
        return cm__fail(CM_ERR_RESIDENCY, "-[MTLResidencySet %s] needs macOS 15.0 or later",
                        names[op]);
    }
}

static int metal_rset_add(void *rset, void *allocation)
{
    return rset_send(rset, RSET_ADD, allocation);
}

static int metal_rset_remove(void *rset, void *allocation)
{
    return rset_send(rset, RSET_REMOVE, allocation);
}

static int metal_rset_commit(void *rset)
{
    return rset_send(rset, RSET_COMMIT, NULL);
}

static int metal_rset_request(void *rset)
{
    return rset_send(rset, RSET_REQUEST, NULL);
}

#else /* !CM_METAL_RESIDENCY */

#define CM_NO_RESIDENCY_SDK "mlxbuf was built with a macOS SDK older than 15.0 (no MTLResidencySet)"

static void probe_residency(id<MTLDevice> device, cm_device_info_t *info)
{
    (void)device;
    info->residency_enabled = 0;
    copy_cstr(info->residency_disabled_reason, sizeof info->residency_disabled_reason,
              CM_NO_RESIDENCY_SDK);
}

static int metal_rset_create(void *state, unsigned index, void **rset)
{
    (void)state;
    (void)index;
    (void)rset;
    return cm__fail(CM_ERR_RESIDENCY, "%s", CM_NO_RESIDENCY_SDK);
}

static void metal_rset_destroy(void *state, void *rset)
{
    (void)state;
    (void)rset;
}

static int metal_rset_add(void *rset, void *allocation)
{
    (void)rset;
    (void)allocation;
    return cm__fail(CM_ERR_RESIDENCY, "%s", CM_NO_RESIDENCY_SDK);
}

static int metal_rset_remove(void *rset, void *allocation)
{
    (void)rset;
    (void)allocation;
    return cm__fail(CM_ERR_RESIDENCY, "%s", CM_NO_RESIDENCY_SDK);
}

static int metal_rset_commit(void *rset)
{
    (void)rset;
    return cm__fail(CM_ERR_RESIDENCY, "%s", CM_NO_RESIDENCY_SDK);
}

static int metal_rset_request(void *rset)
{
    (void)rset;
    return cm__fail(CM_ERR_RESIDENCY, "%s", CM_NO_RESIDENCY_SDK);
}

#endif /* CM_METAL_RESIDENCY */

/* ------------------------------------------------------------------ */
/* Device                                                              */
/* ------------------------------------------------------------------ */

/* The GPU to open. MTLCreateSystemDefaultDevice() can return nil in a
 * command-line process that has not loaded CoreGraphics (the build links
 * it, but a host process may load mlxbuf in a way that keeps it out), while
 * MTLCopyAllDevices() still lists the GPUs: then the first with unified
 * memory (an Apple silicon GPU, whose Shared buffers the CPU sees without
 * a copy) is taken. */
static id<MTLDevice> system_device(void)
{
    id<MTLDevice> device = MTLCreateSystemDefaultDevice();
    if (device)
        return device;
    NSArray<id<MTLDevice>> *all = MTLCopyAllDevices();
    for (NSUInteger i = 0; i < all.count; i++) {
        id<MTLDevice> candidate = [all objectAtIndex:i];
        if (candidate.hasUnifiedMemory)
            return candidate;
    }
    return nil;
}

static int metal_available(void)
{
    @autoreleasepool {
        @try {
            id<MTLDevice> device = system_device();
            return device != nil;
        } @catch (NSException *e) {
            (void)e;
            return 0;
        }
    }
}

static int metal_open(cm_device_t *dev, void **state, cm_device_info_t *info)
{
    (void)dev;
    @autoreleasepool {
        @try {
            id<MTLDevice> device = system_device();
            if (!device)
                return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                                "no Metal device: MTLCreateSystemDefaultDevice() returned nil "
                                "and MTLCopyAllDevices() lists no GPU with unified memory");
            const char *name = ns_text(device.name, "unnamed Metal device");
            /* One queue per device: command buffers of one queue run and
             * complete in commit order, which the core's ordering relies on. */
            id<MTLCommandQueue> queue = [device newCommandQueue];
            if (!queue)
                return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                                "Metal device %s: newCommandQueue returned nil", name);
            long page = sysconf(_SC_PAGESIZE);
            if (page <= 0)
                return cm__fail(CM_ERR_INTERNAL, "sysconf(_SC_PAGESIZE) returned %ld", page);

            info->backend = CM_BACKEND_METAL;
            copy_cstr(info->name, sizeof info->name, name);
            info->has_unified_memory = device.hasUnifiedMemory ? 1 : 0;
            info->max_buffer_length = (uint64_t)device.maxBufferLength;
            info->recommended_max_working_set_size = device.recommendedMaxWorkingSetSize;
            info->page_size = (uint64_t)page;
            info->registry_id = device.registryID;
            probe_residency(device, info);

            /* Allocate last, so no Metal call can raise after it. */
            cm_metal_state_t *st = calloc(1, sizeof *st);
            if (!st)
                return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate the Metal device state");
            st->registry_id = info->registry_id;
            st->page_size = info->page_size;
            st->max_buffer_length = info->max_buffer_length;
            atomic_init(&st->builtins, NULL);
            st->device = (__bridge_retained void *)device;
            st->queue = (__bridge_retained void *)queue;
            *state = st;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_DEVICE_NOT_FOUND, "Metal raised %s while opening the device",
                            exception_text(e));
        }
    }
}

static void free_builtins(cm_metal_builtins_t *b)
{
    if (!b)
        return;
    release_bridged(b->copy_bytes);
    release_bridged(b->fill_bytes);
    free(b);
}

/* May run on a Metal completion thread (a completion dropped the device's
 * last reference). Releasing is all it does, and nothing here waits for
 * the queue, so it cannot wait on itself. */
static void metal_close(void *state)
{
    cm_metal_state_t *st = state;
    if (!st)
        return;
    @autoreleasepool {
        free_builtins(atomic_load(&st->builtins));
        release_bridged(st->order_event);
        release_bridged(st->queue);
        release_bridged(st->device);
    }
    free(st);
}

static uint64_t metal_current_allocated_size(void *state)
{
    cm_metal_state_t *st = state;
    if (!st)
        return 0;
    @autoreleasepool {
        @try {
            return (uint64_t)st_device(st).currentAllocatedSize;
        } @catch (NSException *e) {
            (void)e;
            return 0;
        }
    }
}

/* ------------------------------------------------------------------ */
/* Buffers                                                             */
/* ------------------------------------------------------------------ */

/* What a buffer occupies: allocatedSize (whole pages of Metal's own
 * granule, 16 KiB on Apple Silicon), or the bytes asked for if Metal
 * raises reading it. */
static uint64_t allocated_size(id<MTLBuffer> buf, uint64_t asked)
{
    @try {
        uint64_t n = (uint64_t)buf.allocatedSize;
        return n != 0 ? n : asked;
    } @catch (NSException *e) {
        (void)e;
        return asked;
    }
}

/* The fallback when Metal hands back memory that is not page-aligned
 * (the core promises page alignment and newBufferWithLength: does not):
 * anonymous mmap memory is page-aligned and zero-filled by the kernel, and
 * the buffer's deallocator unmaps it once Metal drops its last reference,
 * which can be after buffer_free if a command buffer still holds it. */
static int alloc_mapped(cm_metal_state_t *st, uint64_t len, cm_native_t *native,
                        uint8_t **contents, uint64_t *allocated)
{
    char a[64], b[64];
    uint64_t span = round_to_pages(len, st->page_size);
    if (span == 0 || span > st->max_buffer_length)
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot allocate %s page-aligned: device maximum buffer length is %s",
                        cm__fmt_bytes(len, a, sizeof a), cm__fmt_bytes(st->max_buffer_length, b, sizeof b));
    void *p = mmap(NULL, (size_t)span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANON, -1, 0);
    if (p == MAP_FAILED)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate %s: mmap failed",
                        cm__fmt_bytes(span, a, sizeof a));
    id<MTLBuffer> buf = nil;
    @try {
        buf = [st_device(st) newBufferWithBytesNoCopy:p
                                               length:(NSUInteger)span
                                              options:kSharedOptions
                                          deallocator:^(void *ptr, NSUInteger n) {
                                              munmap(ptr, (size_t)n);
                                          }];
    } @catch (NSException *e) {
        munmap(p, (size_t)span);
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate %s: Metal raised %s",
                        cm__fmt_bytes(span, a, sizeof a), exception_text(e));
    }
    if (!buf) {
        munmap(p, (size_t)span);
        return cm__fail(CM_ERR_OUT_OF_MEMORY,
                        "cannot allocate %s: newBufferWithBytesNoCopy returned nil",
                        cm__fmt_bytes(span, a, sizeof a));
    }
    *allocated = allocated_size(buf, span);
    *native = (__bridge_retained void *)buf;
    *contents = p;
    return CM_OK;
}

static int metal_buffer_alloc(void *state, uint64_t len, cm_native_t *native,
                              uint8_t **contents, uint64_t *allocated)
{
    cm_metal_state_t *st = state;
    char a[64], b[64], c[64];
    @autoreleasepool {
        /* Whole pages, so Metal has no reason to sub-allocate and the
         * contents land on a page boundary; the core still sees len. */
        uint64_t want = round_to_pages(len, st->page_size);
        if (want == 0 || want > st->max_buffer_length)
            want = len;
        @try {
            id<MTLBuffer> buf = [st_device(st) newBufferWithLength:(NSUInteger)want
                                                           options:kSharedOptions];
            if (!buf)
                return cm__fail(CM_ERR_OUT_OF_MEMORY,
                                "cannot allocate %s: Metal returned no buffer (%s allocated "
                                "on the device, recommended working set %s)",
                                cm__fmt_bytes(want, a, sizeof a),
                                cm__fmt_bytes((uint64_t)st_device(st).currentAllocatedSize, b, sizeof b),
                                cm__fmt_bytes(st_device(st).recommendedMaxWorkingSetSize, c, sizeof c));
            uint8_t *p = buf.contents;
            if (!p)
                return cm__fail(CM_ERR_INTERNAL, "a Shared Metal buffer of %s has no contents",
                                cm__fmt_bytes(want, a, sizeof a));
            if ((uintptr_t)p % st->page_size != 0) {
                buf = nil;
                return alloc_mapped(st, len, native, contents, allocated);
            }
            /* Apple's current docs say newBufferWithLength: clears the
             * buffer, but MTLDevice.h promises nothing and older docs did
             * not say so; zero-filled allocations are a tested guarantee of
             * cm_storage_alloc, so pay one memset rather than trust it. */
            memset(p, 0, (size_t)want);
            *allocated = allocated_size(buf, want);
            *native = (__bridge_retained void *)buf;
            *contents = p;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate %s: Metal raised %s",
                            cm__fmt_bytes(want, a, sizeof a), exception_text(e));
        }
    }
}

static void metal_buffer_free(void *state, cm_native_t native, uint8_t *contents, uint64_t len)
{
    (void)state;
    (void)contents;
    (void)len;
    @autoreleasepool {
        release_bridged(native);
    }
}

static int metal_buffer_wrap(void *state, void *ptr, uint64_t len, void (*release)(void *ctx),
                             void *ctx, cm_native_t *native, uint64_t *allocated)
{
    cm_metal_state_t *st = state;
    char a[64], b[64];
    @autoreleasepool {
        /* newBufferWithBytesNoCopy: wants a page-aligned pointer and a
         * length of whole pages. The length is rounded up: the rest of the
         * last page is mapped because the caller's bytes share it, and the
         * core never lets an operation reach past len. */
        if ((uintptr_t)ptr % st->page_size != 0)
            return cm__fail(CM_ERR_UNSUPPORTED,
                            "Metal can wrap only page-aligned memory: address %p is not a "
                            "multiple of the %llu-byte page size",
                            ptr, (unsigned long long)st->page_size);
        uint64_t span = round_to_pages(len, st->page_size);
        if (span == 0 || span > st->max_buffer_length)
            return cm__fail(CM_ERR_OUT_OF_MEMORY,
                            "cannot wrap %s: device maximum buffer length is %s",
                            cm__fmt_bytes(len, a, sizeof a),
                            cm__fmt_bytes(st->max_buffer_length, b, sizeof b));
        /* Metal may hold the buffer after we let go (a command buffer, a
         * residency set), so the memory goes back from the deallocator,
         * when the buffer really dies, on whatever thread drops it last.
         * Whoever claims first decides: the deallocator, or the failure
         * path below, which must leave the memory to the caller (Apple
         * runs the deallocator when a buffer is deallocated, so a buffer
         * never made should never call it; the claim makes sure). */
        __block atomic_int claimed = 0;
        id<MTLBuffer> buf = nil;
        @try {
            buf = [st_device(st) newBufferWithBytesNoCopy:ptr
                                                   length:(NSUInteger)span
                                                  options:kSharedOptions
                                              deallocator:^(void *p, NSUInteger n) {
                                                  (void)p;
                                                  (void)n;
                                                  if (atomic_exchange(&claimed, 1) == 0 &&
                                                      release != NULL)
                                                      release(ctx);
                                              }];
        } @catch (NSException *e) {
            atomic_exchange(&claimed, 1);
            return cm__fail(CM_ERR_UNSUPPORTED, "Metal raised %s wrapping %s at %p",
                            exception_text(e), cm__fmt_bytes(len, a, sizeof a), ptr);
        }
        if (!buf) {
            atomic_exchange(&claimed, 1);
            return cm__fail(CM_ERR_UNSUPPORTED,
                            "Metal refused to wrap %s at %p without copying "
                            "(newBufferWithBytesNoCopy returned nil; the memory must come "
                            "from mmap or vm_allocate)",
                            cm__fmt_bytes(len, a, sizeof a), ptr);
        }
        *allocated = allocated_size(buf, span);
        *native = (__bridge_retained void *)buf;
        return CM_OK;
    }
}

/* Our reference goes; the buffer dies (and a wrap's memory goes back)
 * once Metal lets go too. */
static void metal_buffer_unwrap(void *state, cm_native_t native)
{
    (void)state;
    @autoreleasepool {
        release_bridged(native);
    }
}

static const char *storage_mode_name(MTLStorageMode mode)
{
    switch (mode) {
    case MTLStorageModeShared: return "Shared";
    case MTLStorageModeManaged: return "Managed";
    case MTLStorageModePrivate: return "Private";
    case MTLStorageModeMemoryless: return "Memoryless";
    }
    return "unknown";
}

static int metal_buffer_adopt(void *state, uint64_t handle, cm_native_t *native,
                              uint8_t **contents, uint64_t *len, uint64_t *allocated)
{
    cm_metal_state_t *st = state;
    unsigned long long h = (unsigned long long)handle;
    @autoreleasepool {
        if (handle == 0)
            return cm__fail(CM_ERR_INVALID_ARGUMENT, "native handle 0 is not an MTLBuffer");
        @try {
            id obj = (__bridge id)(void *)(uintptr_t)handle;
            if (![obj respondsToSelector:@selector(contents)] ||
                ![obj respondsToSelector:@selector(storageMode)] ||
                ![obj respondsToSelector:@selector(length)])
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "native handle 0x%llx is not an MTLBuffer", h);
            id<MTLBuffer> buf = obj;
            uint64_t owner = buf.device.registryID;
            if (owner != st->registry_id)
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "MTLBuffer 0x%llx belongs to Metal device registryID 0x%llx, "
                                "not this device (0x%llx)",
                                h, (unsigned long long)owner, (unsigned long long)st->registry_id);
            MTLStorageMode mode = buf.storageMode;
            if (mode != MTLStorageModeShared)
                return cm__fail(CM_ERR_UNSUPPORTED,
                                "MTLBuffer 0x%llx has %s storage; only Shared buffers give "
                                "the CPU the view a storage needs (copy it to a Shared one)",
                                h, storage_mode_name(mode));
            uint8_t *p = buf.contents;
            NSUInteger n = buf.length;
            if (!p || n == 0)
                return cm__fail(CM_ERR_UNSUPPORTED,
                                "MTLBuffer 0x%llx has no CPU contents (length %lu)", h,
                                (unsigned long)n);
            *allocated = allocated_size(buf, (uint64_t)n);
            *native = (__bridge_retained void *)buf;
            *contents = p;
            *len = (uint64_t)n;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_INVALID_ARGUMENT, "Metal raised %s adopting handle 0x%llx",
                            exception_text(e), h);
        }
    }
}

static uint64_t metal_native_handle(cm_native_t native)
{
    return (uint64_t)(uintptr_t)native;
}

/* A buffer cut from a heap is resident only as the whole heap: the heap
 * is the allocation a residency set holds (the buffer keeps it alive). */
static void metal_allocation_of(void *state, cm_native_t native, uint64_t len,
                                void **allocation, uint64_t *allocated)
{
    (void)state;
    *allocation = native;
    *allocated = len;
    @autoreleasepool {
        @try {
            id<MTLBuffer> buf = as_buffer(native);
            id<MTLHeap> heap = buf.heap;
            if (heap) {
                *allocation = (__bridge void *)heap;
                *allocated = (uint64_t)heap.size;
            } else {
                *allocated = allocated_size(buf, len);
            }
        } @catch (NSException *e) {
            (void)e; /* the buffer alone, at the size the core knows */
        }
    }
}

/* ------------------------------------------------------------------ */
/* Byte-granular copy and fill                                         */
/* ------------------------------------------------------------------ */
/* On macOS, blit copies need source offset, destination offset and size,
 * and blit fills need the range's start and length, to be multiples of 4
 * (Apple's docs for copyFromBuffer:... and fillBuffer:range:value:). Views
 * and slices start at any byte, so unaligned copies and fills run through
 * these two kernels instead. Buffers bind at offset 0 and the byte offsets
 * travel in the arguments, because compute buffer offsets have alignment
 * rules of their own. */

static const char kBuiltinSource[] =
    "#include <metal_stdlib>\n"
    "using namespace metal;\n"
    "struct mlxbuf_bytes_args { ulong src_off; ulong dst_off; ulong n; uint value; uint pad; };\n"
    "kernel void mlxbuf_copy_bytes(device const uchar *src [[buffer(0)]],\n"
    "                              device uchar *dst [[buffer(1)]],\n"
    "                              constant mlxbuf_bytes_args &a [[buffer(2)]],\n"
    "                              uint tid [[thread_position_in_grid]],\n"
    "                              uint nthreads [[threads_per_grid]])\n"
    "{\n"
    "    for (ulong i = tid; i < a.n; i += nthreads)\n"
    "        dst[a.dst_off + i] = src[a.src_off + i];\n"
    "}\n"
    "kernel void mlxbuf_fill_bytes(device uchar *dst [[buffer(0)]],\n"
    "                              constant mlxbuf_bytes_args &a [[buffer(1)]],\n"
    "                              uint tid [[thread_position_in_grid]],\n"
    "                              uint nthreads [[threads_per_grid]])\n"
    "{\n"
    "    uchar v = uchar(a.value);\n"
    "    for (ulong i = tid; i < a.n; i += nthreads)\n"
    "        dst[a.dst_off + i] = v;\n"
    "}\n";

/* Layout of mlxbuf_bytes_args above: three 8-byte fields, two 4-byte. */
typedef struct cm_metal_bytes_args {
    uint64_t src_off, dst_off, n;
    uint32_t value, pad;
} cm_metal_bytes_args_t;
_Static_assert(sizeof(cm_metal_bytes_args_t) == 32, "must match mlxbuf_bytes_args");

/* Metal compiles with fast math unless told otherwise (the
 * MTLCompileOptions default): the compiler may then assume no NaN or
 * infinity and reassociate, so kernels silently lose IEEE 754 results.
 * mlxbuf asks for it only when the caller opts in. macOS 15 replaced
 * fastMathEnabled (deprecated there) with mathMode, whose Safe mode is the
 * IEEE one. */
static MTLCompileOptions *compile_options(bool fast_math)
{
    MTLCompileOptions *options = [[MTLCompileOptions alloc] init];
    if (CM_MACOS15_AVAILABLE)
        options.mathMode = fast_math ? MTLMathModeFast : MTLMathModeSafe;
    else
        options.fastMathEnabled = fast_math;
    return options;
}

/* Threads per byte-kernel dispatch: enough to fill the GPU, few enough
 * that each thread loops over a handful of bytes of a large copy. */
#define CM_METAL_BYTE_GRID_MAX (1u << 20)

static int make_builtin(id<MTLDevice> device, id<MTLLibrary> lib, const char *name,
                        void **pipeline, uint64_t *max_threads)
{
    id<MTLFunction> fn = [lib newFunctionWithName:ns_string(name)];
    if (!fn)
        return cm__fail(CM_ERR_INTERNAL, "mlxbuf's built-in kernel %s is missing", name);
    NSError *err = nil;
    id<MTLComputePipelineState> ps = [device newComputePipelineStateWithFunction:fn error:&err];
    if (!ps)
        return cm__fail(CM_ERR_INTERNAL, "mlxbuf's built-in kernel %s has no pipeline: %s", name,
                        error_text(err));
    *max_threads = (uint64_t)ps.maxTotalThreadsPerThreadgroup;
    *pipeline = (__bridge_retained void *)ps;
    return CM_OK;
}

static int get_builtins(cm_metal_state_t *st, cm_metal_builtins_t **out)
{
    cm_metal_builtins_t *b = atomic_load(&st->builtins);
    if (b) {
        *out = b;
        return CM_OK;
    }
    id<MTLDevice> device = st_device(st);
    NSError *err = nil;
    /* The byte kernels only move bytes, so the math mode cannot change what
     * they do; they get the same IEEE default as user kernels, so nothing
     * mlxbuf compiles on its own ever runs under fast-math assumptions. */
    id<MTLLibrary> lib = [device newLibraryWithSource:ns_string(kBuiltinSource)
                                              options:compile_options(false)
                                                error:&err];
    if (!lib)
        return cm__fail(CM_ERR_INTERNAL, "mlxbuf's built-in copy/fill kernels failed to compile: %s",
                        error_text(err));
    b = calloc(1, sizeof *b);
    if (!b)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate the built-in kernel table");
    int rc = make_builtin(device, lib, "mlxbuf_copy_bytes", &b->copy_bytes, &b->copy_max_threads);
    if (rc == CM_OK)
        rc = make_builtin(device, lib, "mlxbuf_fill_bytes", &b->fill_bytes, &b->fill_max_threads);
    if (rc != CM_OK) {
        free_builtins(b);
        return rc;
    }
    /* Two threads may race to build the table; the loser drops its own. */
    cm_metal_builtins_t *expected = NULL;
    if (!atomic_compare_exchange_strong(&st->builtins, &expected, b)) {
        free_builtins(b);
        b = expected;
    }
    *out = b;
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Command buffers                                                     */
/* ------------------------------------------------------------------ */

/* A byte range that a command of the open blit encoder reads or writes. */
typedef struct cm_metal_span {
    const void *buffer;               /* the MTLBuffer, for identity only */
    uint64_t offset, size;
    bool write;
} cm_metal_span_t;

/* Spans remembered per blit encoder; a longer run of blits starts a new
 * encoder, which bounds the checks at CM_METAL_MAX_SPANS per operation. */
#define CM_METAL_MAX_SPANS 64

/* One command buffer being encoded. At most one encoder is open; runs of
 * consecutive operations of one kind share it, except dependent blits
 * (see order_blit) and untracked work that must wait for the fence (see
 * "Untracked buffers" below). */
typedef struct cm_metal_encoding {
    id<MTLCommandBuffer> cmd;
    id<MTLBlitCommandEncoder> blit;
    id<MTLComputeCommandEncoder> compute;
    bool dispatched;                  /* the open compute encoder dispatched */
    cm_metal_span_t spans[CM_METAL_MAX_SPANS]; /* what the open blit encoder touches */
    size_t nspans;
    /* Untracked buffers within this command buffer: the operation being
     * encoded touches one; the open encoder does (it waited for the fence
     * when it opened, and updates it when it ends if untracked work
     * follows); untracked operations not yet encoded; the fence (nil when
     * nothing here is untracked) and whether an encoder updated it. */
    bool op_untracked, open_untracked;
    size_t untracked_left;
    id<MTLFence> fence;
    bool fence_updated;
} cm_metal_encoding_t;

/* End whichever encoder is open. Metal asserts when an encoder is released
 * without endEncoding, so every path out of submit, errors included,
 * comes through here. */
static void end_encoder(cm_metal_encoding_t *enc)
{
    bool update = enc->open_untracked && enc->untracked_left > 0;
    if (enc->blit) {
        if (update)
            [enc->blit updateFence:enc->fence];
        [enc->blit endEncoding];
        enc->blit = nil;
    } else if (enc->compute) {
        if (update)
            [enc->compute updateFence:enc->fence];
        [enc->compute endEncoding];
        enc->compute = nil;
    } else {
        update = false;
    }
    enc->fence_updated = enc->fence_updated || update;
    enc->open_untracked = false;
    enc->nspans = 0;
}

/* An untracked operation's encoder must wait for the fence before its
 * first command once an earlier encoder updated it: an encoder opened
 * without that wait is ended first. */
static void order_untracked(cm_metal_encoding_t *enc)
{
    if (enc->op_untracked && !enc->open_untracked && enc->fence_updated)
        end_encoder(enc);
}

static bool opens_waiting(const cm_metal_encoding_t *enc)
{
    return enc->op_untracked && enc->fence_updated;
}

static id<MTLBlitCommandEncoder> blit_encoder(cm_metal_encoding_t *enc)
{
    if (enc->compute)
        end_encoder(enc);
    order_untracked(enc);
    if (!enc->blit) {
        enc->blit = [enc->cmd blitCommandEncoder];
        if (enc->blit && opens_waiting(enc))
            [enc->blit waitForFence:enc->fence];
    }
    if (enc->blit)
        enc->open_untracked = enc->open_untracked || enc->op_untracked;
    return enc->blit;
}

/* The compute encoder, with a buffer barrier when a dispatch came before
 * in it, so a dispatch sees what the previous one wrote. (Encoders are
 * serial, where Metal accepts and may ignore the barrier; across encoders
 * and command buffers Metal's hazard tracking orders the work, and for
 * untracked buffers the fence and the event do.) */
static id<MTLComputeCommandEncoder> compute_encoder_for_dispatch(cm_metal_encoding_t *enc)
{
    if (enc->blit)
        end_encoder(enc);
    order_untracked(enc);
    if (!enc->compute) {
        enc->compute = [enc->cmd computeCommandEncoder];
        enc->dispatched = false;
        if (enc->compute && opens_waiting(enc))
            [enc->compute waitForFence:enc->fence];
    } else if (enc->dispatched) {
        [enc->compute memoryBarrierWithScope:MTLBarrierScopeBuffers];
    }
    if (enc->compute)
        enc->open_untracked = enc->open_untracked || enc->op_untracked;
    return enc->compute;
}

static int no_encoder(const char *kind)
{
    return cm__fail(CM_ERR_COMMAND_BUFFER, "Metal returned no %s command encoder", kind);
}

static inline MTLSize mtl_size(uint64_t x, uint64_t y, uint64_t z)
{
    return (MTLSize){(NSUInteger)x, (NSUInteger)y, (NSUInteger)z};
}

static bool aligned4(uint64_t a, uint64_t b, uint64_t c)
{
    return ((a | b | c) & 3u) == 0;
}

static bool spans_conflict(const cm_metal_span_t *a, const cm_metal_span_t *b)
{
    return a->buffer == b->buffer && (a->write || b->write) && a->size && b->size &&
           a->offset < b->offset + b->size && b->offset < a->offset + a->size;
}

/* Apple documents no order among the commands of one blit encoder (a
 * serial compute encoder's dispatches are ordered, and Metal orders
 * encoders), so an operation that depends on an earlier one of the open
 * blit encoder -- it reads or writes bytes that one wrote, or writes bytes
 * it read -- goes to a new blit encoder. Call before encoding a blit
 * operation that touches `op`, and note_blit after. */
static void order_blit(cm_metal_encoding_t *enc, const cm_metal_span_t *op, size_t n)
{
    bool conflict = enc->nspans + n > CM_METAL_MAX_SPANS;
    for (size_t i = 0; i < enc->nspans && !conflict; i++)
        for (size_t k = 0; k < n && !conflict; k++)
            conflict = spans_conflict(&enc->spans[i], &op[k]);
    if (conflict)
        end_encoder(enc);
}

static void note_blit(cm_metal_encoding_t *enc, const cm_metal_span_t *op, size_t n)
{
    for (size_t k = 0; k < n && enc->blit && enc->nspans < CM_METAL_MAX_SPANS; k++)
        enc->spans[enc->nspans++] = op[k];
}

/* Run one byte kernel: src is nil for a fill. */
static int encode_byte_kernel(cm_metal_encoding_t *enc, void *pipeline, uint64_t max_threads,
                              id<MTLBuffer> src, id<MTLBuffer> dst,
                              const cm_metal_bytes_args_t *args)
{
    id<MTLComputeCommandEncoder> ce = compute_encoder_for_dispatch(enc);
    if (!ce)
        return no_encoder("compute");
    [ce setComputePipelineState:(__bridge id<MTLComputePipelineState>)pipeline];
    NSUInteger index = 0;
    if (src)
        [ce setBuffer:src offset:0 atIndex:index++];
    [ce setBuffer:dst offset:0 atIndex:index++];
    [ce setBytes:args length:sizeof *args atIndex:index];
    uint64_t threads = args->n < CM_METAL_BYTE_GRID_MAX ? args->n : CM_METAL_BYTE_GRID_MAX;
    uint64_t group = max_threads < 256 ? max_threads : 256;
    if (group > threads)
        group = threads;
    if (group == 0)
        group = 1;
    [ce dispatchThreads:mtl_size(threads, 1, 1) threadsPerThreadgroup:mtl_size(group, 1, 1)];
    enc->dispatched = true;
    return CM_OK;
}

static int encode_copy(cm_metal_encoding_t *enc, const cm_metal_builtins_t *builtins,
                       id<MTLBuffer> src, uint64_t src_off, id<MTLBuffer> dst, uint64_t dst_off,
                       uint64_t n)
{
    if (aligned4(src_off, dst_off, n)) {
        cm_metal_span_t touched[2] = {{(__bridge const void *)src, src_off, n, false},
                                      {(__bridge const void *)dst, dst_off, n, true}};
        order_blit(enc, touched, 2);
        id<MTLBlitCommandEncoder> blit = blit_encoder(enc);
        if (!blit)
            return no_encoder("blit");
        [blit copyFromBuffer:src
                sourceOffset:(NSUInteger)src_off
                    toBuffer:dst
           destinationOffset:(NSUInteger)dst_off
                        size:(NSUInteger)n];
        note_blit(enc, touched, 2);
        return CM_OK;
    }
    cm_metal_bytes_args_t args = {src_off, dst_off, n, 0, 0};
    return encode_byte_kernel(enc, builtins->copy_bytes, builtins->copy_max_threads, src, dst,
                              &args);
}

static int encode_fill(cm_metal_encoding_t *enc, const cm_metal_builtins_t *builtins,
                       id<MTLBuffer> dst, uint64_t off, uint64_t n, uint8_t value)
{
    if (aligned4(off, n, 0)) {
        cm_metal_span_t touched = {(__bridge const void *)dst, off, n, true};
        order_blit(enc, &touched, 1);
        id<MTLBlitCommandEncoder> blit = blit_encoder(enc);
        if (!blit)
            return no_encoder("blit");
        [blit fillBuffer:dst range:(NSRange){(NSUInteger)off, (NSUInteger)n} value:value];
        note_blit(enc, &touched, 1);
        return CM_OK;
    }
    cm_metal_bytes_args_t args = {0, off, n, value, 0};
    return encode_byte_kernel(enc, builtins->fill_bytes, builtins->fill_max_threads, nil, dst,
                              &args);
}

static bool ranges_overlap(uint64_t a, uint64_t b, uint64_t n)
{
    return a < b + n && b < a + n;
}

static int encode_op(cm_metal_state_t *st, cm_metal_encoding_t *enc,
                     const cm_metal_builtins_t *builtins, const cm_op_t *op)
{
    /* Metal rejects empty fills; an empty copy does nothing anyway. */
    if ((op->kind == CM_OP_COPY || op->kind == CM_OP_FILL) && op->nbytes == 0)
        return CM_OK;
    switch (op->kind) {
    case CM_OP_COPY: {
        uint64_t so = op->src_offset + op->src->native_offset;
        uint64_t dof = op->dst_offset + op->dst->native_offset;
        id<MTLBuffer> src = as_buffer(op->src->native);
        id<MTLBuffer> dst = as_buffer(op->dst->native);
        int rc;
        if (op->src->native == op->dst->native && ranges_overlap(so, dof, op->nbytes)) {
            /* Blits and the byte kernel are undefined on overlapping
             * ranges. The core refuses overlaps within one storage, but two
             * storages can adopt the same MTLBuffer, which only the native
             * pointers show; a scratch buffer gives memmove semantics. The
             * command buffer keeps the scratch buffer alive until it
             * completes. The second copy reads what the first wrote, so
             * as blits they go to two encoders (encode_copy orders them). */
            id<MTLBuffer> tmp = [st_device(st) newBufferWithLength:(NSUInteger)op->nbytes
                                                           options:kSharedOptions];
            if (!tmp) {
                char a[64];
                return cm__fail(CM_ERR_OUT_OF_MEMORY,
                                "cannot allocate a %s scratch buffer for an overlapping copy",
                                cm__fmt_bytes(op->nbytes, a, sizeof a));
            }
            rc = encode_copy(enc, builtins, src, so, tmp, 0, op->nbytes);
            if (rc == CM_OK)
                rc = encode_copy(enc, builtins, tmp, 0, dst, dof, op->nbytes);
        } else {
            rc = encode_copy(enc, builtins, src, so, dst, dof, op->nbytes);
        }
        return rc;
    }
    case CM_OP_FILL: {
        uint64_t off = op->dst_offset + op->dst->native_offset;
        return encode_fill(enc, builtins, as_buffer(op->dst->native), off, op->nbytes,
                           (uint8_t)op->value);
    }
    case CM_OP_DISPATCH: {
        id<MTLComputeCommandEncoder> ce = compute_encoder_for_dispatch(enc);
        if (!ce)
            return no_encoder("compute");
        [ce setComputePipelineState:(__bridge id<MTLComputePipelineState>)op->kernel->pipeline];
        for (size_t i = 0; i < op->nbufs; i++) {
            const cm_storage_t *s = op->bufs[i];
            [ce setBuffer:as_buffer(s->native)
                   offset:(NSUInteger)(op->offsets[i] + s->native_offset)
                  atIndex:(NSUInteger)i];
        }
        const uint8_t *bytes = op->consts;
        for (size_t j = 0; j < op->nconsts; j++) {
            [ce setBytes:bytes
                  length:(NSUInteger)op->const_sizes[j]
                 atIndex:(NSUInteger)(op->nbufs + j)];
            bytes += op->const_sizes[j];
        }
        [ce dispatchThreads:mtl_size(op->grid[0], op->grid[1], op->grid[2])
            threadsPerThreadgroup:mtl_size(op->threadgroup[0], op->threadgroup[1],
                                           op->threadgroup[2])];
        enc->dispatched = true;
        return CM_OK;
    }
    }
    return cm__fail(CM_ERR_INTERNAL, "unknown command buffer operation kind %d", op->kind);
}

static int gpu_visible(const cm_storage_t *s, size_t index, const char *role)
{
    if (s && s->native)
        return CM_OK;
    return cm__fail(CM_ERR_INVALID_ARGUMENT,
                    "operation %zu: the %s storage has no Metal buffer", index, role);
}

/* Check every operation before Metal sees any: Metal answers misuse with
 * an assertion (with the validation layer) or undefined behaviour, not an
 * error. Sets *needs_builtins when a copy or fill is not 4-byte aligned. */
static int validate_ops(const cm_cmdbuf_t *cb, bool *needs_builtins)
{
    *needs_builtins = false;
    for (size_t i = 0; i < cb->nops; i++) {
        const cm_op_t *op = &cb->ops[i];
        int rc;
        switch (op->kind) {
        case CM_OP_COPY:
            if ((rc = gpu_visible(op->src, i, "source")) || (rc = gpu_visible(op->dst, i, "destination")))
                return rc;
            if (op->nbytes && !aligned4(op->src_offset + op->src->native_offset,
                                        op->dst_offset + op->dst->native_offset, op->nbytes))
                *needs_builtins = true;
            break;
        case CM_OP_FILL:
            if ((rc = gpu_visible(op->dst, i, "destination")))
                return rc;
            if (op->value < 0 || op->value > 255)
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "operation %zu: fill value %d is outside 0..255", i, op->value);
            if (op->nbytes && !aligned4(op->dst_offset + op->dst->native_offset, op->nbytes, 0))
                *needs_builtins = true;
            break;
        case CM_OP_DISPATCH: {
            if (!op->kernel || !op->kernel->pipeline)
                return cm__fail(CM_ERR_INVALID_ARGUMENT, "operation %zu: dispatch without a kernel", i);
            if (op->nbufs + op->nconsts > CM_MAX_KERNEL_ARGS)
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "operation %zu: %zu buffers and %zu constants exceed Metal's %d "
                                "argument slots", i, op->nbufs, op->nconsts, CM_MAX_KERNEL_ARGS);
            for (size_t j = 0; j < op->nbufs; j++)
                if ((rc = gpu_visible(op->bufs[j], i, "kernel argument")))
                    return rc;
            for (size_t j = 0; j < op->nconsts; j++)
                if (op->const_sizes[j] == 0 || op->const_sizes[j] > CM_METAL_MAX_SET_BYTES)
                    return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                    "operation %zu: constant %zu is %llu bytes; Metal takes "
                                    "1 to %u bytes inline (pass a buffer instead)",
                                    i, j, (unsigned long long)op->const_sizes[j],
                                    CM_METAL_MAX_SET_BYTES);
            uint64_t per_group = 1;
            for (int d = 0; d < 3; d++) {
                if (op->grid[d] == 0 || op->threadgroup[d] == 0)
                    return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                    "operation %zu: grid (%llu, %llu, %llu) and threadgroup "
                                    "(%llu, %llu, %llu) must have no zero dimension", i,
                                    (unsigned long long)op->grid[0], (unsigned long long)op->grid[1],
                                    (unsigned long long)op->grid[2],
                                    (unsigned long long)op->threadgroup[0],
                                    (unsigned long long)op->threadgroup[1],
                                    (unsigned long long)op->threadgroup[2]);
                per_group = op->threadgroup[d] > UINT64_MAX / per_group
                                ? UINT64_MAX
                                : per_group * op->threadgroup[d];
            }
            uint64_t limit = op->kernel->info.max_total_threads_per_threadgroup;
            if (limit && per_group > limit)
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "operation %zu: threadgroup of %llu threads exceeds the kernel's "
                                "maximum of %llu", i, (unsigned long long)per_group,
                                (unsigned long long)limit);
            break;
        }
        default:
            return cm__fail(CM_ERR_INTERNAL, "operation %zu: unknown kind %d", i, op->kind);
        }
    }
    return CM_OK;
}

/* Runs on a Metal completion thread. */
static void report_completion(cm_cmdbuf_t *cb, id<MTLCommandBuffer> done)
{
    char msg[512];
    int status = CM_ERR_COMMAND_BUFFER;
    @autoreleasepool {
        @try {
            MTLCommandBufferStatus s = done.status;
            if (s == MTLCommandBufferStatusCompleted) {
                status = CM_OK;
            } else if (s == MTLCommandBufferStatusError) {
                NSError *e = done.error;
                snprintf(msg, sizeof msg, "Metal command buffer failed: %s (MTLCommandBufferError %ld)",
                         error_text(e), e ? (long)e.code : 0L);
            } else {
                snprintf(msg, sizeof msg, "Metal command buffer finished in status %lu",
                         (unsigned long)s);
            }
        } @catch (NSException *e) {
            snprintf(msg, sizeof msg, "Metal raised %s reading the command buffer's status",
                     exception_text(e));
        }
    }
    cm__cmdbuf_complete(cb, status, status == CM_OK ? NULL : msg);
}

/* ------------------------------------------------------------------ */
/* Untracked buffers                                                   */
/* ------------------------------------------------------------------ */
/* Metal orders the work of encoders and command buffers that share a
 * buffer only for buffers it tracks. One made with
 * MTLResourceHazardTrackingModeUntracked (MLX allocates this way, so
 * DLPack imports from MLX are such; heaps default to it) gets no order
 * from Metal, so submissions that touch an untracked storage order
 * themselves, and only they pay for it (Apple's "Resource
 * synchronization"):
 * - within a command buffer, an MTLFence: every encoder with untracked
 *   work waits for it before its first command (once an earlier one
 *   updated it) and updates it when it ends while more untracked work
 *   follows;
 * - across command buffers, one MTLSharedEvent per device: a command
 *   buffer with untracked work first waits for the value the previous
 *   such command buffer signals, and signals the next value last. Values
 *   are given in submission order, which is commit order (the core calls
 *   submit under its submit lock), and a value is counted as given only
 *   once its command buffer is committed, so nothing waits for a value no
 *   committed command buffer will signal. A command buffer that fails may
 *   stop before its signal: its completion handler then sets the value
 *   from the CPU, which a shared event allows, so the next one still
 *   runs. */

/* Storages that adopted a native buffer ask this once (backend.h). */
static bool metal_native_untracked(cm_native_t native)
{
    @autoreleasepool {
        @try {
            return as_buffer(native).hazardTrackingMode == MTLHazardTrackingModeUntracked;
        } @catch (NSException *e) {
            (void)e;
            return true; /* ordering what Metal might have ordered costs little */
        }
    }
}

static bool op_untracked(const cm_op_t *op)
{
    if (op->kind == CM_OP_DISPATCH) {
        bool any = false;
        for (size_t i = 0; i < op->nbufs; i++)
            any = any || op->bufs[i]->untracked;
        return any;
    }
    return op->dst->untracked || (op->kind == CM_OP_COPY && op->src->untracked);
}

static size_t count_untracked(const cm_cmdbuf_t *cb)
{
    size_t n = 0;
    for (size_t i = 0; i < cb->nops; i++)
        n += op_untracked(&cb->ops[i]);
    return n;
}

/* The device's ordering event, made on the first untracked submission.
 * Called under the core's submit lock, which guards it. */
static int ordering_event(cm_metal_state_t *st, id<MTLSharedEvent> *out)
{
    if (!st->order_event) {
        id<MTLSharedEvent> event = [st_device(st) newSharedEvent];
        if (!event)
            return cm__fail(CM_ERR_COMMAND_BUFFER,
                            "Metal returned no shared event to order untracked buffers");
        st->order_event = (__bridge_retained void *)event;
    }
    *out = (__bridge id<MTLSharedEvent>)st->order_event;
    return CM_OK;
}

/* Set up the ordering of a command buffer with untracked work: its
 * fence, and its wait for the previous such command buffer.
 * *signal_value is the value it signals when done. */
static int order_command_buffer(cm_metal_state_t *st, cm_metal_encoding_t *enc,
                                id<MTLSharedEvent> *event, uint64_t *signal_value)
{
    int rc = ordering_event(st, event);
    if (rc != CM_OK)
        return rc;
    enc->fence = [st_device(st) newFence];
    if (!enc->fence)
        return cm__fail(CM_ERR_COMMAND_BUFFER,
                        "Metal returned no fence to order untracked buffers");
    if (st->order_value > 0)
        [enc->cmd encodeWaitForEvent:*event value:st->order_value];
    *signal_value = st->order_value + 1;
    return CM_OK;
}

/* On a completion thread: a command buffer that did not complete may not
 * have signalled its value; the next one waits for it. */
static void signal_if_failed(id<MTLSharedEvent> event, uint64_t value, id<MTLCommandBuffer> done)
{
    @try {
        if (done.status != MTLCommandBufferStatusCompleted && event.signaledValue < value)
            event.signaledValue = value;
    } @catch (NSException *e) {
        (void)e; /* report_completion reports the command buffer's failure */
    }
}

/* ------------------------------------------------------------------ */
/* Submission                                                          */
/* ------------------------------------------------------------------ */

/* The one Metal call of a submission that can block: commandBuffer waits
 * while the queue has 64 uncompleted command buffers (Apple's default
 * maxCommandBufferCount). The core calls this before it takes a lock, and
 * hands the result to metal_submit. commandBuffer (not
 * ...WithUnretainedReferences) keeps every buffer it uses alive until
 * completion, on top of the core's holds; the scratch buffers of
 * overlapping copies need it. */
static int metal_prepare(void *state, void **prepared)
{
    cm_metal_state_t *st = state;
    @autoreleasepool {
        @try {
            id<MTLCommandBuffer> cmd = [st_queue(st) commandBuffer];
            if (!cmd)
                return cm__fail(CM_ERR_COMMAND_BUFFER, "Metal returned no command buffer");
            *prepared = (__bridge_retained void *)cmd;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_COMMAND_BUFFER, "Metal raised %s creating a command buffer",
                            exception_text(e));
        }
    }
}

/* A command buffer never committed: releasing it gives its place in the
 * queue back. */
static void metal_unprepare(void *state, void *prepared)
{
    (void)state;
    @autoreleasepool {
        release_bridged(prepared);
    }
}

static int metal_submit(void *state, cm_cmdbuf_t *cb, void *prepared)
{
    cm_metal_state_t *st = state;
    @autoreleasepool {
        /* Owned from here: every way out releases it. */
        id<MTLCommandBuffer> cmd = (__bridge_transfer id<MTLCommandBuffer>)prepared;
        bool needs_builtins;
        int rc = validate_ops(cb, &needs_builtins);
        if (rc != CM_OK)
            return rc;

        cm_metal_encoding_t enc = {.cmd = cmd, .untracked_left = count_untracked(cb)};
        /* Exactly one of the completion handler and a failed commit may
         * report this command buffer; whoever flips the flag first does. */
        __block atomic_int claimed = 0;
        bool handler_added = false;
        id<MTLSharedEvent> event = nil;
        uint64_t signal_value = 0;
        @try {
            cm_metal_builtins_t *builtins = NULL;
            if (needs_builtins && (rc = get_builtins(st, &builtins)) != CM_OK)
                return rc;
            if (enc.untracked_left > 0 &&
                (rc = order_command_buffer(st, &enc, &event, &signal_value)) != CM_OK)
                return rc;
            for (size_t i = 0; i < cb->nops; i++) {
                enc.op_untracked = op_untracked(&cb->ops[i]);
                if ((rc = encode_op(st, &enc, builtins, &cb->ops[i])) != CM_OK) {
                    end_encoder(&enc);
                    return rc;
                }
                enc.untracked_left -= enc.op_untracked;
            }
            end_encoder(&enc);
            if (event)
                [enc.cmd encodeSignalEvent:event value:signal_value];
            [enc.cmd addCompletedHandler:^(id<MTLCommandBuffer> done) {
                if (atomic_exchange(&claimed, 1) == 0) {
                    if (event)
                        signal_if_failed(event, signal_value, done);
                    report_completion(cb, done);
                }
            }];
            handler_added = true;
            [enc.cmd commit];
        } @catch (NSException *e) {
            @try {
                end_encoder(&enc);
            } @catch (NSException *again) {
                (void)again;
            }
            /* Submitted after all when the handler already ran. */
            if (!handler_added || atomic_exchange(&claimed, 1) == 0)
                return cm__fail(CM_ERR_COMMAND_BUFFER,
                                "Metal raised %s submitting a command buffer",
                                exception_text(e));
        }
        if (event)
            st->order_value = signal_value;
        return CM_OK;
    }
}

/* ------------------------------------------------------------------ */
/* Compute                                                             */
/* ------------------------------------------------------------------ */

static int metal_library_compile(void *state, const char *source, bool fast_math, void **lib)
{
    cm_metal_state_t *st = state;
    @autoreleasepool {
        NSString *text = source ? ns_string(source) : nil;
        if (!text)
            return cm__fail(CM_ERR_INVALID_ARGUMENT, "shader source is %s",
                            source ? "not valid UTF-8" : "NULL");
        @try {
            NSError *err = nil;
            id<MTLLibrary> library = [st_device(st) newLibraryWithSource:text
                                                                 options:compile_options(fast_math)
                                                                   error:&err];
            /* err can be set alongside a library (warnings): only nil fails. */
            if (!library)
                return cm__fail(CM_ERR_SHADER_COMPILATION, "%s", error_text(err));
            *lib = (__bridge_retained void *)library;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_SHADER_COMPILATION, "Metal raised %s compiling the library",
                            exception_text(e));
        }
    }
}

static void metal_library_release(void *lib)
{
    @autoreleasepool {
        release_bridged(lib);
    }
}

/* "a, b, c" of the library's functions, for the not-found message. */
static void function_names(id<MTLLibrary> library, char *out, size_t cap)
{
    NSArray<NSString *> *names = library.functionNames;
    size_t used = 0;
    out[0] = '\0';
    for (NSUInteger i = 0; i < names.count && used + 1 < cap; i++) {
        int n = snprintf(out + used, cap - used, "%s%s", i ? ", " : "",
                         ns_text([names objectAtIndex:i], "?"));
        if (n < 0)
            break;
        used += (size_t)n;
    }
    if (!out[0])
        copy_cstr(out, cap, "none");
}

/* The offset alignment of each buffer argument, for the core's check
 * before setBuffer:offset:atIndex: (Apple: a device-space offset is
 * aligned to the argument's data type). Indices reflection does not list
 * stay 0, which the core reads as "unknown". bindings is macOS 13, below
 * the oldest macOS mlxbuf supports. */
static void read_buffer_alignments(MTLComputePipelineReflection *reflection,
                                   cm_kernel_info_t *info)
{
    NSArray<id<MTLBinding>> *bindings = reflection.bindings;
    for (NSUInteger i = 0; i < bindings.count; i++) {
        id<MTLBinding> binding = [bindings objectAtIndex:i];
        if (binding.type != MTLBindingTypeBuffer || binding.index >= CM_MAX_KERNEL_ARGS)
            continue;
        NSUInteger align = ((id<MTLBufferBinding>)binding).bufferAlignment;
        info->buffer_alignment[binding.index] = align > UINT32_MAX ? UINT32_MAX : (uint32_t)align;
    }
}

static int metal_kernel_create(void *state, void *lib, const char *name, void **pipeline,
                               cm_kernel_info_t *info)
{
    cm_metal_state_t *st = state;
    @autoreleasepool {
        NSString *fname = name ? ns_string(name) : nil;
        if (!fname)
            return cm__fail(CM_ERR_INVALID_ARGUMENT, "kernel name is %s",
                            name ? "not valid UTF-8" : "NULL");
        @try {
            id<MTLLibrary> library = (__bridge id<MTLLibrary>)lib;
            id<MTLFunction> fn = [library newFunctionWithName:fname];
            if (!fn) {
                char names[256];
                function_names(library, names, sizeof names);
                return cm__fail(CM_ERR_KERNEL_NOT_FOUND,
                                "no function '%s' in the library (functions: %s)", name, names);
            }
            if (fn.functionType != MTLFunctionTypeKernel)
                return cm__fail(CM_ERR_KERNEL_NOT_FOUND,
                                "function '%s' is not a kernel function (MTLFunctionType %lu)",
                                name, (unsigned long)fn.functionType);
            NSError *err = nil;
            MTLAutoreleasedComputePipelineReflection reflection = nil;
            id<MTLComputePipelineState> ps = [st_device(st)
                newComputePipelineStateWithFunction:fn
                                            options:MTLPipelineOptionBindingInfo |
                                                    MTLPipelineOptionBufferTypeInfo
                                         reflection:&reflection
                                              error:&err];
            if (!ps)
                return cm__fail(CM_ERR_SHADER_COMPILATION,
                                "cannot build a compute pipeline for '%s': %s", name,
                                error_text(err));
            copy_cstr(info->name, sizeof info->name, name);
            info->max_total_threads_per_threadgroup = (uint64_t)ps.maxTotalThreadsPerThreadgroup;
            info->thread_execution_width = (uint64_t)ps.threadExecutionWidth;
            read_buffer_alignments(reflection, info);
            *pipeline = (__bridge_retained void *)ps;
            return CM_OK;
        } @catch (NSException *e) {
            return cm__fail(CM_ERR_SHADER_COMPILATION, "Metal raised %s creating kernel '%s'",
                            exception_text(e), name);
        }
    }
}

static void metal_kernel_release(void *pipeline)
{
    @autoreleasepool {
        release_bridged(pipeline);
    }
}

/* ------------------------------------------------------------------ */

const cm_backend_t cm_metal_backend = {
    .name = "metal",
    .kind = CM_BACKEND_METAL,
    .available = metal_available,
    .open = metal_open,
    .close = metal_close,
    .buffer_alloc = metal_buffer_alloc,
    .buffer_free = metal_buffer_free,
    .buffer_wrap = metal_buffer_wrap,
    .buffer_unwrap = metal_buffer_unwrap,
    .buffer_adopt = metal_buffer_adopt,
    .native_handle = metal_native_handle,
    .allocation_of = metal_allocation_of,
    .current_allocated_size = metal_current_allocated_size,
    .native_untracked = metal_native_untracked,
    .rset_create = metal_rset_create,
    .rset_destroy = metal_rset_destroy,
    .rset_add = metal_rset_add,
    .rset_remove = metal_rset_remove,
    .rset_commit = metal_rset_commit,
    .rset_request = metal_rset_request,
    .prepare = metal_prepare,
    .unprepare = metal_unprepare,
    .submit = metal_submit,
    .library_compile = metal_library_compile,
    .library_release = metal_library_release,
    .kernel_create = metal_kernel_create,
    .kernel_release = metal_kernel_release,
};
