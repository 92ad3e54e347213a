/*
 * rules.m -- the simulated Metal's own rules, each broken on purpose from
 * Objective-C (not through mlxbuf) next to a twin that keeps it, so a rule
 * that never fires or always fires fails.
 *
 *   rules CASE      run one case; exit 0 when every check held
 *   rules --list    the case names
 *
 * Driven by tests/test_metalsim_rules.py, one process per case, so knobs
 * and counters start fresh. Built with the simulator's own flags
 * (metalsim/build.py) and linked against its objects.
 */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "metalsim.h"

/* ---- checking ------------------------------------------------------------------ */

static int failures;
static uint64_t mark;      /* validation messages before this are accounted for */

#define CHECK(cond)                                                         \
    do {                                                                    \
        if (!(cond)) {                                                      \
            printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);          \
            failures++;                                                     \
        }                                                                   \
    } while (0)

static void print_new(void)
{
    char buf[2048];
    for (uint64_t i = mark; i < msim_validation_count(); i++)
        if (msim_validation_message(i, buf, sizeof buf))
            printf("  validation: %s\n", buf);
}

/* Did a message of rule `rule` arrive since the mark? Moves the mark. */
static bool took(const char *rule)
{
    msim_drain();
    char buf[2048], want[128];
    snprintf(want, sizeof want, "[%s]", rule);
    bool found = false;
    for (uint64_t i = mark; i < msim_validation_count(); i++)
        if (msim_validation_message(i, buf, sizeof buf) && strncmp(buf, want, strlen(want)) == 0)
            found = true;
    if (!found) {
        printf("expected a [%s] validation error; recorded since the last check:\n", rule);
        print_new();
    }
    mark = msim_validation_count();
    return found;
}

/* Nothing new since the mark. */
static bool clean(void)
{
    msim_drain();
    bool ok = msim_validation_count() == mark;
    if (!ok) {
        printf("expected no validation error; recorded:\n");
        print_new();
    }
    mark = msim_validation_count();
    return ok;
}

#define EXPECT_RULE(rule) CHECK(took(rule))
#define EXPECT_CLEAN() CHECK(clean())

static msim_stats_t stats(void)
{
    msim_stats_t s;
    msim_get_stats(&s);
    return s;
}

/* ---- helpers --------------------------------------------------------------------- */

static id<MTLDevice> device(void)
{
    return MTLCreateSystemDefaultDevice();
}

/* +1, like the newBuffer... it wraps, so `b = nil` frees at once. */
__attribute__((ns_returns_retained)) static id<MTLBuffer> buffer(id<MTLDevice> dev, NSUInteger n,
                                                                 MTLResourceOptions options)
{
    return [dev newBufferWithLength:n options:options];
}

static void run(id<MTLCommandBuffer> cb)
{
    [cb commit];
    [cb waitUntilCompleted];
    msim_drain();
}

static id<MTLComputePipelineState> pipeline(id<MTLDevice> dev, const char *source, const char *name)
{
    NSError *err = nil;
    id<MTLLibrary> lib = [dev newLibraryWithSource:[NSString stringWithCString:source
                                                                      encoding:NSUTF8StringEncoding]
                                           options:nil
                                             error:&err];
    if (!lib) {
        printf("library failed: %s\n", err.localizedDescription.UTF8String);
        return nil;
    }
    id<MTLFunction> fn = [lib newFunctionWithName:[NSString stringWithCString:name
                                                                     encoding:NSUTF8StringEncoding]];
    return fn ? [dev newComputePipelineStateWithFunction:fn error:&err] : nil;
}

static int kernel_noop(void *ctx, const msim_kernel_args_t *a)
{
    (void)ctx;
    (void)a;
    return 0;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* A one-shot gate between threads. */
typedef struct gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool open;
} gate_t;
#define GATE_INIT {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false}

