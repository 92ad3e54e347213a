/*
 * queue.m -- MTLCommandQueue and MTLCommandBuffer, and the two simulator
 * threads that stand in for the GPU: the GPU thread runs committed command
 * buffers one at a time in commit order (FIFO across every queue), reading
 * and writing memory at that moment; the completion thread then runs their
 * completion handlers, in the same order, and drops the resources they
 * held.
 *
 * Rules modelled (Apple's MTLCommandQueue and MTLCommandBuffer
 * documentation):
 * - At most 64 command buffers of a queue exist uncompleted
 *   (maxCommandBufferCount's default); commandBuffer blocks until one
 *   completes. A watchdog turns a 10 s block into a validation error and
 *   returns nil rather than hang.
 * - One encoder open at a time; a new encoder, an event command or commit
 *   while one is open is an error. addCompletedHandler: after commit, and
 *   a second commit, are errors.
 * - Completion handlers run on a simulator thread, never the committer's,
 *   after the status is Completed (or Error); waitUntilCompleted returns
 *   once the status is, possibly before the handlers ran.
 * - A queue takes at most 32 residency sets.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim.h"

NSErrorDomain const MTLCommandBufferErrorDomain = @"MTLCommandBufferErrorDomain";

#define MSIM_MAX_COMMAND_BUFFERS 64
#define MSIM_MAX_QUEUE_RESIDENCY_SETS 32

/* The GPU (simulator lock): committed command buffers waiting to run, run
 * ones waiting for their handlers, and how many are in between. */
static MSimList *gpu_fifo, *done_fifo;
static bool threads_started;
static uint64_t in_flight;

static void start_threads_locked(void);

/* ---- command queue --------------------------------------------------------------------------- */

@implementation MSimCommandQueue {
    MSimDevice *_device;
    MSimList *_sets;
    NSUInteger _uncompleted;          /* simulator lock */
}

- (instancetype)initWithDevice:(MSimDevice *)device
{
    self = [super init];
    _device = device;
    _sets = [[MSimList alloc] init];
    return self;
}

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (id<MTLCommandBuffer>)commandBuffer
{
    MSIM_ENTRY_NULLABLE();
    msim__lock();
    if (_uncompleted >= MSIM_MAX_COMMAND_BUFFERS) {
        MSIM_COUNT(command_buffers_blocked, 1);
        double deadline = msim__now() + MSIM_WATCHDOG_SECONDS;
        while (_uncompleted >= MSIM_MAX_COMMAND_BUFFERS && msim__wait_until(deadline)) {
        }
        if (_uncompleted >= MSIM_MAX_COMMAND_BUFFERS) {
            msim__unlock();
            msim__invalid("command-buffer-limit",
                          "commandBuffer blocked %d s: the queue has %d uncompleted command "
                          "buffers, its maximum",
                          MSIM_WATCHDOG_SECONDS, MSIM_MAX_COMMAND_BUFFERS);
            return nil;
        }
    }
    _uncompleted++;
    msim__unlock();
    return [[MSimCommandBuffer alloc] initWithQueue:self];
}

- (void)msim_releaseSlot
{
    msim__lock();
    _uncompleted--;
    msim__broadcast();
    msim__unlock();
}

static void residency_api_check(MSimDevice *device, SEL cmd, id target)
{
    if (device.config.macos_major >= 15)
        return;
    msim__invalid("macos15-api", "%s sent on simulated macOS %d: the residency-set API needs "
                  "macOS 15", sel_getName(cmd), device.config.macos_major);
    msim__raise(NSInvalidArgumentException,
                "-[MTLCommandQueue %s]: unrecognized selector sent to instance %p",
                sel_getName(cmd), (__bridge void *)target);
}

