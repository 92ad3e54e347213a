/*
 * sim.h -- what the files of the simulated Metal share. Not an API: tests
 * and mlxbuf use metalsim.h.
 *
 * Layout (one concept per file):
 *   NSObject.m    the root class and the constant-string class (no ARC)
 *   Foundation.m  NSString, NSArray, NSError, NSException, NSProcessInfo
 *   list.m        MSimList, the growable array everything else uses
 *   control.m     configuration, faults, statistics, validation log,
 *                 kernel registry, the simulator lock
 *   device.m      MTLCreateSystemDefaultDevice, MTLCopyAllDevices, device
 *   buffer.m      MTLBuffer
 *   heap.m        MTLHeapDescriptor, MTLHeap
 *   residency.m   MTLResidencySetDescriptor, MTLResidencySet
 *   sync.m        MTLFence, MTLEvent, MTLSharedEvent
 *   library.m     MTLCompileOptions, MTLLibrary, MTLFunction, pipelines,
 *                 the MSL signature reader and the built-in kernels
 *   encoder.m     blit and compute encoders and the commands they record
 *   hazards.m     ordering of untracked resources across passes
 *   queue.m       MTLCommandQueue, MTLCommandBuffer, the GPU thread and
 *                 the completion thread
 *
 * Locking: one simulator lock (msim__lock) guards every piece of shared
 * bookkeeping (registries, residency membership counts, hazard history,
 * queue counters). It is never held while calling a kernel or a
 * completion handler, and never waited on while held twice.
 */
#ifndef METALSIM_SIM_H
#define METALSIM_SIM_H

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "metalsim.h"

#define MSIM_PRINTF(f, a) __attribute__((format(printf, f, a)))

#pragma clang assume_nonnull begin

/* ---- ObjFW runtime functions used here ---------------------------------- */

const char *sel_getName(SEL sel);
const char *class_getName(Class cls);
Class object_getClass(id obj);

/* ---- NSObject.m ---------------------------------------------------------- */

/* The object's reference count (0 while it deallocates). */
NSUInteger msim__retain_count(__unsafe_unretained id obj);
uint64_t msim__live_objects(void);

/* ---- control.m ------------------------------------------------------------ */

typedef struct msim_config {
    int macos_major;
    uint64_t latency_us;
    uint64_t max_buffer_length;
    uint64_t recommended_working_set;
    uint64_t generation;      /* bumped by every msim_configure */
} msim_config_t;

msim_config_t msim__config(void);
bool msim__default_device_nil(void);

/* The simulator lock is recursive: releasing an object under it can
 * deallocate the object on the spot, and deallocation updates the
 * registries the lock guards. */
void msim__lock(void);
void msim__unlock(void);
/* Monotonic seconds. */
double msim__now(void);
/* Wait on the simulator's condition (lock held) until woken or the
 * deadline (msim__now() seconds) passes; false once it has passed. */
bool msim__wait_until(double deadline);
void msim__broadcast(void);

/* Record a broken rule: "[rule] what happened". */
void msim__invalid(const char *rule, const char *fmt, ...) MSIM_PRINTF(2, 3);

/* Consume one armed fault of kind what (MSIM_FAULT_*), or one armed
 * misalignment (msim_misalign_next). */
bool msim__take_fault(int what);
bool msim__take_misalign(void);

/* Every simulated Metal method starts with MSIM_ENTRY(): the raise knob;
 * one whose result Apple declares nullable uses MSIM_ENTRY_NULLABLE(),
 * which also answers the nil knob (msim_nil_next). */
void msim__entry(id self, SEL cmd);
bool msim__entry_nullable(id self, SEL cmd);
#define MSIM_ENTRY() msim__entry(self, _cmd)
#define MSIM_ENTRY_NULLABLE()                 \
    do {                                      \
        if (msim__entry_nullable(self, _cmd)) \
            return nil;                       \
    } while (0)

bool msim__kernel_find(const char *name, msim_kernel_fn _Nullable *_Nonnull fn,
                       void *_Nullable *_Nonnull ctx);