static void gate_open(gate_t *g)
{
    pthread_mutex_lock(&g->lock);
    g->open = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static void gate_wait(gate_t *g)
{
    pthread_mutex_lock(&g->lock);
    while (!g->open)
        pthread_cond_wait(&g->cond, &g->lock);
    pthread_mutex_unlock(&g->lock);
}

static pthread_t spawn(void *(*fn)(void *), void *arg)
{
    pthread_t t;
    pthread_create(&t, NULL, fn, arg);
    return t;
}

#define CASE(name) static void case_##name(void)

/* ---- device ------------------------------------------------------------------------ */

CASE(device_default_and_all_devices)
{
    id<MTLDevice> a = device(), b = device();
    CHECK(a && a == b);
    CHECK(strstr(a.name.UTF8String, "simulated") != NULL);
    CHECK(a.hasUnifiedMemory);
    CHECK([a supportsFamily:MTLGPUFamilyApple7] && ![a supportsFamily:MTLGPUFamilyApple8]);
    CHECK(a.maxBufferLength > 0 && a.recommendedMaxWorkingSetSize > a.maxBufferLength);
    msim_set_default_device_nil(1);
    CHECK(device() == nil);
    NSArray<id<MTLDevice>> *all = MTLCopyAllDevices();
    CHECK(all.count == 1 && [all objectAtIndex:0] == a);
    msim_set_default_device_nil(0);
    CHECK(device() == a);
    EXPECT_CLEAN();
}

CASE(device_configure_makes_a_new_device)
{
    id<MTLDevice> old = device();
    CHECK(msim_configure(15, 0, 1 << 20, 1 << 22) == 0);
    id<MTLDevice> fresh = device();
    CHECK(fresh != old && fresh.registryID != old.registryID);
    CHECK(fresh.maxBufferLength == 1 << 20 && fresh.recommendedMaxWorkingSetSize == 1 << 22);
    CHECK(buffer(fresh, (1 << 20) + 1, 0) == nil);
    CHECK(buffer(old, (1 << 20) + 1, 0) != nil);
    CHECK(msim_configure(10, 0, 0, 0) == -1);
    EXPECT_CLEAN();
}

CASE(macos14_has_no_residency_sets)
{
    MTLResidencySetDescriptor *desc = [[MTLResidencySetDescriptor alloc] init];
    CHECK(msim_configure(14, 0, 0, 0) == 0);
    id<MTLDevice> dev = device();
    NSProcessInfo *info = [NSProcessInfo processInfo];
    NSOperatingSystemVersion v14 = {14, 0, 0}, v15 = {15, 0, 0};
    CHECK([info isOperatingSystemAtLeastVersion:v14]);
    CHECK(![info isOperatingSystemAtLeastVersion:v15]);
    CHECK(![dev respondsToSelector:@selector(newResidencySetWithDescriptor:error:)]);
    EXPECT_CLEAN();
    CHECK([MTLResidencySetDescriptor alloc] == nil);
    EXPECT_RULE("macos15-api");
    BOOL raised = NO;
    @try {
        NSError *err = nil;
        (void)[dev newResidencySetWithDescriptor:desc error:&err];
    } @catch (NSException *e) {
        raised = [e.name isEqualToString:NSInvalidArgumentException];
    }
    CHECK(raised);
    EXPECT_RULE("macos15-api");
    CHECK(msim_configure(15, 0, 0, 0) == 0);
    CHECK([device() respondsToSelector:@selector(newResidencySetWithDescriptor:error:)]);
}

CASE(unknown_selector_raises)
{
    id<MTLBuffer> b = buffer(device(), 64, 0);
    BOOL raised = NO;
    @try {
        (void)[(id<MTLHeap>)b usedSize];
    } @catch (NSException *e) {
        raised = [e.name isEqualToString:NSInvalidArgumentException] &&
                 strstr(e.reason.UTF8String, "unrecognized selector") != NULL;
    }
    CHECK(raised);
}

/* ---- buffers ------------------------------------------------------------------------- */

CASE(buffer_zero_filled_pages)
{
    id<MTLDevice> dev = device();
    NSUInteger before = dev.currentAllocatedSize;
    id<MTLBuffer> b = buffer(dev, 100, 0);
    CHECK(b.length == 100 && b.allocatedSize == MSIM_PAGE_SIZE);
    /* contents returns an inner pointer: ARC keeps b alive (retain and
     * autorelease) until the pool drains. */
    @autoreleasepool {
        CHECK((uintptr_t)b.contents % MSIM_PAGE_SIZE == 0);
        const uint8_t *p = b.contents;
        bool zero = true;
        for (int i = 0; i < MSIM_PAGE_SIZE; i++)
            zero = zero && p[i] == 0;
        CHECK(zero);
    }
    CHECK(dev.currentAllocatedSize == before + MSIM_PAGE_SIZE);
    CHECK(b.hazardTrackingMode == MTLHazardTrackingModeTracked && b.heap == nil);
    CHECK(buffer(dev, 0, 0) == nil);
    CHECK(buffer(dev, dev.maxBufferLength + 1, 0) == nil);
    id<MTLBuffer> priv = buffer(dev, 64, MTLResourceStorageModePrivate);
    CHECK(priv && priv.contents == NULL && priv.storageMode == MTLStorageModePrivate);
    id<MTLBuffer> untracked = buffer(dev, 64, MTLResourceHazardTrackingModeUntracked);
    CHECK(untracked.hazardTrackingMode == MTLHazardTrackingModeUntracked);
    CHECK(untracked.resourceOptions == MTLResourceHazardTrackingModeUntracked);
    b = nil;
    CHECK(dev.currentAllocatedSize == before + 2 * MSIM_PAGE_SIZE);
    EXPECT_CLEAN();
}

CASE(buffer_nocopy_needs_whole_pages)
{
    id<MTLDevice> dev = device();
    long page = sysconf(_SC_PAGESIZE);
    uint8_t *mem = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK([dev newBufferWithBytesNoCopy:mem + 8 length:page options:0 deallocator:nil] == nil);
    EXPECT_RULE("nocopy-alignment");
    CHECK([dev newBufferWithBytesNoCopy:mem length:100 options:0 deallocator:nil] == nil);
    EXPECT_RULE("nocopy-alignment");
    CHECK([dev newBufferWithBytesNoCopy:mem length:page options:MTLResourceStorageModePrivate
                            deallocator:nil] == nil);
    EXPECT_RULE("nocopy-storage");
    id<MTLBuffer> ok = [dev newBufferWithBytesNoCopy:mem length:2 * page options:0 deallocator:nil];
    CHECK(ok && ok.contents == mem && ok.length == (NSUInteger)(2 * page));
    CHECK(ok.allocatedSize % MSIM_PAGE_SIZE == 0);
    EXPECT_CLEAN();
    ok = nil;
    munmap(mem, 4 * page);
}

static atomic_int dealloc_runs;
static pthread_t dealloc_thread;

static void *drop_set(void *arg)
{
    @autoreleasepool {
        id<MTLResidencySet> set = (__bridge_transfer id<MTLResidencySet>)arg;
        [set removeAllAllocations];
        [set commit];
        set = nil;
    }
    return NULL;
}

CASE(buffer_deallocator_once_on_the_last_thread)
{
    id<MTLDevice> dev = device();
    long page = sysconf(_SC_PAGESIZE);
    void *mem = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    id<MTLBuffer> b = [dev newBufferWithBytesNoCopy:mem length:page options:0
                                         deallocator:^(void *p, NSUInteger n) {
                                             atomic_fetch_add(&dealloc_runs, 1);
                                             dealloc_thread = pthread_self();
                                             munmap(p, n);
                                         }];
    NSError *err = nil;
    id<MTLResidencySet> set =
        [dev newResidencySetWithDescriptor:[[MTLResidencySetDescriptor alloc] init] error:&err];
    [set addAllocation:b];
    [set commit];
    b = nil;
    CHECK(atomic_load(&dealloc_runs) == 0);     /* the set still holds it */
    CHECK(stats().residency_held_bytes == MSIM_PAGE_SIZE);
    pthread_t t = spawn(drop_set, (__bridge_retained void *)set);
    set = nil;
    pthread_join(t, NULL);
    CHECK(atomic_load(&dealloc_runs) == 1);
    CHECK(pthread_equal(dealloc_thread, t));
    CHECK(stats().residency_held_bytes == 0);
    EXPECT_CLEAN();
}

CASE(buffer_nocopy_memory_gone_before_release)
{
    id<MTLDevice> dev = device();
    long page = sysconf(_SC_PAGESIZE);
    void *mem = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t before = stats().nocopy_unmapped_before_release;
    @autoreleasepool {
        id<MTLBuffer> b = [dev newBufferWithBytesNoCopy:mem length:page options:0 deallocator:nil];
        CHECK(b.contents == mem);
        munmap(mem, page);   /* while Metal still holds b */
        b = nil;
    }
    CHECK(stats().nocopy_unmapped_before_release == before + 1);
    void *kept = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    @autoreleasepool {
        id<MTLBuffer> b = [dev newBufferWithBytesNoCopy:kept length:page options:0 deallocator:nil];
        CHECK(b.contents == kept);
        b = nil;
    }
    CHECK(stats().nocopy_unmapped_before_release == before + 1);
    munmap(kept, page);
}

/* ---- heaps ------------------------------------------------------------------------- */

CASE(heap_sub_allocation)
{
    id<MTLDevice> dev = device();
    MTLHeapDescriptor *desc = [[MTLHeapDescriptor alloc] init];
    desc.size = 1 << 20;
    id<MTLHeap> heap = [dev newHeapWithDescriptor:desc];
    CHECK(heap && heap.size == 1 << 20 && heap.usedSize == 0);
    CHECK(heap.hazardTrackingMode == MTLHazardTrackingModeUntracked);
    id<MTLBuffer> b = [heap newBufferWithLength:100 options:0];
    CHECK(b && b.heap == heap && b.hazardTrackingMode == MTLHazardTrackingModeUntracked);
    CHECK(heap.usedSize == b.allocatedSize && b.allocatedSize >= 100);
    @autoreleasepool {
        CHECK(((const uint8_t *)b.contents)[0] == 0xCD);   /* not promised to be zero */
    }
    CHECK([heap newBufferWithLength:100 options:MTLResourceStorageModePrivate] == nil);
    EXPECT_RULE("heap-storage");
    CHECK([heap newBufferWithLength:(1 << 20) options:0] == nil);   /* no room left */
    CHECK([heap maxAvailableSizeWithAlignment:256] == (1 << 20) - b.allocatedSize);
    b = nil;
    CHECK(heap.usedSize == 0 && [heap maxAvailableSizeWithAlignment:256] == 1 << 20);
    EXPECT_CLEAN();
}

/* ---- residency sets -------------------------------------------------------------------- */

static id<MTLResidencySet> new_set(id<MTLDevice> dev)
{
    NSError *err = nil;
    MTLResidencySetDescriptor *desc = [[MTLResidencySetDescriptor alloc] init];
    desc.label = @"rules";
    return [dev newResidencySetWithDescriptor:desc error:&err];
}

CASE(residency_set_stages_until_commit)
{
    id<MTLDevice> dev = device();
    id<MTLResidencySet> set = new_set(dev);
    id<MTLBuffer> a = buffer(dev, 100, 0), b = buffer(dev, 20000, 0);
    msim_stats_t s0 = stats();
    [set addAllocation:a];
    [set addAllocation:a];                      /* duplicate: ignored */
    [set addAllocation:b];
    CHECK(set.allocationCount == 0 && set.allocatedSize == 0);
    CHECK([set containsAllocation:a]);          /* sees staged adds */
    [set commit];
    CHECK(set.allocationCount == 2 && set.allocatedSize == 3 * MSIM_PAGE_SIZE);
    CHECK(set.allAllocations.count == 2);
    [set removeAllocation:a];                   /* one remove ends the membership */
    CHECK(set.allocationCount == 2 && ![set containsAllocation:a]);
    [set commit];
    CHECK(set.allocationCount == 1 && set.allocatedSize == 2 * MSIM_PAGE_SIZE);
    CHECK([set.allAllocations objectAtIndex:0] == (id)b);
    msim_stats_t s1 = stats();
    CHECK(s1.residency_adds - s0.residency_adds == 3);
    CHECK(s1.residency_removes - s0.residency_removes == 1);
    CHECK(s1.residency_commits - s0.residency_commits == 2);
    CHECK(s1.residency_members - s0.residency_members == 1);
    EXPECT_CLEAN();
}

CASE(residency_heap_buffer_makes_the_heap_resident)
{
    id<MTLDevice> dev = device();
    MTLHeapDescriptor *desc = [[MTLHeapDescriptor alloc] init];
    desc.size = 1 << 20;
    id<MTLHeap> heap = [dev newHeapWithDescriptor:desc];
    id<MTLBuffer> a = [heap newBufferWithLength:100 options:0];
    id<MTLBuffer> b = [heap newBufferWithLength:100 options:0];
    id<MTLResidencySet> set = new_set(dev);
    [set addAllocation:a];
    [set addAllocation:b];
    [set commit];
    CHECK(set.allocationCount == 2 && set.allocatedSize == 1 << 20);
    EXPECT_CLEAN();
}

CASE(residency_set_holds_members_until_removal_commits)
{
    id<MTLDevice> dev = device();
    id<MTLResidencySet> set = new_set(dev);
    uint64_t live = stats().live_buffers;
    @autoreleasepool {
        id<MTLBuffer> b = buffer(dev, 100, 0);
        [set addAllocation:b];
        [set commit];
        [set removeAllocation:b];               /* staged only */
        b = nil;                                /* the owner lets go */
    }
    CHECK(stats().live_buffers == live + 1);
    CHECK(stats().residency_held_bytes == MSIM_PAGE_SIZE);
    [set commit];
    CHECK(stats().live_buffers == live);
    CHECK(stats().residency_held_bytes == 0);
    /* A staged add holds too, and a staged add then remove drops at once. */
    @autoreleasepool {
        id<MTLBuffer> c = buffer(dev, 100, 0);
        [set addAllocation:c];
        c = nil;
    }
    CHECK(stats().live_buffers == live + 1);
    [set removeAllAllocations];
    CHECK(stats().live_buffers == live);
    EXPECT_CLEAN();
}

/* An allocation whose class check (made inside addAllocation:) blocks,
 * so a second thread finds the set busy. */
@interface BlockingAllocation : NSObject <MTLAllocation>
@end

static gate_t inside_gate = GATE_INIT, leave_gate = GATE_INIT;

@implementation BlockingAllocation
- (NSUInteger)allocatedSize
{
    return 0;
}
- (BOOL)isKindOfClass:(Class)cls
{
    gate_open(&inside_gate);
    gate_wait(&leave_gate);
    return [super isKindOfClass:cls];
}
@end

static void *add_blocking(void *arg)
{
    @autoreleasepool {
        id<MTLResidencySet> set = (__bridge id<MTLResidencySet>)arg;
        [set addAllocation:[[BlockingAllocation alloc] init]];
    }
    return NULL;
}

static void *count_members(void *arg)
{
    @autoreleasepool {
        (void)((__bridge id<MTLResidencySet>)arg).allocationCount;
    }
    return NULL;
}

CASE(residency_set_is_not_thread_safe)
{
    id<MTLResidencySet> set = new_set(device());
    /* One thread after another: fine. */
    pthread_join(spawn(count_members, (__bridge void *)set), NULL);
    pthread_join(spawn(count_members, (__bridge void *)set), NULL);
    EXPECT_CLEAN();
    /* Two at once: not. */
    pthread_t a = spawn(add_blocking, (__bridge void *)set);
    gate_wait(&inside_gate);
    pthread_join(spawn(count_members, (__bridge void *)set), NULL);
    gate_open(&leave_gate);
    pthread_join(a, NULL);
    EXPECT_RULE("residency-threads");
}

CASE(residency_sets_per_queue)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLResidencySet> sets[33];
    for (int i = 0; i < 33; i++)
        sets[i] = new_set(dev);
    for (int i = 0; i < 32; i++)
        [q addResidencySet:sets[i]];
    [q addResidencySet:sets[0]];               /* again: no second place */
    EXPECT_CLEAN();
    [q addResidencySet:sets[32]];
    EXPECT_RULE("residency-limit");
    [q removeResidencySet:sets[0]];
    [q addResidencySet:sets[32]];
    EXPECT_CLEAN();
}