- (void)addResidencySet:(id<MTLResidencySet>)set
{
    MSIM_ENTRY();
    residency_api_check(_device, _cmd, self);
    msim__lock();
    if ([_sets containsIdentical:set]) {
        msim__unlock();
        return;
    }
    if (_sets.count >= MSIM_MAX_QUEUE_RESIDENCY_SETS) {
        msim__unlock();
        msim__invalid("residency-limit",
                      "addResidencySet: the queue already has %d residency sets, its maximum",
                      MSIM_MAX_QUEUE_RESIDENCY_SETS);
        return;
    }
    [_sets add:set];
    msim__unlock();
}

- (void)removeResidencySet:(id<MTLResidencySet>)set
{
    MSIM_ENTRY();
    residency_api_check(_device, _cmd, self);
    msim__lock();
    for (NSUInteger i = 0; i < _sets.count; i++) {
        if ([_sets at:i] == set) {
            [_sets removeAt:i];
            break;
        }
    }
    msim__unlock();
}

@end

/* ---- command buffer ---------------------------------------------------------------------------- */

@implementation MSimCommandBuffer {
    MSimCommandQueue *_queue;
    MSimDevice *_device;
    uint64_t _serial;
    MSimList *_passes;
    MSimPass *_openPass;
    MSimList *_handlers;
    BOOL _committed, _faulted, _slotReleased;
    MTLCommandBufferStatus _status;   /* simulator lock */
    NSError *_error;
}

- (instancetype)initWithQueue:(MSimCommandQueue *)queue
{
    self = [super init];
    _queue = queue;
    _device = (MSimDevice *)queue.device;
    _serial = MSIM_SERIAL();
    _passes = [[MSimList alloc] init];
    _handlers = [[MSimList alloc] init];
    _status = MTLCommandBufferStatusNotEnqueued;
    MSIM_COUNT(command_buffers_created, 1);
    return self;
}

- (void)dealloc
{
    /* Never committed: its place in the queue's count goes now. */
    if (!_slotReleased)
        [_queue msim_releaseSlot];
}

- (uint64_t)serial
{
    return _serial;
}

- (MSimDevice *)msimDevice
{
    return _device;
}

- (BOOL)msim_isCommitted
{
    return _committed;
}

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (id<MTLCommandQueue>)commandQueue
{
    MSIM_ENTRY();
    return _queue;
}

- (MTLCommandBufferStatus)status
{
    MSIM_ENTRY();
    msim__lock();
    MTLCommandBufferStatus s = _status;
    msim__unlock();
    return s;
}

- (NSError *)error
{
    MSIM_ENTRY();
    msim__lock();
    NSError *e = _error;
    msim__unlock();
    return e;
}

/* ---- encoding ---- */

- (BOOL)msim_canEncode:(SEL)cmd
{
    if (_committed) {
        msim__invalid("encode-after-commit", "-[MTLCommandBuffer %s] on command buffer #%llu "
                      "after commit", sel_getName(cmd), (unsigned long long)_serial);
        return NO;
    }
    if (_openPass)
        msim__invalid("encoder-open",
                      "-[MTLCommandBuffer %s] on command buffer #%llu while its %s is still "
                      "encoding (call endEncoding first)",
                      sel_getName(cmd), (unsigned long long)_serial,
                      _openPass.msim_description.UTF8String);
    return YES;
}

- (MSimPass *)msim_openPass:(msim_pass_kind_t)kind
{
    MSimPass *pass = [[MSimPass alloc] init];
    pass.kind = kind;
    pass.commandBufferSerial = _serial;
    pass.position = _passes.count;
    if (kind == MSIM_PASS_BLIT || kind == MSIM_PASS_COMPUTE)
        _openPass = pass;
    return pass;
}

- (void)msim_endPass:(MSimPass *)pass
{
    if (_openPass == pass)
        _openPass = nil;
    /* An encoder still open at commit (already reported) adds nothing
     * later: the GPU thread may be running the passes. */
    if (_committed)
        return;
    pass.position = _passes.count;
    [_passes add:pass];
}

- (void)msim_abandonPass:(MSimPass *)pass
{
    if (_openPass == pass)
        _openPass = nil;
}

