/*
 * device.m -- the simulated GPU: MTLCreateSystemDefaultDevice(),
 * MTLCopyAllDevices() and the MTLDevice they return.
 *
 * As on a Mac, every call returns the same device object (+1) until the
 * configuration changes (msim_configure); then the next call makes a new
 * device with a new registryID, and the old one lives on while anything
 * holds it. The device models an Apple7-class GPU with unified memory.
 */
#include <string.h>

#include "sim.h"

@implementation MSimDevice {
    msim_config_t _config;
    NSString *_name;
    uint64_t _registryID;
    atomic_int_fast64_t _allocated;
}

- (instancetype)initWithConfig:(msim_config_t)config
{
    self = [super init];
    _config = config;
    _registryID = 0x1000005c0ULL + config.generation;
    _name = [NSString msim_stringWithFormat:"Apple M1 (simulated by metalsim, macOS %d)",
                                            config.macos_major];
    atomic_init(&_allocated, 0);
    return self;
}

- (msim_config_t)config
{
    return _config;
}

- (void)msim_allocated:(int64_t)delta
{
    atomic_fetch_add(&_allocated, delta);
}

- (NSString *)name
{
    MSIM_ENTRY();
    return _name;
}

- (uint64_t)registryID
{
    MSIM_ENTRY();
    return _registryID;
}

- (BOOL)hasUnifiedMemory
{
    MSIM_ENTRY();
    return YES;
}

- (NSUInteger)maxBufferLength
{
    MSIM_ENTRY();
    return (NSUInteger)_config.max_buffer_length;
}

- (uint64_t)recommendedMaxWorkingSetSize
{
    MSIM_ENTRY();
    return _config.recommended_working_set;
}

- (NSUInteger)currentAllocatedSize
{
    MSIM_ENTRY();
    int64_t n = atomic_load(&_allocated);
    return n > 0 ? (NSUInteger)n : 0;
}

/* Apple1..Apple7, Mac2, Common1..3 and Metal3: what an M1 reports. */
- (BOOL)supportsFamily:(MTLGPUFamily)family
{
    MSIM_ENTRY();
    NSInteger f = (NSInteger)family;
    return (f >= 1001 && f <= 1007) || f == 2002 || (f >= 3001 && f <= 3003) || f == 5001;
}

- (BOOL)respondsToSelector:(SEL)selector
{
    if (_config.macos_major < 15 &&
        strcmp(sel_getName(selector), "newResidencySetWithDescriptor:error:") == 0)
        return NO;
    return [super respondsToSelector:selector];
}

- (id<MTLCommandQueue>)newCommandQueue
{
    MSIM_ENTRY_NULLABLE();
    return [[MSimCommandQueue alloc] initWithDevice:self];
}