/* ---- queues and command buffers ---------------------------------------------------------- */

static int order_log[16], order_n;

static int kernel_log(void *ctx, const msim_kernel_args_t *a)
{
    (void)ctx;
    uint32_t v;
    memcpy(&v, a->constants, 4);
    order_log[order_n++] = (int)v;
    return 0;
}

static const char kLogSource[] = "kernel void log_value(constant uint &v [[buffer(0)]]) {}";

CASE(queue_runs_fifo_across_queues)
{
    CHECK(msim_configure(15, 2000, 0, 0) == 0);
    id<MTLDevice> dev = device();
    msim_register_kernel("log_value", kernel_log, NULL);
    id<MTLComputePipelineState> ps = pipeline(dev, kLogSource, "log_value");
    id<MTLCommandQueue> queues[2] = {[dev newCommandQueue], [dev newCommandQueue]};
    id<MTLCommandBuffer> cbs[6];
    for (uint32_t i = 0; i < 6; i++) {
        cbs[i] = [queues[i % 2] commandBuffer];
        id<MTLComputeCommandEncoder> ce = [cbs[i] computeCommandEncoder];
        [ce setComputePipelineState:ps];
        [ce setBytes:&i length:4 atIndex:0];
        [ce dispatchThreads:(MTLSize){1, 1, 1} threadsPerThreadgroup:(MTLSize){1, 1, 1}];
        [ce endEncoding];
        [cbs[i] commit];
    }
    CHECK(cbs[0].status == MTLCommandBufferStatusCommitted || cbs[0].status == MTLCommandBufferStatusCompleted);
    [cbs[5] waitUntilCompleted];
    msim_drain();
    CHECK(order_n == 6);
    for (int i = 0; i < 6; i++)
        CHECK(order_log[i] == i);
    EXPECT_CLEAN();
}

