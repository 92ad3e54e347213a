/*
 * Stub of <Foundation/Foundation.h> for the Linux type-check of cmetal/*.m
 * (see ../../README.md). Declares only what metal.m uses; never used to
 * build. Types follow Darwin on 64-bit Apple targets.
 */
#ifndef MLXBUF_STUB_FOUNDATION_H
#define MLXBUF_STUB_FOUNDATION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef long NSInteger;
typedef unsigned long NSUInteger;

/* BOOL is C bool on arm64 Apple targets and signed char on x86_64. */
#if defined(__arm64__) || defined(__aarch64__)
typedef bool BOOL;
#else
typedef signed char BOOL;
#endif
#define YES ((BOOL)1)
#define NO ((BOOL)0)

#ifndef nil
#define nil ((void *)0)
#endif

#pragma clang assume_nonnull begin

typedef struct _NSRange {
    NSUInteger location;
    NSUInteger length;
} NSRange;

typedef NSUInteger NSStringEncoding;
enum : NSStringEncoding {
    NSUTF8StringEncoding = 4,
};

@class NSString;

@protocol NSObject
- (BOOL)respondsToSelector:(SEL)aSelector;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)alloc;
- (instancetype)init;
@end

@interface NSString : NSObject
+ (nullable instancetype)stringWithCString:(const char *)cString
                                  encoding:(NSStringEncoding)enc;
/* The SDK marks it NS_RETURNS_INNER_POINTER: ARC then keeps the string
 * alive until the enclosing autorelease pool drains. */
@property (nullable, readonly) const char *UTF8String
    __attribute__((objc_returns_inner_pointer));
@end

@interface NSArray<__covariant ObjectType> : NSObject
@property (readonly) NSUInteger count;
- (ObjectType)objectAtIndex:(NSUInteger)index;
@end

@interface NSError : NSObject
@property (readonly) NSInteger code;
@property (readonly, copy) NSString *localizedDescription;
@end

@interface NSException : NSObject
@property (readonly, copy) NSString *name;
@property (nullable, readonly, copy) NSString *reason;
@end

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_FOUNDATION_H */