- (id<MTLBlitCommandEncoder>)blitCommandEncoder
{
    MSIM_ENTRY_NULLABLE();
    if (![self msim_canEncode:_cmd])
        return nil;
    return [[MSimBlitEncoder alloc] initWithCommandBuffer:self
                                                     pass:[self msim_openPass:MSIM_PASS_BLIT]];
}

- (id<MTLComputeCommandEncoder>)computeCommandEncoder
{
    MSIM_ENTRY_NULLABLE();
    if (![self msim_canEncode:_cmd])
        return nil;
    return [[MSimComputeEncoder alloc]
        initWithCommandBuffer:self
                         pass:[self msim_openPass:MSIM_PASS_COMPUTE]];
}

- (void)msim_eventPass:(msim_pass_kind_t)kind event:(id<MTLEvent>)event value:(uint64_t)value
                   cmd:(SEL)cmd
{
    if (![self msim_canEncode:cmd])
        return;
    if (![(id)event isKindOfClass:[MSimEvent class]]) {
        msim__invalid("wrong-object", "-[MTLCommandBuffer %s]: not an event of the simulator",
                      sel_getName(cmd));
        return;
    }
    MSIM_COUNT(event_commands, 1);
    MSimPass *pass = [self msim_openPass:kind];
    pass.event = (MSimEvent *)event;
    pass.eventValue = value;
    [self msim_endPass:pass];
}

- (void)encodeSignalEvent:(id<MTLEvent>)event value:(uint64_t)value
{
    MSIM_ENTRY();
    [self msim_eventPass:MSIM_PASS_SIGNAL event:event value:value cmd:_cmd];
}

- (void)encodeWaitForEvent:(id<MTLEvent>)event value:(uint64_t)value
{
    MSIM_ENTRY();
    [self msim_eventPass:MSIM_PASS_WAIT event:event value:value cmd:_cmd];
}

- (void)useResidencySet:(id<MTLResidencySet>)set
{
    MSIM_ENTRY();
    (void)set;
    if (_device.config.macos_major < 15) {
        msim__invalid("macos15-api", "useResidencySet: sent on simulated macOS %d",
                      _device.config.macos_major);
        msim__raise(NSInvalidArgumentException,
                    "-[MTLCommandBuffer useResidencySet:]: unrecognized selector sent to "
                    "instance %p",
                    (__bridge void *)self);
    }
    [self msim_canEncode:_cmd];
}

- (void)addCompletedHandler:(MTLCommandBufferHandler)block
{
    MSIM_ENTRY();
    if (_committed) {
        msim__invalid("handler-after-commit",
                      "addCompletedHandler: on command buffer #%llu after commit",
                      (unsigned long long)_serial);
        return;
    }
    [_handlers add:[block copy]];
}

/* ---- submission ---- */

- (void)commit
{
    MSIM_ENTRY();
    if (_committed) {
        msim__invalid("double-commit", "commit of command buffer #%llu, which was already "
                      "committed", (unsigned long long)_serial);
        return;
    }
    if (_openPass)
        msim__invalid("encoder-open",
                      "commit of command buffer #%llu while its %s is still encoding",
                      (unsigned long long)_serial, _openPass.msim_description.UTF8String);
    _committed = YES;
    _faulted = msim__take_fault(MSIM_FAULT_COMMAND_BUFFER);
    MSIM_COUNT(command_buffers_committed, 1);
    msim__lock();
    _status = MTLCommandBufferStatusCommitted;
    msim__hazards_commit_locked(_passes);
    in_flight++;
    start_threads_locked();
    [gpu_fifo add:self];
    msim__broadcast();
    msim__unlock();
}

- (void)waitUntilCompleted
{
    MSIM_ENTRY();
    if (!_committed) {
        msim__invalid("wait-uncommitted", "waitUntilCompleted on command buffer #%llu, which "
                      "was never committed", (unsigned long long)_serial);
        return;
    }
    msim__lock();
    while (_status != MTLCommandBufferStatusCompleted && _status != MTLCommandBufferStatusError)
        msim__wait_until(msim__now() + 3600);
    msim__unlock();
}