static atomic_int got_buffer;

static void *take_one(void *arg)
{
    @autoreleasepool {
        id<MTLCommandBuffer> cb = [(__bridge id<MTLCommandQueue>)arg commandBuffer];
        atomic_store(&got_buffer, cb != nil ? 1 : -1);
    }
    return NULL;
}

CASE(queue_blocks_at_64_uncompleted)
{
    id<MTLCommandQueue> q = [device() newCommandQueue];
    id<MTLCommandBuffer> held[64];
    for (int i = 0; i < 64; i++)
        held[i] = [q commandBuffer];
    uint64_t blocked = stats().command_buffers_blocked;
    pthread_t t = spawn(take_one, (__bridge void *)q);
    while (stats().command_buffers_blocked == blocked)
        sleep_ms(1);
    CHECK(atomic_load(&got_buffer) == 0);      /* blocked until a slot frees */
    run(held[0]);                              /* completing one frees it */
    pthread_join(t, NULL);
    CHECK(atomic_load(&got_buffer) == 1);
    EXPECT_CLEAN();
}

CASE(queue_watchdog_at_64_uncompleted)
{
    id<MTLCommandQueue> q = [device() newCommandQueue];
    id<MTLCommandBuffer> held[64];
    @autoreleasepool {       /* commandBuffer's result is autoreleased */
        for (int i = 0; i < 64; i++)
            held[i] = [q commandBuffer];
    }
    CHECK([q commandBuffer] == nil);            /* after MSIM_WATCHDOG_SECONDS */
    EXPECT_RULE("command-buffer-limit");
    held[0] = nil;                              /* an uncommitted one dropped */
    CHECK([q commandBuffer] != nil);
}

CASE(command_buffer_misuse)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> b = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    id<MTLBlitCommandEncoder> first = [cb blitCommandEncoder];
    id<MTLBlitCommandEncoder> second = [cb blitCommandEncoder];
    EXPECT_RULE("encoder-open");
    [first endEncoding];
    [second endEncoding];
    EXPECT_CLEAN();
    id<MTLBlitCommandEncoder> open = [cb blitCommandEncoder];
    [open fillBuffer:b range:(NSRange){0, 64} value:1];
    [cb commit];
    EXPECT_RULE("encoder-open");
    [open endEncoding];
    [cb addCompletedHandler:^(id<MTLCommandBuffer> done) {
        (void)done;
    }];
    EXPECT_RULE("handler-after-commit");
    [cb commit];
    EXPECT_RULE("double-commit");
    CHECK([cb blitCommandEncoder] == nil);
    EXPECT_RULE("encode-after-commit");
    [[q commandBuffer] waitUntilCompleted];
    EXPECT_RULE("wait-uncommitted");
    run([q commandBuffer]);
    EXPECT_CLEAN();
}

static gate_t handler_gate = GATE_INIT;
static atomic_int handler_state;
static pthread_t handler_thread;

CASE(completion_handlers_run_on_a_simulator_thread_after_completion)
{
    id<MTLCommandQueue> q = [device() newCommandQueue];
    id<MTLCommandBuffer> cb = [q commandBuffer];
    [cb addCompletedHandler:^(id<MTLCommandBuffer> done) {
        handler_thread = pthread_self();
        atomic_store(&handler_state, done.status == MTLCommandBufferStatusCompleted ? 1 : -1);
        gate_wait(&handler_gate);
        atomic_store(&handler_state, 2);
    }];
    [cb commit];
    [cb waitUntilCompleted];
    /* waitUntilCompleted returned while the handler still runs. */
    CHECK(cb.status == MTLCommandBufferStatusCompleted);
    while (atomic_load(&handler_state) == 0)
        sleep_ms(1);
    CHECK(atomic_load(&handler_state) == 1);
    CHECK(!pthread_equal(handler_thread, pthread_self()));
    gate_open(&handler_gate);
    msim_drain();
    CHECK(atomic_load(&handler_state) == 2);
    EXPECT_CLEAN();
}

/* ---- encoders ------------------------------------------------------------------------------ */

CASE(encoder_must_end)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> b = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    @autoreleasepool {
        id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
        [blit fillBuffer:b range:(NSRange){0, 64} value:1];
        blit = nil;
    }
    EXPECT_RULE("encoder-not-ended");
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    [blit endEncoding];
    [blit fillBuffer:b range:(NSRange){0, 64} value:1];
    EXPECT_RULE("encoder-ended");
    [blit endEncoding];
    EXPECT_RULE("encoder-ended");
    run(cb);
    CHECK(((const uint8_t *)b.contents)[0] == 0);   /* nothing ran */
    EXPECT_CLEAN();
}

