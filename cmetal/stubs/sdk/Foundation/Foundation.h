/*
 * <Foundation/Foundation.h> as far as mlxbuf needs it (see ../../README.md):
 * the Linux type-check of the Objective-C in cmetal/ compiles against it,
 * and the simulated Metal (metalsim/) implements it, so these declarations
 * are real headers on Linux. Every declaration is Apple's API, with the SDK's
 * types; types follow Darwin on 64-bit Apple targets.
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

/* The SDK's OBJC_ARC_UNAVAILABLE: reference counting by hand is an error
 * under ARC; only the root class's own file (built without ARC) sees
 * these methods. */
#if __has_feature(objc_arc)
#define MLXBUF_STUB_ARC_UNAVAILABLE \
    __attribute__((unavailable("not available in automatic reference counting mode")))
#else
#define MLXBUF_STUB_ARC_UNAVAILABLE
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

typedef struct {
    NSInteger majorVersion;
    NSInteger minorVersion;
    NSInteger patchVersion;
} NSOperatingSystemVersion;

typedef struct _NSZone NSZone;

@class NSString, NSDictionary;

typedef NSString *NSErrorDomain;
typedef NSString *NSExceptionName;

@protocol NSObject
- (BOOL)respondsToSelector:(SEL)aSelector;
- (BOOL)isKindOfClass:(Class)aClass;
- (instancetype)retain MLXBUF_STUB_ARC_UNAVAILABLE;
- (oneway void)release MLXBUF_STUB_ARC_UNAVAILABLE;
- (instancetype)autorelease MLXBUF_STUB_ARC_UNAVAILABLE;
- (NSUInteger)retainCount MLXBUF_STUB_ARC_UNAVAILABLE;
@end

@protocol NSCopying
- (id)copyWithZone:(nullable NSZone *)zone;
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject> {
    Class isa;
}
+ (void)initialize;
+ (instancetype)alloc;
+ (instancetype)new;
+ (Class)class;
- (instancetype)init;
- (void)dealloc;
- (id)copy;
@end

@interface NSString : NSObject <NSCopying>
+ (nullable instancetype)stringWithCString:(const char *)cString
                                  encoding:(NSStringEncoding)enc;
/* The SDK marks it NS_RETURNS_INNER_POINTER: ARC then keeps the string
 * alive until the enclosing autorelease pool drains. */
@property (nullable, readonly) const char *UTF8String
    __attribute__((objc_returns_inner_pointer));
- (BOOL)isEqualToString:(NSString *)aString;
@end

@interface NSArray<__covariant ObjectType> : NSObject <NSCopying>
+ (instancetype)arrayWithObjects:(const ObjectType _Nonnull[_Nullable])objects
                           count:(NSUInteger)cnt;
@property (readonly) NSUInteger count;
- (ObjectType)objectAtIndex:(NSUInteger)index;
@end

@interface NSError : NSObject <NSCopying>
@property (readonly, copy) NSErrorDomain domain;
@property (readonly) NSInteger code;
@property (readonly, copy) NSString *localizedDescription;
@end

@interface NSException : NSObject <NSCopying>
+ (NSException *)exceptionWithName:(NSExceptionName)name
                            reason:(nullable NSString *)reason
                          userInfo:(nullable NSDictionary *)userInfo;
- (void)raise;
@property (readonly, copy) NSExceptionName name;
@property (nullable, readonly, copy) NSString *reason;
@end

extern NSExceptionName const NSInvalidArgumentException;
extern NSExceptionName const NSRangeException;
extern NSExceptionName const NSInternalInconsistencyException;

@interface NSProcessInfo : NSObject
@property (class, readonly, strong) NSProcessInfo *processInfo;
- (BOOL)isOperatingSystemAtLeastVersion:(NSOperatingSystemVersion)version;
@end

#pragma clang assume_nonnull end

#endif /* MLXBUF_STUB_FOUNDATION_H */