/* ---- on the GPU thread ---- */

static NSError *gpu_error(MTLCommandBufferError code, const char *text)
{
    return [NSError msim_errorWithDomain:MTLCommandBufferErrorDomain
                                    code:(NSInteger)code
                             description:[NSString msim_stringWithFormat:"%s", text]];
}

/* Run one dispatch; NO (with msg set) when the kernel failed. */
static BOOL run_dispatch(MSimCommand *c, char *msg, size_t cap)
{
    const char *name = c.pipeline.function.name.UTF8String;
    msim_kernel_fn fn;
    void *ctx;
    if (!msim__kernel_find(name, &fn, &ctx)) {
        snprintf(msg, cap, "kernel %s has no implementation in the simulator", name);
        return NO;
    }
    size_t n = c.bindings.count;
    uint8_t *ptrs[31];
    uint64_t lengths[31], indices[31];
    int writable[31];
    for (size_t i = 0; i < n && i < 31; i++) {
        MSimBinding *b = [c.bindings at:i];
        ptrs[i] = b.buffer.bytes + b.offset;
        lengths[i] = b.buffer.msimLength - b.offset;
        writable[i] = !b.buffer.memoryReadOnly;
        indices[i] = b.index;
    }
    char error[512] = "";
    MTLSize g = c.grid, t = c.threadgroup;
    msim_kernel_args_t args = {
        .name = name,
        .grid = {g.width, g.height, g.depth},
        .threadgroup = {t.width, t.height, t.depth},
        .nbuffers = n,
        .buffers = ptrs,
        .lengths = lengths,
        .writable = writable,
        .indices = indices,
        .constants = c.constants,
        .constants_len = c.constantsLength,
        .error = error,
        .error_cap = sizeof error,
    };
    if (fn(ctx, &args) == 0)
        return YES;
    snprintf(msg, cap, "kernel %s failed: %s", name, error[0] ? error : "no message");
    return NO;
}

- (void)msim_execute
{
    uint64_t latency = _device.config.latency_us;
    if (latency)
        usleep((useconds_t)latency);
    NSError *error = nil;
    char msg[640];
    if (_faulted)
        error = gpu_error(MTLCommandBufferErrorInternal,
                          "simulated GPU fault (injected): the command buffer did not run");
    for (NSUInteger i = 0; !error && i < _passes.count; i++) {
        MSimPass *p = [_passes at:i];
        if (p.kind == MSIM_PASS_SIGNAL) {
            [p.event msim_signal:p.eventValue];
            continue;
        }
        if (p.kind == MSIM_PASS_WAIT) {
            if (![p.event msim_waitFor:p.eventValue seconds:MSIM_WATCHDOG_SECONDS]) {
                msim__invalid("event-wait-timeout",
                              "command buffer #%llu waited %d s for an event to reach %llu "
                              "(it is at %llu)",
                              (unsigned long long)_serial, MSIM_WATCHDOG_SECONDS,
                              (unsigned long long)p.eventValue,
                              (unsigned long long)[p.event msim_value]);
                error = gpu_error(MTLCommandBufferErrorTimeout, "timed out waiting for an event");
            }
            continue;
        }
        for (NSUInteger k = 0; !error && k < p.commands.count; k++) {
            MSimCommand *c = [p.commands at:k];
            switch (c.kind) {
            case MSIM_CMD_COPY:
                memmove(c.dst.bytes + c.dstOffset, c.src.bytes + c.srcOffset, c.size);
                break;
            case MSIM_CMD_FILL:
                memset(c.dst.bytes + c.dstOffset, c.value, c.size);
                break;
            case MSIM_CMD_DISPATCH:
                if (!run_dispatch(c, msg, sizeof msg))
                    error = gpu_error(MTLCommandBufferErrorPageFault, msg);
                break;
            }
        }
    }
    msim__lock();
    _error = error;
    _status = error ? MTLCommandBufferStatusError : MTLCommandBufferStatusCompleted;
    msim__hazards_complete_locked(_passes);
    [done_fifo add:self];
    msim__broadcast();
    msim__unlock();
}

