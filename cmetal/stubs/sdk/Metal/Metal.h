/*
 * <Metal/Metal.h> as far as mlxbuf needs it (see ../../README.md): the
 * Linux type-check of the Objective-C in cmetal/ compiles against it, and
 * the simulated Metal (metalsim/) implements it. Every declaration is
 * Apple's API with the SDK's types, nullability, enum raw values and
 * availability. Sources:
 * METAL_FACTS.md (the team's Metal facts sheet), metal-cpp for macOS 15
 * and 26 (MTLHeaderBridge.hpp selector strings, MTL*.hpp signatures and
 * enum values) and the SDK headers (availability).
 */
#ifndef MLXBUF_STUB_METAL_H
#define MLXBUF_STUB_METAL_H

#import <Foundation/Foundation.h>

/* The residency-set API is macOS 15 / iOS 18 (MTLResidencySet.h,
 * MTLAllocation.h, and per method in MTLDevice.h / MTLCommandQueue.h), as
 * is MTLCompileOptions.mathMode. */
#define MLXBUF_STUB_API_15 \
    __attribute__((availability(macos, introduced = 15.0))) \
    __attribute__((availability(ios, introduced = 18.0)))

/* Pipeline bindings reflection (MTLBinding, MTLArgument.h) is macOS 13 /
 * iOS 16. */
#define MLXBUF_STUB_API_13 \
    __attribute__((availability(macos, introduced = 13.0))) \
    __attribute__((availability(ios, introduced = 16.0)))

#pragma clang assume_nonnull begin

/* ---- types and enums (MTLTypes.h, MTLResource.h, ...) ---------------- */

typedef struct {
    NSUInteger width, height, depth;
} MTLSize;

typedef enum MTLCPUCacheMode : NSUInteger MTLCPUCacheMode;
enum MTLCPUCacheMode : NSUInteger {
    MTLCPUCacheModeDefaultCache = 0,
    MTLCPUCacheModeWriteCombined = 1,
};

typedef enum MTLStorageMode : NSUInteger MTLStorageMode;
enum MTLStorageMode : NSUInteger {
    MTLStorageModeShared = 0,
    MTLStorageModeManaged = 1,
    MTLStorageModePrivate = 2,
    MTLStorageModeMemoryless = 3,
};

typedef enum MTLHazardTrackingMode : NSUInteger MTLHazardTrackingMode;
enum MTLHazardTrackingMode : NSUInteger {
    MTLHazardTrackingModeDefault = 0,
    MTLHazardTrackingModeUntracked = 1,
    MTLHazardTrackingModeTracked = 2,
};

/* The CPU-cache bits start at bit 0, the storage bits at bit 4 and the
 * hazard-tracking bits at bit 8 (MTLResource.h). */
typedef NSUInteger MTLResourceOptions;
enum : MTLResourceOptions {
    MTLResourceCPUCacheModeDefaultCache = 0,
    MTLResourceCPUCacheModeWriteCombined = 1,
    MTLResourceStorageModeShared = 0,
    MTLResourceStorageModeManaged = 1UL << 4,
    MTLResourceStorageModePrivate = 2UL << 4,
    MTLResourceStorageModeMemoryless = 3UL << 4,
    MTLResourceHazardTrackingModeDefault = 0,
    MTLResourceHazardTrackingModeUntracked = 1UL << 8,
    MTLResourceHazardTrackingModeTracked = 2UL << 8,
};

typedef enum MTLHeapType : NSInteger MTLHeapType;
enum MTLHeapType : NSInteger {
    MTLHeapTypeAutomatic = 0,
    MTLHeapTypePlacement = 1,
    MTLHeapTypeSparse = 2,
};

typedef enum MTLCommandBufferStatus : NSUInteger MTLCommandBufferStatus;
enum MTLCommandBufferStatus : NSUInteger {
    MTLCommandBufferStatusNotEnqueued = 0,
    MTLCommandBufferStatusEnqueued = 1,
    MTLCommandBufferStatusCommitted = 2,
    MTLCommandBufferStatusScheduled = 3,
    MTLCommandBufferStatusCompleted = 4,
    MTLCommandBufferStatusError = 5,
};