CASE(blit_ranges_and_alignment)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> a = buffer(dev, 64, 0), b = buffer(dev, 64, 0), c = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    [blit copyFromBuffer:a sourceOffset:0 toBuffer:b destinationOffset:32 size:64];
    EXPECT_RULE("blit-range");
    [blit copyFromBuffer:a sourceOffset:2 toBuffer:b destinationOffset:0 size:8];
    EXPECT_RULE("blit-alignment");
    [blit fillBuffer:c range:(NSRange){4, 3} value:1];
    EXPECT_RULE("blit-alignment");
    [blit fillBuffer:c range:(NSRange){8, 0} value:1];
    EXPECT_RULE("blit-range");
    [blit copyFromBuffer:a sourceOffset:32 toBuffer:b destinationOffset:32 size:32];
    [blit fillBuffer:c range:(NSRange){32, 32} value:1];
    EXPECT_CLEAN();
    [blit endEncoding];
    blit = [cb blitCommandEncoder];
    [blit copyFromBuffer:a sourceOffset:0 toBuffer:a destinationOffset:8 size:16];
    EXPECT_RULE("blit-overlap");
    [blit endEncoding];
    blit = [cb blitCommandEncoder];
    [blit copyFromBuffer:a sourceOffset:0 toBuffer:b destinationOffset:0 size:64];
    [blit fillBuffer:a range:(NSRange){0, 64} value:3];   /* overwrites what was read */
    EXPECT_RULE("blit-hazard");
    [blit endEncoding];
    run(cb);
    EXPECT_CLEAN();
}

CASE(blit_commands_of_one_encoder_are_not_ordered)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> a = buffer(dev, 64, 0), b = buffer(dev, 64, 0), c = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    [blit copyFromBuffer:a sourceOffset:0 toBuffer:b destinationOffset:0 size:32];
    [blit copyFromBuffer:a sourceOffset:0 toBuffer:c destinationOffset:0 size:32];
    [blit copyFromBuffer:b sourceOffset:32 toBuffer:c destinationOffset:32 size:32];
    EXPECT_CLEAN();                            /* independent bytes */
    [blit copyFromBuffer:b sourceOffset:0 toBuffer:c destinationOffset:32 size:32];
    EXPECT_RULE("blit-hazard");                /* reads what command 1 wrote */
    [blit endEncoding];
    blit = [cb blitCommandEncoder];            /* a new encoder is ordered */
    [blit copyFromBuffer:c sourceOffset:0 toBuffer:b destinationOffset:0 size:32];
    [blit endEncoding];
    run(cb);
    EXPECT_CLEAN();
}

static const char kArgsSource[] =
    "#include <metal_stdlib>\n"
    "// kernel void commented_out(device float *x [[buffer(0)]]) {}\n"
    "kernel void args(device float *f [[buffer(0)]],\n"
    "                 device const float4 *v [[buffer(1)]],\n"
    "                 device uchar *c [[buffer(2)]],\n"
    "                 constant uint &k [[buffer(3)]],\n"
    "                 uint i [[thread_position_in_grid]]) { }\n";

CASE(compute_binding_rules)
{
    id<MTLDevice> dev = device();
    msim_register_kernel("args", kernel_noop, NULL);
    id<MTLComputePipelineState> ps = pipeline(dev, kArgsSource, "args");
    CHECK(ps.maxTotalThreadsPerThreadgroup == 1024 && ps.threadExecutionWidth == 32);
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> b = buffer(dev, 1024, 0);
    uint32_t k = 1;
    uint8_t big[4097] = {0};
    MTLSize one = {1, 1, 1};
    id<MTLCommandBuffer> cb = [q commandBuffer];
    id<MTLComputeCommandEncoder> ce = [cb computeCommandEncoder];
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_RULE("no-pipeline");
    [ce setComputePipelineState:ps];
    [ce setBuffer:b offset:0 atIndex:0];
    [ce setBuffer:b offset:0 atIndex:1];
    [ce setBuffer:b offset:4 atIndex:2];
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_RULE("unbound-argument");           /* [[buffer(3)]] */
    [ce setBytes:big length:sizeof big atIndex:3];
    EXPECT_RULE("set-bytes-size");
    [ce setBytes:&k length:4 atIndex:3];
    [ce setBuffer:b offset:0 atIndex:31];
    EXPECT_RULE("buffer-index");
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_CLEAN();
    [ce setBuffer:b offset:2 atIndex:0];       /* float: 4-byte aligned */
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_RULE("buffer-offset-alignment");
    [ce setBuffer:b offset:4 atIndex:0];
    [ce setBuffer:b offset:8 atIndex:1];       /* float4: 16-byte aligned */
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_RULE("buffer-offset-alignment");
    [ce setBuffer:b offset:16 atIndex:1];
    [ce setBuffer:b offset:1 atIndex:2];       /* uchar: still 4 */
    [ce dispatchThreads:one threadsPerThreadgroup:one];
    EXPECT_RULE("buffer-offset-alignment");
    [ce setBuffer:b offset:4 atIndex:2];
    [ce dispatchThreads:(MTLSize){0, 1, 1} threadsPerThreadgroup:one];
    EXPECT_RULE("dispatch-size");
    [ce dispatchThreads:(MTLSize){4096, 1, 1} threadsPerThreadgroup:(MTLSize){64, 32, 1}];
    EXPECT_RULE("dispatch-size");
    [ce dispatchThreads:(MTLSize){4096, 1, 1} threadsPerThreadgroup:(MTLSize){32, 32, 1}];
    [ce memoryBarrierWithScope:MTLBarrierScopeBuffers];
    [ce endEncoding];
    run(cb);
    CHECK(cb.status == MTLCommandBufferStatusCompleted);
    EXPECT_CLEAN();
}