/* ---- on the completion thread ---- */

- (void)msim_finish
{
    for (NSUInteger i = 0; i < _handlers.count; i++) {
        @autoreleasepool {
            MTLCommandBufferHandler h = [_handlers at:i];
            h(self);
        }
    }
    [_handlers removeAll];
    MSIM_COUNT(command_buffers_completed, 1);
    if (_error)
        MSIM_COUNT(command_buffers_failed, 1);
    /* The command buffer's hold on its resources ends here. The lists are
     * unhooked under the lock and released after it: a buffer whose last
     * reference they held dies then, and its deallocator (code of the
     * buffer's creator) must not run under the simulator's lock, which
     * Metal's own callers never hold. Fences and events point back at
     * the passes that updated or signalled them: the pass's side of those
     * links goes too, or each pair is a retain cycle that outlives the
     * command buffer. */
    MSimList *dying = [[MSimList alloc] init];
    msim__lock();
    MSimList *passes = _passes;
    _passes = [[MSimList alloc] init];
    for (NSUInteger i = 0; i < passes.count; i++) {
        MSimPass *p = [passes at:i];
        [dying add:p.predecessors];
        [dying add:p.commands];
        [dying add:p.fenceWaits];
        [dying add:p.fenceUpdates];
        p.predecessors = [[MSimList alloc] init];
        p.commands = [[MSimList alloc] init];
        p.fenceWaits = [[MSimList alloc] init];
        p.fenceUpdates = [[MSimList alloc] init];
        p.event = nil;
    }
    _slotReleased = YES;
    msim__unlock();
    dying = nil;
    passes = nil;
    [_queue msim_releaseSlot];
    msim__lock();
    in_flight--;
    msim__broadcast();
    msim__unlock();
}

@end

/* ---- the threads ----------------------------------------------------------------------------- */

/* The next command buffer of a FIFO, waiting for one (simulator lock
 * taken inside). */
static MSimCommandBuffer *take_next(MSimList *__strong *fifo)
{
    msim__lock();
    while ((*fifo).count == 0)
        msim__wait_until(msim__now() + 3600);
    MSimCommandBuffer *cb = [*fifo at:0];
    [*fifo removeAt:0];
    msim__unlock();
    return cb;
}

static void *gpu_main(void *arg)
{
    (void)arg;
    for (;;) {
        @autoreleasepool {
            [take_next(&gpu_fifo) msim_execute];
        }
    }
    return NULL;
}

static void *completion_main(void *arg)
{
    (void)arg;
    for (;;) {
        @autoreleasepool {
            [take_next(&done_fifo) msim_finish];
        }
    }
    return NULL;
}

static void start_threads_locked(void)
{
    if (threads_started)
        return;
    if (!gpu_fifo) {
        gpu_fifo = [[MSimList alloc] init];
        done_fifo = [[MSimList alloc] init];
    }
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, gpu_main, NULL) != 0 ||
        pthread_create(&t, &attr, completion_main, NULL) != 0) {
        fprintf(stderr, "metalsim: cannot start the simulated GPU threads\n");
        abort();
    }
    pthread_attr_destroy(&attr);
    threads_started = true;
}

/* In a forked child the threads are gone; what was in flight in the
 * parent stays with the parent (the lists are abandoned, not released). */
void msim__gpu_atfork_child(void)
{
    if (gpu_fifo) {
        (void)(__bridge_retained void *)gpu_fifo;
        (void)(__bridge_retained void *)done_fifo;
        gpu_fifo = [[MSimList alloc] init];
        done_fifo = [[MSimList alloc] init];
    }
    threads_started = false;
    in_flight = 0;
}

void msim_drain(void)
{
    msim__lock();
    while (in_flight > 0)
        msim__wait_until(msim__now() + 3600);
    msim__unlock();
}
