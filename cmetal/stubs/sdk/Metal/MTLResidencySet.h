/*
 * Stub of <Metal/MTLResidencySet.h> (macOS 15 / iOS 18 SDK) for the Linux
 * type-check only (see ../../README.md). It is a separate header, as in the
 * SDK, because metal.m detects an SDK with residency sets by
 * __has_include(<Metal/MTLResidencySet.h>). Included from Metal.h.
 */
#ifndef MLXBUF_STUB_MTLRESIDENCYSET_H
#define MLXBUF_STUB_MTLRESIDENCYSET_H

#import <Metal/Metal.h>

#pragma clang assume_nonnull begin

MLXBUF_STUB_API_15
@interface MTLResidencySetDescriptor : NSObject
@property (nullable, copy, nonatomic) NSString *label;
@end

MLXBUF_STUB_API_15
@protocol MTLResidencySet <NSObject>
- (void)requestResidency;
- (void)endResidency;
- (void)addAllocation:(id<MTLAllocation>)allocation;
- (void)removeAllocation:(id<MTLAllocation>)allocation;
- (void)removeAllAllocations;
- (void)commit;
@end

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_MTLRESIDENCYSET_H */