/* Process-wide counters (msim_get_stats adds the computed ones). */
typedef struct msim_counters {
    atomic_uint_fast64_t live_buffers, live_bytes, live_heaps, live_heap_bytes;
    atomic_uint_fast64_t buffers_created, deallocators_run, nocopy_unmapped_before_release;
    atomic_uint_fast64_t residency_sets_live, residency_commits, residency_adds;
    atomic_uint_fast64_t residency_removes, residency_requests, residency_members;
    atomic_uint_fast64_t command_buffers_created, command_buffers_committed;
    atomic_uint_fast64_t command_buffers_completed, command_buffers_failed;
    atomic_uint_fast64_t command_buffers_blocked, encoders_created, blits, dispatches;
    atomic_uint_fast64_t fences_created, event_commands;
    atomic_uint_fast64_t libraries_compiled, libraries_fast_math, exceptions_raised;
    atomic_uint_fast64_t serial;
} msim_counters_t;
extern msim_counters_t msim__c;
#define MSIM_COUNT(field, delta) atomic_fetch_add(&msim__c.field, (uint_fast64_t)(delta))
#define MSIM_UNCOUNT(field, delta) atomic_fetch_sub(&msim__c.field, (uint_fast64_t)(delta))
#define MSIM_SERIAL() (atomic_fetch_add(&msim__c.serial, 1) + 1)

/* ---- Foundation.m --------------------------------------------------------- */

@interface NSString (MetalSim)
+ (NSString *)msim_stringWithFormat:(const char *)fmt, ... MSIM_PRINTF(1, 2);
@end

@interface NSError (MetalSim)
+ (NSError *)msim_errorWithDomain:(NSErrorDomain)domain
                             code:(NSInteger)code
                      description:(NSString *)description;
@end

/* Raise NSException `name` with a printf-formatted reason. */
void msim__raise(NSExceptionName name, const char *fmt, ...) MSIM_PRINTF(2, 3)
    __attribute__((noreturn));

/* ---- list.m ---------------------------------------------------------------- */

/* A growable array of strong references (the simulator's NSMutableArray).
 * Not thread-safe. */
@interface MSimList : NSObject
@property (readonly) NSUInteger count;
- (void)add:(id)object;
- (id)at:(NSUInteger)index;
- (void)removeAt:(NSUInteger)index;
- (void)removeAll;
- (BOOL)containsIdentical:(id)object;
- (NSArray *)array;
@end

/* ---- device.m ------------------------------------------------------------- */

@interface MSimDevice : NSObject <MTLDevice>
@property (readonly) msim_config_t config;
- (instancetype)initWithConfig:(msim_config_t)config;
- (void)msim_allocated:(int64_t)delta;
@end

/* ---- buffer.m --------------------------------------------------------------- */

/* The simulator's factories are in the new family (+1, no autorelease), as
 * Metal's own newBuffer... are: a buffer must die when its last owner lets
 * go, not when some autorelease pool drains. */
@class MSimHeap, MSimList;

@interface MSimBuffer : NSObject <MTLBuffer>
@property (readonly) uint64_t serial;
@property (readonly) uint8_t *bytes;          /* backing store, even Private  */
@property (readonly) BOOL memoryReadOnly;     /* no-copy over read-only pages */
@property (readonly) BOOL untracked;
/* allocatedSize and heap without the raise knob (for the simulator). */
@property (readonly) NSUInteger msimAllocatedSize;
@property (readonly) NSUInteger msimLength;
@property (readonly, nullable) MSimHeap *msimHeap;
@property (readonly) MSimDevice *msimDevice;
/* Residency-set references (guarded by the simulator lock). */
@property (nonatomic) NSUInteger setRefs;
/* Hazard history of an untracked buffer (guarded by the simulator lock). */
@property (nonatomic, strong, nullable) MSimList *accesses;
+ (nullable instancetype)newWithDevice:(MSimDevice *)device
                                length:(NSUInteger)length
                               options:(MTLResourceOptions)options;
+ (nullable instancetype)newWithDevice:(MSimDevice *)device
                                 bytes:(void *)pointer
                                length:(NSUInteger)length
                               options:(MTLResourceOptions)options
                           deallocator:(nullable void (^)(void *, NSUInteger))deallocator;
+ (nullable instancetype)newInHeap:(MSimHeap *)heap
                             bytes:(uint8_t *)bytes
                               offset:(NSUInteger)offset
                               length:(NSUInteger)length
                        allocatedSize:(NSUInteger)allocated
                              options:(MTLResourceOptions)options;