CASE(pipeline_reflection_reports_buffer_bindings)
{
    id<MTLDevice> dev = device();
    NSError *err = nil;
    id<MTLLibrary> lib = [dev newLibraryWithSource:@"kernel void r(device float *f [[buffer(0)]],\n"
                                                   @"  device const float4 *v [[buffer(1)]],\n"
                                                   @"  device uchar *c [[buffer(2)]],\n"
                                                   @"  constant packed_float3 &p [[buffer(4)]],\n"
                                                   @"  device const Item *items [[buffer(5)]]) {}"
                                           options:nil
                                             error:&err];
    id<MTLFunction> fn = [lib newFunctionWithName:@"r"];
    MTLAutoreleasedComputePipelineReflection reflection = nil;
    id<MTLComputePipelineState> ps = [dev newComputePipelineStateWithFunction:fn
                                                                      options:MTLPipelineOptionBindingInfo
                                                                   reflection:&reflection
                                                                        error:&err];
    CHECK(ps != nil && reflection.bindings.count == 5);
    static const struct {
        NSUInteger index, alignment, size;
        MTLBindingAccess access;
        const char *name;
    } want[] = {
        {0, 4, 4, MTLBindingAccessReadWrite, "f"},
        {1, 16, 16, MTLBindingAccessReadOnly, "v"},
        {2, 1, 1, MTLBindingAccessReadWrite, "c"},
        {4, 4, 12, MTLBindingAccessReadOnly, "p"},
        {5, 4, 0, MTLBindingAccessReadOnly, "items"},   /* a struct: not laid out */
    };
    for (NSUInteger i = 0; i < reflection.bindings.count && i < 5; i++) {
        id<MTLBufferBinding> b = (id<MTLBufferBinding>)[reflection.bindings objectAtIndex:i];
        CHECK(b.type == MTLBindingTypeBuffer && b.used && !b.argument);
        CHECK(b.index == want[i].index && b.access == want[i].access);
        CHECK(b.bufferAlignment == want[i].alignment && b.bufferDataSize == want[i].size);
        CHECK(strcmp(b.name.UTF8String, want[i].name) == 0);
    }
    reflection = nil;                          /* bindings only when asked for */
    ps = [dev newComputePipelineStateWithFunction:fn
                                          options:MTLPipelineOptionBufferTypeInfo
                                       reflection:&reflection
                                            error:&err];
    CHECK(ps != nil && reflection != nil && reflection.bindings.count == 0);
    CHECK([dev newComputePipelineStateWithFunction:fn options:MTLPipelineOptionBindingInfo
                                        reflection:NULL error:&err] != nil);
    EXPECT_CLEAN();
}

CASE(compute_kernel_needs_an_implementation)
{
    id<MTLDevice> dev = device();
    id<MTLComputePipelineState> ps =
        pipeline(dev, "kernel void nobody(device float *x [[buffer(0)]]) {}", "nobody");
    id<MTLBuffer> b = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [[dev newCommandQueue] commandBuffer];
    id<MTLComputeCommandEncoder> ce = [cb computeCommandEncoder];
    [ce setComputePipelineState:ps];
    [ce setBuffer:b offset:0 atIndex:0];
    [ce dispatchThreads:(MTLSize){1, 1, 1} threadsPerThreadgroup:(MTLSize){1, 1, 1}];
    EXPECT_RULE("no-kernel-implementation");
    [ce endEncoding];
    run(cb);
    CHECK(cb.status == MTLCommandBufferStatusError);
    CHECK(strstr(cb.error.localizedDescription.UTF8String, "nobody") != NULL);
}

CASE(library_reads_kernels_and_visible_errors)
{
    id<MTLDevice> dev = device();
    NSError *err = nil;
    id<MTLLibrary> lib = [dev newLibraryWithSource:[NSString stringWithCString:kArgsSource
                                                                      encoding:NSUTF8StringEncoding]
                                           options:nil
                                             error:&err];
    CHECK(lib.functionNames.count == 1);
    CHECK([[lib.functionNames objectAtIndex:0] isEqualToString:@"args"]);
    CHECK([lib newFunctionWithName:@"commented_out"] == nil);
    CHECK([lib newFunctionWithName:@"args"].functionType == MTLFunctionTypeKernel);
    id<MTLLibrary> shaders = [dev newLibraryWithSource:@"vertex float4 v(uint i [[vertex_id]]) { "
                                                       @"return float4(0); }\n"
                                                       @"fragment half4 f() { return half4(1); }\n"
                                               options:nil
                                                 error:&err];
    CHECK(shaders.functionNames.count == 2);
    id<MTLFunction> vertex = [shaders newFunctionWithName:@"v"];
    CHECK(vertex.functionType == MTLFunctionTypeVertex);
    CHECK([shaders newFunctionWithName:@"f"].functionType == MTLFunctionTypeFragment);
    CHECK([dev newComputePipelineStateWithFunction:vertex error:&err] == nil && err != nil);
    err = nil;
    CHECK([dev newLibraryWithSource:@"kernel void broken(\n{\n" options:nil error:&err] == nil);
    CHECK(err.code == MTLLibraryErrorCompileFailure && [err.domain isEqualToString:MTLLibraryErrorDomain]);
    CHECK(strstr(err.localizedDescription.UTF8String, "program_source:") != NULL);
    CHECK(strstr(err.localizedDescription.UTF8String, "expected '}'") != NULL);
    err = nil;
    CHECK([dev newLibraryWithSource:@"// a\n// b\n#error not today\n" options:nil error:&err] == nil);
    CHECK(strstr(err.localizedDescription.UTF8String, "program_source:3:") != NULL);
    CHECK(strstr(err.localizedDescription.UTF8String, "not today") != NULL);
    EXPECT_CLEAN();
}

CASE(library_records_fast_math)
{
    id<MTLDevice> dev = device();
    NSString *src = @"kernel void f(device float *x [[buffer(0)]]) {}";
    NSError *err = nil;
    msim_stats_t s0 = stats();
    (void)[dev newLibraryWithSource:src options:nil error:&err];          /* default: on */
    MTLCompileOptions *opts = [[MTLCompileOptions alloc] init];
    CHECK(opts.fastMathEnabled && opts.mathMode == MTLMathModeFast);
    (void)[dev newLibraryWithSource:src options:opts error:&err];
    opts.fastMathEnabled = NO;
    CHECK(opts.mathMode == MTLMathModeSafe);
    (void)[dev newLibraryWithSource:src options:opts error:&err];
    opts.mathMode = MTLMathModeRelaxed;
    CHECK(!opts.fastMathEnabled);
    (void)[dev newLibraryWithSource:src options:opts error:&err];
    msim_stats_t s1 = stats();
    CHECK(s1.libraries_compiled - s0.libraries_compiled == 4);
    CHECK(s1.libraries_fast_math - s0.libraries_fast_math == 2);
    EXPECT_CLEAN();
    CHECK(msim_configure(14, 0, 0, 0) == 0);  /* mathMode is macOS 15 API */
    opts = [[MTLCompileOptions alloc] init];
    opts.fastMathEnabled = NO;
    EXPECT_CLEAN();
    BOOL raised = NO;
    @try {
        opts.mathMode = MTLMathModeSafe;
    } @catch (NSException *e) {
        raised = [e.name isEqualToString:NSInvalidArgumentException];
    }
    CHECK(raised);
    EXPECT_RULE("macos15-api");
    CHECK(msim_configure(15, 0, 0, 0) == 0);
    opts.mathMode = MTLMathModeSafe;
    EXPECT_CLEAN();
}