- (id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options
{
    MSIM_ENTRY_NULLABLE();
    if (msim__take_fault(MSIM_FAULT_NEW_BUFFER))
        return nil;
    return [MSimBuffer newWithDevice:self length:length options:options];
}

- (id<MTLBuffer>)newBufferWithBytesNoCopy:(void *)pointer
                                   length:(NSUInteger)length
                                  options:(MTLResourceOptions)options
                              deallocator:(void (^)(void *, NSUInteger))deallocator
{
    MSIM_ENTRY();
    if (msim__take_fault(MSIM_FAULT_NEW_BUFFER))
        return nil;
    return [MSimBuffer newWithDevice:self
                               bytes:pointer
                              length:length
                             options:options
                         deallocator:deallocator];
}

- (id<MTLHeap>)newHeapWithDescriptor:(MTLHeapDescriptor *)descriptor
{
    MSIM_ENTRY_NULLABLE();
    return [[MSimHeap alloc] initWithDevice:self descriptor:descriptor];
}

- (id<MTLFence>)newFence
{
    MSIM_ENTRY_NULLABLE();
    MSIM_COUNT(fences_created, 1);
    return [[MSimFence alloc] initWithDevice:self];
}

- (id<MTLEvent>)newEvent
{
    MSIM_ENTRY_NULLABLE();
    return [[MSimEvent alloc] initWithDevice:self];
}

- (id<MTLSharedEvent>)newSharedEvent
{
    MSIM_ENTRY_NULLABLE();
    return [[MSimSharedEvent alloc] initWithDevice:self];
}

- (id<MTLResidencySet>)newResidencySetWithDescriptor:(MTLResidencySetDescriptor *)desc
                                               error:(NSError **)error
{
    MSIM_ENTRY();
    if (_config.macos_major < 15) {
        msim__invalid("macos15-api",
                      "newResidencySetWithDescriptor:error: sent on simulated macOS %d: the "
                      "residency-set API needs macOS 15",
                      _config.macos_major);
        msim__raise(NSInvalidArgumentException,
                    "-[MTLDevice newResidencySetWithDescriptor:error:]: unrecognized selector "
                    "sent to instance %p",
                    (__bridge void *)self);
    }
    if (msim__take_fault(MSIM_FAULT_RESIDENCY_SET)) {
        if (error)
            *error = [NSError msim_errorWithDomain:@"metalsim"
                                              code:1
                                       description:@"simulated failure: the residency set "
                                                   @"could not be created"];
        return nil;
    }
    return [[MSimResidencySet alloc] initWithDevice:self descriptor:desc];
}

- (id<MTLLibrary>)newLibraryWithSource:(NSString *)source
                               options:(MTLCompileOptions *)options
                                 error:(NSError **)error
{
    MSIM_ENTRY();
    if (msim__take_fault(MSIM_FAULT_LIBRARY)) {
        if (error)
            *error = [NSError msim_errorWithDomain:MTLLibraryErrorDomain
                                              code:MTLLibraryErrorInternal
                                       description:@"simulated failure: the Metal compiler "
                                                   @"service is not available"];
        return nil;
    }
    /* Apple's default (options nil, or fastMathEnabled untouched) is fast
     * math on. */
    BOOL fast = options ? options.fastMathEnabled : YES;
    return [MSimLibrary newWithDevice:self source:source fastMath:fast error:error];
}

/* What both pipeline builders do, without their entry checks. */
- (nullable id<MTLComputePipelineState>)msim_pipelineWithFunction:(id<MTLFunction>)function
                                                            error:(NSError **)error
{
    if (![(id)function isKindOfClass:[MSimFunction class]]) {
        if (error)
            *error = [NSError msim_errorWithDomain:MTLLibraryErrorDomain
                                              code:MTLLibraryErrorInternal
                                       description:@"not a function of a simulated library"];
        return nil;
    }
    if (function.functionType != MTLFunctionTypeKernel) {
        if (error)
            *error = [NSError msim_errorWithDomain:MTLLibraryErrorDomain
                                              code:MTLLibraryErrorInternal
                                       description:@"a compute pipeline needs a kernel function"];
        return nil;
    }
    return [[MSimPipeline alloc] initWithDevice:self function:(MSimFunction *)function];
}

- (id<MTLComputePipelineState>)newComputePipelineStateWithFunction:(id<MTLFunction>)function
                                                             error:(NSError **)error
{
    MSIM_ENTRY_NULLABLE();
    return [self msim_pipelineWithFunction:function error:error];
}

/* Reflection is filled only when asked for: the bindings come with
 * MTLPipelineOptionBindingInfo (one MTLBufferBinding per [[buffer(n)]]
 * argument the simulator read), as the options say on a Mac. */
- (id<MTLComputePipelineState>)newComputePipelineStateWithFunction:(id<MTLFunction>)function
                                                           options:(MTLPipelineOption)options
                                                        reflection:
                                                            (MTLAutoreleasedComputePipelineReflection *)reflection
                                                             error:(NSError **)error
{
    MSIM_ENTRY_NULLABLE();
    id<MTLComputePipelineState> ps = [self msim_pipelineWithFunction:function error:error];
    if (ps && reflection)
        *reflection = [[MTLComputePipelineReflection alloc]
            initWithFunction:(options & MTLPipelineOptionBindingInfo) ? (MSimFunction *)function
                                                                      : nil];
    return ps;
}

@end

/* ---- the system's devices ------------------------------------------------------------ */

static MSimDevice *current_device;      /* guarded by the simulator lock */

static MSimDevice *the_device(void)
{
    msim_config_t cfg = msim__config();
    msim__lock();
    if (!current_device || current_device.config.generation != cfg.generation)
        current_device = [[MSimDevice alloc] initWithConfig:cfg];
    MSimDevice *dev = current_device;
    msim__unlock();
    return dev;
}

id<MTLDevice> MTLCreateSystemDefaultDevice(void)
{
    if (msim__default_device_nil())
        return nil;
    return the_device();
}

NSArray<id<MTLDevice>> *MTLCopyAllDevices(void)
{
    id<MTLDevice> dev = the_device();
    return [NSArray arrayWithObjects:&dev count:1];
}

/* ---- objects for tests (metalsim.h) ------------------------------------------------- */

uint64_t msim_new_buffer(uint64_t length, uint64_t options, uint64_t heap_size)
{
    @autoreleasepool {
        id<MTLDevice> dev = the_device();
        id<MTLBuffer> buf;
        if (heap_size) {
            MTLHeapDescriptor *desc = [[MTLHeapDescriptor alloc] init];
            desc.size = (NSUInteger)heap_size;
            desc.storageMode = (MTLStorageMode)((options >> 4) & 0xF);
            buf = [[dev newHeapWithDescriptor:desc] newBufferWithLength:(NSUInteger)length
                                                                  options:(MTLResourceOptions)options];
        } else {
            buf = [dev newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options];
        }
        return (uint64_t)(uintptr_t)(__bridge_retained void *)buf;
    }
}

uint64_t msim_new_fence(void)
{
    @autoreleasepool {
        return (uint64_t)(uintptr_t)(__bridge_retained void *)[the_device() newFence];
    }
}

void msim_release(uint64_t handle)
{
    @autoreleasepool {
        id obj = (__bridge_transfer id)(void *)(uintptr_t)handle;
        (void)obj;
    }
}
