/*
 * Stub of <Metal/Metal.h> for the Linux type-check of cmetal/*.m (see
 * ../../README.md). Declares exactly what metal.m sends, with the SDK's
 * types, nullability, enum raw values and availability; never used to
 * build. Sources: METAL_FACTS.md (the team's Metal facts sheet), metal-cpp for macOS 15 and
 * 26 (MTLHeaderBridge.hpp selector strings, MTL*.hpp signatures).
 */
#ifndef MLXBUF_STUB_METAL_H
#define MLXBUF_STUB_METAL_H

#import <Foundation/Foundation.h>

/* The residency-set API is macOS 15 / iOS 18 (MTLResidencySet.h,
 * MTLAllocation.h, and per method in MTLDevice.h / MTLCommandQueue.h). */
#define MLXBUF_STUB_API_15 \
    __attribute__((availability(macos, introduced = 15.0))) \
    __attribute__((availability(ios, introduced = 18.0)))

#pragma clang assume_nonnull begin

/* ---- types and enums (MTLTypes.h, MTLResource.h, ...) ---------------- */

typedef struct {
    NSUInteger width, height, depth;
} MTLSize;

typedef NSUInteger MTLResourceOptions;
enum : MTLResourceOptions {
    MTLResourceCPUCacheModeDefaultCache = 0,
    MTLResourceStorageModeShared = 0,
    MTLResourceStorageModeManaged = 1UL << 4,
    MTLResourceStorageModePrivate = 2UL << 4,
    MTLResourceHazardTrackingModeDefault = 0,
};

typedef enum MTLStorageMode : NSUInteger MTLStorageMode;
enum MTLStorageMode : NSUInteger {
    MTLStorageModeShared = 0,
    MTLStorageModeManaged = 1,
    MTLStorageModePrivate = 2,
    MTLStorageModeMemoryless = 3,
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

typedef enum MTLGPUFamily : NSInteger MTLGPUFamily;
enum MTLGPUFamily : NSInteger {
    MTLGPUFamilyApple6 = 1006,
};

@protocol MTLDevice;
@protocol MTLCommandBuffer;

typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);

/* ---- resources --------------------------------------------------------- */

MLXBUF_STUB_API_15
@protocol MTLAllocation <NSObject>
@end

@protocol MTLResource <MTLAllocation>
@property (readonly) id<MTLDevice> device;
@property (readonly) MTLStorageMode storageMode;
@end

@protocol MTLBuffer <MTLResource>
@property (readonly) NSUInteger length;
- (void *)contents __attribute__((objc_returns_inner_pointer));
@end

/* ---- residency sets: MTLResidencySet.h (macOS 15 / iOS 18) ------------ */

#pragma clang assume_nonnull end
#import <Metal/MTLResidencySet.h>
#pragma clang assume_nonnull begin

/* ---- compute objects ---------------------------------------------------- */

@interface MTLCompileOptions : NSObject
@end

@protocol MTLFunction <NSObject>
@property (readonly) MTLFunctionType functionType;
@end

@protocol MTLLibrary <NSObject>
@property (readonly) NSArray<NSString *> *functionNames;
- (nullable id<MTLFunction>)newFunctionWithName:(NSString *)functionName;
@end

@protocol MTLComputePipelineState <NSObject>
@property (readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property (readonly) NSUInteger threadExecutionWidth;
@end

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
@end

@protocol MTLCommandBuffer <NSObject>
@property (readonly) MTLCommandBufferStatus status;
@property (nullable, readonly) NSError *error;
- (void)commit;
- (void)addCompletedHandler:(MTLCommandBufferHandler)block;
- (nullable id<MTLBlitCommandEncoder>)blitCommandEncoder;
- (nullable id<MTLComputeCommandEncoder>)computeCommandEncoder;
@end

@protocol MTLCommandQueue <NSObject>
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
- (nullable id<MTLResidencySet>)
    newResidencySetWithDescriptor:(MTLResidencySetDescriptor *)desc
                            error:(NSError **)error MLXBUF_STUB_API_15;
- (nullable id<MTLLibrary>)newLibraryWithSource:(NSString *)source
                                        options:(nullable MTLCompileOptions *)options
                                          error:(NSError **)error;
- (nullable id<MTLComputePipelineState>)
    newComputePipelineStateWithFunction:(id<MTLFunction>)computeFunction
                                  error:(NSError **)error;
@end

/* Marked returns-retained in the SDK: the caller owns the device. */
extern id<MTLDevice> _Nullable MTLCreateSystemDefaultDevice(void)
    __attribute__((ns_returns_retained));

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_METAL_H */
