/*
 * <Metal/MTLResidencySet.h> (macOS 15 / iOS 18 SDK) as far as mlxbuf
 * needs it (see ../../README.md). It is a separate header, as in the SDK,
 * because metal.m detects an SDK with residency sets by
 * __has_include(<Metal/MTLResidencySet.h>). Included from Metal.h.
 */
#ifndef MLXBUF_STUB_MTLRESIDENCYSET_H
#define MLXBUF_STUB_MTLRESIDENCYSET_H

#import <Metal/Metal.h>

#pragma clang assume_nonnull begin

MLXBUF_STUB_API_15
@interface MTLResidencySetDescriptor : NSObject <NSCopying>
@property (nullable, copy, nonatomic) NSString *label;
@property (nonatomic) NSUInteger initialCapacity;
@end

/* Not thread-safe: Apple's documentation asks callers to serialise every
 * call on one set. */
MLXBUF_STUB_API_15
@protocol MTLResidencySet <NSObject>
@property (readonly) id<MTLDevice> device;
@property (readonly, nullable) NSString *label;
/* Refreshed at commit. */
@property (readonly) uint64_t allocatedSize;
@property (readonly) NSUInteger allocationCount;
@property (readonly, copy) NSArray<id<MTLAllocation>> *allAllocations;
- (void)requestResidency;
- (void)endResidency;
- (void)addAllocation:(id<MTLAllocation>)allocation;
- (void)removeAllocation:(id<MTLAllocation>)allocation;
- (void)removeAllAllocations;
- (BOOL)containsAllocation:(id<MTLAllocation>)anAllocation;
- (void)commit;
@end

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_MTLRESIDENCYSET_H */