/* ---- ordering of untracked resources -------------------------------------------------- */

static void fill_pass(id<MTLCommandBuffer> cb, id<MTLBuffer> b, id<MTLFence> update,
                      id<MTLFence> wait)
{
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    if (wait)
        [blit waitForFence:wait];
    [blit fillBuffer:b range:(NSRange){0, 64} value:1];
    if (update)
        [blit updateFence:update];
    [blit endEncoding];
}

static void read_pass(id<MTLCommandBuffer> cb, id<MTLBuffer> b, id<MTLBuffer> out,
                      id<MTLFence> wait)
{
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    if (wait)
        [blit waitForFence:wait];
    [blit copyFromBuffer:b sourceOffset:0 toBuffer:out destinationOffset:0 size:64];
    [blit endEncoding];
}

CASE(untracked_passes_of_one_command_buffer)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> u = buffer(dev, 64, MTLResourceHazardTrackingModeUntracked);
    id<MTLBuffer> t = buffer(dev, 64, 0), out = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    fill_pass(cb, u, nil, nil);
    read_pass(cb, u, out, nil);
    run(cb);
    EXPECT_RULE("untracked-hazard");
    id<MTLFence> fence = [dev newFence];
    cb = [q commandBuffer];
    fill_pass(cb, u, fence, nil);
    read_pass(cb, u, out, fence);
    run(cb);
    EXPECT_CLEAN();
    cb = [q commandBuffer];                    /* tracked: Metal orders it */
    fill_pass(cb, t, nil, nil);
    read_pass(cb, t, out, nil);
    run(cb);
    EXPECT_CLEAN();
    cb = [q commandBuffer];                    /* two readers need no order */
    read_pass(cb, u, out, nil);
    read_pass(cb, u, t, nil);
    run(cb);
    EXPECT_CLEAN();
}

CASE(untracked_across_command_buffers)
{
    CHECK(msim_configure(15, 100000, 0, 0) == 0);   /* keep each in flight */
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLBuffer> u = buffer(dev, 64, MTLResourceHazardTrackingModeUntracked);
    id<MTLBuffer> out = buffer(dev, 64, 0);
    id<MTLCommandBuffer> first = [q commandBuffer], second = [q commandBuffer];
    fill_pass(first, u, nil, nil);
    read_pass(second, u, out, nil);
    [first commit];
    [second commit];
    [second waitUntilCompleted];
    EXPECT_RULE("untracked-hazard");
    id<MTLEvent> event = [dev newEvent];
    first = [q commandBuffer];
    second = [q commandBuffer];
    fill_pass(first, u, nil, nil);
    [first encodeSignalEvent:event value:1];
    [second encodeWaitForEvent:event value:1];
    read_pass(second, u, out, nil);
    [first commit];
    [second commit];
    [second waitUntilCompleted];
    EXPECT_CLEAN();
    id<MTLFence> fence = [dev newFence];       /* fences order one queue's passes */
    first = [q commandBuffer];
    second = [q commandBuffer];
    fill_pass(first, u, fence, nil);
    read_pass(second, u, out, fence);
    [first commit];
    [second commit];
    [second waitUntilCompleted];
    EXPECT_CLEAN();
    first = [q commandBuffer];                 /* completed before the next commit */
    fill_pass(first, u, nil, nil);
    run(first);
    second = [q commandBuffer];
    read_pass(second, u, out, nil);
    run(second);
    EXPECT_CLEAN();
}

CASE(events_order_the_gpu)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    id<MTLSharedEvent> ev = [dev newSharedEvent];
    id<MTLBuffer> b = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    [cb encodeWaitForEvent:ev value:5];
    fill_pass(cb, b, nil, nil);
    [cb encodeSignalEvent:ev value:7];
    [cb commit];
    CHECK(![ev waitUntilSignaledValue:7 timeoutMS:50]);   /* the GPU waits for the CPU */
    CHECK(cb.status == MTLCommandBufferStatusCommitted);
    ev.signaledValue = 5;
    CHECK([ev waitUntilSignaledValue:7 timeoutMS:5000]);
    [cb waitUntilCompleted];
    CHECK(cb.status == MTLCommandBufferStatusCompleted && ev.signaledValue == 7);
    CHECK(((const uint8_t *)b.contents)[0] == 1);
    ev.signaledValue = 3;                        /* never goes down */
    CHECK(ev.signaledValue == 7);
    EXPECT_CLEAN();
}

CASE(event_wait_watchdog)
{
    id<MTLDevice> dev = device();
    id<MTLEvent> ev = [dev newEvent];
    id<MTLCommandBuffer> cb = [[dev newCommandQueue] commandBuffer];
    [cb encodeWaitForEvent:ev value:1];
    run(cb);
    EXPECT_RULE("event-wait-timeout");
    CHECK(cb.status == MTLCommandBufferStatusError && cb.error.code == MTLCommandBufferErrorTimeout);
}

CASE(wrong_device)
{
    id<MTLDevice> old = device();
    id<MTLBuffer> b = buffer(old, 64, 0);
    CHECK(msim_configure(15, 0, 0, 0) == 0);
    id<MTLCommandBuffer> cb = [[device() newCommandQueue] commandBuffer];
    id<MTLBlitCommandEncoder> blit = [cb blitCommandEncoder];
    [blit fillBuffer:b range:(NSRange){0, 64} value:1];
    EXPECT_RULE("wrong-device");
    [blit endEncoding];
    run(cb);
    EXPECT_CLEAN();
}

CASE(objects_and_storage_the_simulator_refuses)
{
    id<MTLDevice> dev = device();
    CHECK(buffer(dev, 64, MTLResourceStorageModeMemoryless) == nil);
    EXPECT_RULE("buffer-storage");
    MTLHeapDescriptor *desc = [[MTLHeapDescriptor alloc] init];
    desc.size = 1 << 20;
    desc.type = MTLHeapTypeSparse;
    CHECK([dev newHeapWithDescriptor:desc] == nil);
    EXPECT_RULE("heap-type");
    long page = sysconf(_SC_PAGESIZE);
    void *gone = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(gone, page);
    CHECK([dev newBufferWithBytesNoCopy:gone length:page options:0 deallocator:nil] == nil);
    EXPECT_RULE("nocopy-unmapped");
    id<MTLBuffer> b = buffer(dev, 64, 0);
    id<MTLCommandBuffer> cb = [[dev newCommandQueue] commandBuffer];
    id<MTLComputeCommandEncoder> ce = [cb computeCommandEncoder];
    [ce setBuffer:b offset:65 atIndex:0];
    EXPECT_RULE("buffer-offset");
    [ce setBuffer:(id<MTLBuffer>)[dev newFence] offset:0 atIndex:0];
    EXPECT_RULE("wrong-object");
    [ce endEncoding];
    [cb encodeSignalEvent:(id<MTLEvent>)b value:1];
    EXPECT_RULE("wrong-object");
    run(cb);
    EXPECT_CLEAN();
}