/* NSError codes in MTLCommandBufferErrorDomain. */
typedef enum MTLCommandBufferError : NSUInteger MTLCommandBufferError;
enum MTLCommandBufferError : NSUInteger {
    MTLCommandBufferErrorNone = 0,
    MTLCommandBufferErrorInternal = 1,
    MTLCommandBufferErrorTimeout = 2,
    MTLCommandBufferErrorPageFault = 3,
    MTLCommandBufferErrorAccessRevoked = 4,
    MTLCommandBufferErrorNotPermitted = 7,
    MTLCommandBufferErrorOutOfMemory = 8,
    MTLCommandBufferErrorInvalidResource = 9,
    MTLCommandBufferErrorMemoryless = 10,
    MTLCommandBufferErrorDeviceRemoved = 11,
    MTLCommandBufferErrorStackOverflow = 12,
};
extern NSErrorDomain const MTLCommandBufferErrorDomain;

/* NSError codes in MTLLibraryErrorDomain. */
typedef enum MTLLibraryError : NSUInteger MTLLibraryError;
enum MTLLibraryError : NSUInteger {
    MTLLibraryErrorUnsupported = 1,
    MTLLibraryErrorInternal = 2,
    MTLLibraryErrorCompileFailure = 3,
    MTLLibraryErrorCompileWarning = 4,
    MTLLibraryErrorFunctionNotFound = 5,
    MTLLibraryErrorFileNotFound = 6,
};
extern NSErrorDomain const MTLLibraryErrorDomain;

typedef NSUInteger MTLBarrierScope;
enum : MTLBarrierScope {
    MTLBarrierScopeBuffers = 1,
    MTLBarrierScopeTextures = 2,
    MTLBarrierScopeRenderTargets = 4,
};

typedef enum MTLFunctionType : NSUInteger MTLFunctionType;
enum MTLFunctionType : NSUInteger {
    MTLFunctionTypeVertex = 1,
    MTLFunctionTypeFragment = 2,
    MTLFunctionTypeKernel = 3,
};

typedef enum MTLMathMode : NSInteger MTLMathMode;
enum MTLMathMode : NSInteger {
    MTLMathModeSafe = 0,
    MTLMathModeRelaxed = 1,
    MTLMathModeFast = 2,
} MLXBUF_STUB_API_15;

/* What reflection the pipeline builders return (MTLDevice.h).
 * BindingInfo (macOS 13) is the new name of ArgumentInfo's bit. */
typedef NSUInteger MTLPipelineOption;
enum : MTLPipelineOption {
    MTLPipelineOptionNone = 0,
    MTLPipelineOptionBindingInfo MLXBUF_STUB_API_13 = 1UL << 0,
    MTLPipelineOptionBufferTypeInfo = 1UL << 1,
};

typedef enum MTLBindingType : NSInteger MTLBindingType;
enum MTLBindingType : NSInteger {
    MTLBindingTypeBuffer = 0,
    MTLBindingTypeThreadgroupMemory = 1,
    MTLBindingTypeTexture = 2,
    MTLBindingTypeSampler = 3,
} MLXBUF_STUB_API_13;

typedef enum MTLBindingAccess : NSUInteger MTLBindingAccess;
enum MTLBindingAccess : NSUInteger {
    MTLBindingAccessReadOnly = 0,
    MTLBindingAccessReadWrite = 1,
    MTLBindingAccessWriteOnly = 2,
} MLXBUF_STUB_API_13;

typedef enum MTLGPUFamily : NSInteger MTLGPUFamily;
enum MTLGPUFamily : NSInteger {
    MTLGPUFamilyApple6 = 1006,
    MTLGPUFamilyApple7 = 1007,
    MTLGPUFamilyApple8 = 1008,
};

@protocol MTLDevice;
@protocol MTLCommandBuffer;
@protocol MTLHeap;

typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);

/* ---- resources: MTLAllocation.h, MTLResource.h, MTLBuffer.h ---------- */

MLXBUF_STUB_API_15
@protocol MTLAllocation <NSObject>
@property (readonly) NSUInteger allocatedSize;
@end

/* MTLResource re-declares allocatedSize with its older availability. */
@protocol MTLResource <MTLAllocation>
@property (readonly) id<MTLDevice> device;
@property (readonly) MTLCPUCacheMode cpuCacheMode;
@property (readonly) MTLStorageMode storageMode;
@property (readonly) MTLHazardTrackingMode hazardTrackingMode;
@property (readonly) MTLResourceOptions resourceOptions;
@property (readonly, nullable) id<MTLHeap> heap;
@property (readonly) NSUInteger heapOffset;
@property (readonly) NSUInteger allocatedSize;
@end

@protocol MTLBuffer <MTLResource>
@property (readonly) NSUInteger length;
- (void *)contents __attribute__((objc_returns_inner_pointer));
@end

/* ---- heaps: MTLHeap.h (macOS 10.13) ----------------------------------- */