- (NSString *)msim_description;
@end

/* Sum of allocatedSize over live buffers that only residency sets hold. */
uint64_t msim__held_bytes(void);

/* n rounded up to a multiple of `to` (a power of two), 0 on overflow. */
uint64_t msim__round_up(uint64_t n, uint64_t to);

/* ---- heap.m ------------------------------------------------------------------ */

@interface MSimHeap : NSObject <MTLHeap>
@property (readonly) uint64_t serial;
@property (readonly) NSUInteger msimSize;
- (nullable instancetype)initWithDevice:(MSimDevice *)device
                             descriptor:(MTLHeapDescriptor *)descriptor;
- (void)msim_freeOffset:(NSUInteger)offset length:(NSUInteger)length;
@end

/* ---- residency.m --------------------------------------------------------------- */

@interface MSimResidencySet : NSObject <MTLResidencySet>
- (instancetype)initWithDevice:(MSimDevice *)device
                    descriptor:(MTLResidencySetDescriptor *)descriptor;
@end

/* ---- sync.m ------------------------------------------------------------------ */

@class MSimPass;

@interface MSimFence : NSObject <MTLFence>
- (instancetype)initWithDevice:(MSimDevice *)device;
/* The pass that last updated the fence, in commit order (simulator lock). */
@property (nonatomic, strong, nullable) MSimPass *lastUpdate;
@end

@interface MSimEvent : NSObject <MTLEvent>
- (instancetype)initWithDevice:(MSimDevice *)device;
/* GPU side: the value becomes max(value, v), waking waiters. */
- (void)msim_signal:(uint64_t)value;
/* GPU side: wait until the value reaches v; NO after the watchdog. */
- (BOOL)msim_waitFor:(uint64_t)value seconds:(double)seconds;
- (uint64_t)msim_value;
/* Signals encoded so far, in commit order: pass nodes with their values
 * (simulator lock). */
@property (nonatomic, strong, readonly) MSimList *signals;
@end

@interface MSimSharedEvent : MSimEvent <MTLSharedEvent>
@end

/* ---- library.m ------------------------------------------------------------------ */

/* One [[buffer(n)]] argument of a kernel, read from the MSL signature. */
typedef struct msim_arg {
    unsigned index;
    bool device_space;        /* device (else constant)                    */
    bool written;             /* device and not const                      */
    unsigned alignment;       /* required setBuffer offset alignment       */
    unsigned type_size;       /* sizeof the element type; 0 if unknown     */
    unsigned type_alignment;  /* alignof the element type; 0 if unknown    */
    char name[64];            /* the parameter's name                      */
} msim_arg_t;

@interface MSimFunction : NSObject <MTLFunction>
@property (readonly) const msim_arg_t *args;
@property (readonly) NSUInteger nargs;
@property (readonly) BOOL fastMath;
@end

@interface MSimLibrary : NSObject <MTLLibrary>
+ (nullable instancetype)newWithDevice:(MSimDevice *)device
                                source:(NSString *)source
                                  fastMath:(BOOL)fastMath
                                     error:(NSError *_Nullable *_Nullable)error;
@end

/* The reflection of a compute pipeline: one MTLBufferBinding per
 * [[buffer(n)]] argument the simulator read. */
@interface MTLComputePipelineReflection ()
- (instancetype)initWithFunction:(MSimFunction *)function;
@end

@interface MSimPipeline : NSObject <MTLComputePipelineState>
@property (readonly, strong) MSimFunction *function;
@property (readonly, strong) MSimDevice *device;
- (instancetype)initWithDevice:(MSimDevice *)device function:(MSimFunction *)function;
@end

/* ---- encoder.m ------------------------------------------------------------------- */

typedef enum msim_command_kind {
    MSIM_CMD_COPY = 1,
    MSIM_CMD_FILL,
    MSIM_CMD_DISPATCH,
} msim_command_kind_t;