/* ---- faults ------------------------------------------------------------------------------- */

CASE(fault_knobs)
{
    id<MTLDevice> dev = device();
    long page = sysconf(_SC_PAGESIZE);
    void *mem = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(msim_fail_next(MSIM_FAULT_NEW_BUFFER, 2) == 0);
    CHECK(buffer(dev, 64, 0) == nil);
    CHECK([dev newBufferWithBytesNoCopy:mem length:page options:0 deallocator:nil] == nil);
    CHECK(buffer(dev, 64, 0) != nil);
    munmap(mem, page);

    NSError *err = nil;
    CHECK(msim_fail_next(MSIM_FAULT_RESIDENCY_SET, 1) == 0);
    CHECK([dev newResidencySetWithDescriptor:[[MTLResidencySetDescriptor alloc] init]
                                       error:&err] == nil);
    CHECK(err != nil && err.localizedDescription.UTF8String[0]);
    CHECK(new_set(dev) != nil);

    err = nil;
    CHECK(msim_fail_next(MSIM_FAULT_LIBRARY, 1) == 0);
    CHECK([dev newLibraryWithSource:@"kernel void f() {}" options:nil error:&err] == nil);
    CHECK(err.code == MTLLibraryErrorInternal);
    CHECK([dev newLibraryWithSource:@"kernel void f() {}" options:nil error:&err] != nil);

    id<MTLCommandQueue> q = [dev newCommandQueue];
    CHECK(msim_fail_next(MSIM_FAULT_COMMAND_BUFFER, 1) == 0);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    run(cb);
    CHECK(cb.status == MTLCommandBufferStatusError);
    CHECK([cb.error.domain isEqualToString:MTLCommandBufferErrorDomain]);
    CHECK(cb.error.code == MTLCommandBufferErrorInternal);
    cb = [q commandBuffer];
    run(cb);
    CHECK(cb.status == MTLCommandBufferStatusCompleted);
    CHECK(msim_fail_next(99, 1) == -1);

    /* The nil knob answers only where Apple declares the result nullable. */
    CHECK(msim_nil_next("newFence", 1) == 0 && msim_nil_next("length", 1) == 0);
    CHECK([dev newFence] == nil && [dev newFence] != nil);
    CHECK(buffer(dev, 64, 0).length == 64);
    msim_reset_faults();
    CHECK(msim_nil_next("", 1) == -1);
    EXPECT_CLEAN();
}

CASE(raise_knob)
{
    id<MTLDevice> dev = device();
    id<MTLCommandQueue> q = [dev newCommandQueue];
    CHECK(msim_raise_next("commit", 1) == 0);
    id<MTLResidencySet> set = new_set(dev);
    id<MTLCommandBuffer> cb = [q commandBuffer];
    NSString *name = nil, *reason = nil;
    @try {
        [cb commit];
    } @catch (NSException *e) {
        name = e.name;
        reason = e.reason;
    }
    CHECK(name && [name isEqualToString:@"MTLSimulatedFault"]);
    CHECK(reason && strstr(reason.UTF8String, "commit") != NULL);
    [set commit];                               /* the knob fired once */
    run(cb);
    CHECK(cb.status == MTLCommandBufferStatusCompleted);
    CHECK(msim_raise_next("", 1) == -1);
    CHECK(stats().exceptions_raised == 1);
    EXPECT_CLEAN();
}

/* ---- driver ---------------------------------------------------------------------------------- */

#define ENTRY(name) {#name, case_##name}
static const struct {
    const char *name;
    void (*fn)(void);
} cases[] = {
    ENTRY(device_default_and_all_devices),
    ENTRY(device_configure_makes_a_new_device),
    ENTRY(macos14_has_no_residency_sets),
    ENTRY(unknown_selector_raises),
    ENTRY(buffer_zero_filled_pages),
    ENTRY(buffer_nocopy_needs_whole_pages),
    ENTRY(buffer_deallocator_once_on_the_last_thread),
    ENTRY(buffer_nocopy_memory_gone_before_release),
    ENTRY(heap_sub_allocation),
    ENTRY(residency_set_stages_until_commit),
    ENTRY(residency_heap_buffer_makes_the_heap_resident),
    ENTRY(residency_set_holds_members_until_removal_commits),
    ENTRY(residency_set_is_not_thread_safe),
    ENTRY(residency_sets_per_queue),
    ENTRY(queue_runs_fifo_across_queues),
    ENTRY(queue_blocks_at_64_uncompleted),
    ENTRY(queue_watchdog_at_64_uncompleted),
    ENTRY(command_buffer_misuse),
    ENTRY(completion_handlers_run_on_a_simulator_thread_after_completion),
    ENTRY(encoder_must_end),
    ENTRY(blit_ranges_and_alignment),
    ENTRY(blit_commands_of_one_encoder_are_not_ordered),
    ENTRY(compute_binding_rules),
    ENTRY(pipeline_reflection_reports_buffer_bindings),
    ENTRY(compute_kernel_needs_an_implementation),
    ENTRY(library_reads_kernels_and_visible_errors),
    ENTRY(library_records_fast_math),
    ENTRY(untracked_passes_of_one_command_buffer),
    ENTRY(untracked_across_command_buffers),
    ENTRY(events_order_the_gpu),
    ENTRY(event_wait_watchdog),
    ENTRY(wrong_device),
    ENTRY(objects_and_storage_the_simulator_refuses),
    ENTRY(fault_knobs),
    ENTRY(raise_knob),
};

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    size_t n = sizeof cases / sizeof *cases;
    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < n; i++)
            printf("%s\n", cases[i].name);
        return 0;
    }
    for (size_t i = 0; argc == 2 && i < n; i++) {
        if (strcmp(argv[1], cases[i].name) == 0) {
            @autoreleasepool {
                cases[i].fn();
            }
            msim_drain();
            printf("%s: %s\n", cases[i].name, failures ? "FAILED" : "ok");
            return failures ? 1 : 0;
        }
    }
    fprintf(stderr, "usage: %s CASE | --list\n", argv[0]);
    return 2;
}