@interface MTLHeapDescriptor : NSObject <NSCopying>
@property (readwrite, nonatomic) NSUInteger size;
@property (readwrite, nonatomic) MTLStorageMode storageMode;
@property (readwrite, nonatomic) MTLCPUCacheMode cpuCacheMode;
@property (readwrite, nonatomic) MTLHazardTrackingMode hazardTrackingMode;
@property (readwrite, nonatomic) MTLHeapType type;
@end

@protocol MTLHeap <MTLAllocation>
@property (readonly) id<MTLDevice> device;
@property (readonly) MTLStorageMode storageMode;
@property (readonly) MTLHazardTrackingMode hazardTrackingMode;
@property (readonly) MTLHeapType type;
@property (readonly) NSUInteger size;
@property (readonly) NSUInteger usedSize;
@property (readonly) NSUInteger currentAllocatedSize;
- (NSUInteger)maxAvailableSizeWithAlignment:(NSUInteger)alignment;
- (nullable id<MTLBuffer>)newBufferWithLength:(NSUInteger)length
                                      options:(MTLResourceOptions)options;
@end

/* ---- synchronisation: MTLFence.h, MTLEvent.h --------------------------- */

@protocol MTLFence <NSObject>
@property (readonly) id<MTLDevice> device;
@end

@protocol MTLEvent <NSObject>
@property (readonly, nullable) id<MTLDevice> device;
@end

@protocol MTLSharedEvent <MTLEvent>
@property (readwrite) uint64_t signaledValue;
- (BOOL)waitUntilSignaledValue:(uint64_t)value timeoutMS:(uint64_t)milliseconds;
@end

/* ---- residency sets: MTLResidencySet.h (macOS 15 / iOS 18) ------------ */

#pragma clang assume_nonnull end
#import <Metal/MTLResidencySet.h>
#pragma clang assume_nonnull begin

/* ---- compute objects ---------------------------------------------------- */

@interface MTLCompileOptions : NSObject <NSCopying>
/* The default is YES (fast math on). */
@property (readwrite, nonatomic) BOOL fastMathEnabled
    __attribute__((availability(macos, introduced = 10.11, deprecated = 15.0,
                                message = "Use mathMode instead")))
    __attribute__((availability(ios, introduced = 8.0, deprecated = 18.0,
                                message = "Use mathMode instead")));
@property (readwrite, nonatomic) MTLMathMode mathMode MLXBUF_STUB_API_15;
@end

@protocol MTLFunction <NSObject>
@property (readonly) MTLFunctionType functionType;
@property (readonly) NSString *name;
@end

@protocol MTLLibrary <NSObject>
@property (readonly) NSArray<NSString *> *functionNames;
- (nullable id<MTLFunction>)newFunctionWithName:(NSString *)functionName;
@end