/* One recorded command; buffers are held until the command buffer is done. */
@interface MSimCommand : NSObject
@property (nonatomic) msim_command_kind_t kind;
@property (nonatomic, strong, nullable) MSimBuffer *src, *dst;
@property (nonatomic) NSUInteger srcOffset, dstOffset, size;
@property (nonatomic) uint8_t value;
@property (nonatomic, strong, nullable) MSimPipeline *pipeline;
@property (nonatomic) MTLSize grid, threadgroup;
/* DISPATCH: the bound buffers (MSimBinding), sorted by index. */
@property (nonatomic, strong, nullable) MSimList *bindings;
@property (nonatomic) uint8_t *constants;     /* malloc'd, freed at dealloc */
@property (nonatomic) uint64_t constantsLength;
@end

@interface MSimBinding : NSObject
@property (nonatomic) NSUInteger index;
@property (nonatomic, strong, nullable) MSimBuffer *buffer;  /* nil: bytes */
@property (nonatomic) NSUInteger offset;
@property (nonatomic) uint8_t *bytes;                         /* malloc'd   */
@property (nonatomic) NSUInteger length;
@end

typedef enum msim_pass_kind {
    MSIM_PASS_BLIT = 1,
    MSIM_PASS_COMPUTE,
    MSIM_PASS_SIGNAL,          /* encodeSignalEvent:value:                 */
    MSIM_PASS_WAIT,            /* encodeWaitForEvent:value:                */
} msim_pass_kind_t;

/* A pass: one encoder's commands, or an event signal or wait. It is also
 * a node of the ordering graph (hazards.m). */
@interface MSimPass : NSObject
@property (nonatomic) msim_pass_kind_t kind;
@property (nonatomic) uint64_t commandBufferSerial;
@property (nonatomic) NSUInteger position;                /* in its cb     */
@property (nonatomic, strong) MSimList *commands;
@property (nonatomic, strong) MSimList *fenceWaits, *fenceUpdates;
@property (nonatomic, strong, nullable) MSimEvent *event;  /* SIGNAL, WAIT  */
@property (nonatomic) uint64_t eventValue;
/* Ordering graph (simulator lock): passes that happen before this one. */
@property (nonatomic, strong) MSimList *predecessors;
@property (nonatomic) BOOL completed;
- (NSString *)msim_description;
@end

@class MSimCommandBuffer;

/* What blit and compute encoders share: the pass they fill, the fences,
 * endEncoding and the checks that the encoder is still open. */
@interface MSimEncoder : NSObject <MTLCommandEncoder>
- (instancetype)initWithCommandBuffer:(MSimCommandBuffer *)cb pass:(MSimPass *)pass;
- (void)updateFence:(id<MTLFence>)fence;
- (void)waitForFence:(id<MTLFence>)fence;
@end

@interface MSimBlitEncoder : MSimEncoder <MTLBlitCommandEncoder>
@end

@interface MSimComputeEncoder : MSimEncoder <MTLComputeCommandEncoder>
@end

/* ---- hazards.m -------------------------------------------------------------------- */

/* Check the passes of a command buffer being committed against every
 * earlier access to the untracked buffers they touch, and record theirs.
 * Called with the simulator lock held, in commit order. */
void msim__hazards_commit_locked(MSimList *passes);

/* The passes of a command buffer whose status just became Completed (or
 * Error): from now on they are ordered before everything committed. */
void msim__hazards_complete_locked(MSimList *passes);

/* Within one blit encoder: does a new command depend on an earlier one? */
void msim__blit_hazard_check(MSimPass *pass, MSimCommand *command);

/* ---- queue.m ----------------------------------------------------------------------- */

@interface MSimCommandQueue : NSObject <MTLCommandQueue>
- (instancetype)initWithDevice:(MSimDevice *)device;
- (void)msim_releaseSlot;
@end

@interface MSimCommandBuffer : NSObject <MTLCommandBuffer>
- (instancetype)initWithQueue:(MSimCommandQueue *)queue;
@property (readonly) uint64_t serial;
@property (readonly, strong) MSimDevice *msimDevice;
/* Called by encoders. */
- (MSimPass *)msim_openPass:(msim_pass_kind_t)kind;
- (void)msim_endPass:(MSimPass *)pass;
- (void)msim_abandonPass:(MSimPass *)pass;
- (BOOL)msim_isCommitted;
@end

/* The ObjFW forwarding hook: unknown selectors raise as on Apple. */
void msim__install_runtime_hooks(void);

#pragma clang assume_nonnull end

#endif /* METALSIM_SIM_H */