@protocol MTLComputePipelineState <NSObject>
@property (readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property (readonly) NSUInteger threadExecutionWidth;
@end

/* ---- pipeline reflection: MTLArgument.h, MTLComputePipeline.h ----------- */

MLXBUF_STUB_API_13
@protocol MTLBinding <NSObject>
@property (readonly) NSString *name;
@property (readonly) MTLBindingType type;
@property (readonly) MTLBindingAccess access;
@property (readonly) NSUInteger index;
@property (readonly, getter=isUsed) BOOL used;
@property (readonly, getter=isArgument) BOOL argument;
@end

/* bufferAlignment: the least alignment of the starting offset in the
 * buffer; bufferDataSize: sizeof(T) for a T * argument. */
MLXBUF_STUB_API_13
@protocol MTLBufferBinding <MTLBinding>
@property (readonly) NSUInteger bufferAlignment;
@property (readonly) NSUInteger bufferDataSize;
@end

@interface MTLComputePipelineReflection : NSObject
@property (readonly) NSArray<id<MTLBinding>> *bindings MLXBUF_STUB_API_13;
@end

typedef __autoreleasing MTLComputePipelineReflection *_Nullable
    MTLAutoreleasedComputePipelineReflection;

/* ---- encoders, command buffers, queues --------------------------------- */

@protocol MTLCommandEncoder <NSObject>
- (void)endEncoding;
@end

@protocol MTLBlitCommandEncoder <MTLCommandEncoder>
- (void)copyFromBuffer:(id<MTLBuffer>)sourceBuffer
          sourceOffset:(NSUInteger)sourceOffset
              toBuffer:(id<MTLBuffer>)destinationBuffer
     destinationOffset:(NSUInteger)destinationOffset
                  size:(NSUInteger)size;
- (void)fillBuffer:(id<MTLBuffer>)buffer range:(NSRange)range value:(uint8_t)value;
- (void)updateFence:(id<MTLFence>)fence;
- (void)waitForFence:(id<MTLFence>)fence;
@end

@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBuffer:(nullable id<MTLBuffer>)buffer
           offset:(NSUInteger)offset
          atIndex:(NSUInteger)index;
- (void)setBytes:(const void *)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreads:(MTLSize)threadsPerGrid
    threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
- (void)memoryBarrierWithScope:(MTLBarrierScope)scope;
- (void)updateFence:(id<MTLFence>)fence;
- (void)waitForFence:(id<MTLFence>)fence;
@end

@protocol MTLCommandQueue;

@protocol MTLCommandBuffer <NSObject>
@property (readonly) id<MTLDevice> device;
@property (readonly) id<MTLCommandQueue> commandQueue;
@property (readonly) MTLCommandBufferStatus status;
@property (nullable, readonly) NSError *error;
- (void)commit;
- (void)waitUntilCompleted;
- (void)addCompletedHandler:(MTLCommandBufferHandler)block;
- (nullable id<MTLBlitCommandEncoder>)blitCommandEncoder;
- (nullable id<MTLComputeCommandEncoder>)computeCommandEncoder;
- (void)encodeSignalEvent:(id<MTLEvent>)event value:(uint64_t)value;
- (void)encodeWaitForEvent:(id<MTLEvent>)event value:(uint64_t)value;
- (void)useResidencySet:(id<MTLResidencySet>)residencySet MLXBUF_STUB_API_15;
@end

@protocol MTLCommandQueue <NSObject>
@property (readonly) id<MTLDevice> device;
- (nullable id<MTLCommandBuffer>)commandBuffer;
- (void)addResidencySet:(id<MTLResidencySet>)residencySet MLXBUF_STUB_API_15;
- (void)removeResidencySet:(id<MTLResidencySet>)residencySet MLXBUF_STUB_API_15;
@end

/* ---- device -------------------------------------------------------------- */

@protocol MTLDevice <NSObject>
@property (readonly) NSString *name;
@property (readonly) uint64_t registryID;
@property (readonly) BOOL hasUnifiedMemory;
@property (readonly) NSUInteger maxBufferLength;
@property (readonly) uint64_t recommendedMaxWorkingSetSize;
@property (readonly) NSUInteger currentAllocatedSize;
- (BOOL)supportsFamily:(MTLGPUFamily)gpuFamily;
- (nullable id<MTLCommandQueue>)newCommandQueue;
- (nullable id<MTLBuffer>)newBufferWithLength:(NSUInteger)length
                                      options:(MTLResourceOptions)options;
- (nullable id<MTLBuffer>)
    newBufferWithBytesNoCopy:(void *)pointer
                      length:(NSUInteger)length
                     options:(MTLResourceOptions)options
                 deallocator:(void (^_Nullable)(void *pointer, NSUInteger length))deallocator;
- (nullable id<MTLHeap>)newHeapWithDescriptor:(MTLHeapDescriptor *)descriptor;
- (nullable id<MTLFence>)newFence;
- (nullable id<MTLEvent>)newEvent;
- (nullable id<MTLSharedEvent>)newSharedEvent;
- (nullable id<MTLResidencySet>)
    newResidencySetWithDescriptor:(MTLResidencySetDescriptor *)desc
                            error:(NSError **)error MLXBUF_STUB_API_15;
- (nullable id<MTLLibrary>)newLibraryWithSource:(NSString *)source
                                        options:(nullable MTLCompileOptions *)options
                                          error:(NSError **)error;
- (nullable id<MTLComputePipelineState>)
    newComputePipelineStateWithFunction:(id<MTLFunction>)computeFunction
                                  error:(NSError **)error;
- (nullable id<MTLComputePipelineState>)
    newComputePipelineStateWithFunction:(id<MTLFunction>)computeFunction
                                options:(MTLPipelineOption)options
                             reflection:(MTLAutoreleasedComputePipelineReflection *_Nullable)reflection
                                  error:(NSError **)error;
@end

/* Marked returns-retained in the SDK: the caller owns the result. Before
 * the iOS 18 SDK, MTLCopyAllDevices was macOS-only. */
extern id<MTLDevice> _Nullable MTLCreateSystemDefaultDevice(void)
    __attribute__((ns_returns_retained));
extern NSArray<id<MTLDevice>> *MTLCopyAllDevices(void)
    __attribute__((ns_returns_retained))
    __attribute__((availability(ios, introduced = 18.0)));

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_METAL_H */
