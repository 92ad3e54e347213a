/*
 * NSObject.m -- the root class, built without ARC (it implements retain,
 * release and autorelease, which ARC forbids), and the constant-string
 * class whose instances clang emits for @"..." literals.
 *
 * Memory layout: clang lays a constant string out as {isa, bytes, length},
 * and NSConstantString inherits NSObject's ivars, so NSObject has only
 * isa; the reference count lives in a header just before the object.
 *
 * The ObjFW runtime does the rest: ARC's objc_retain/objc_release send
 * retain/release, objc_autorelease... sends autorelease, and
 * objc_autoreleasePoolPush/Pop keep the per-thread pools.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "sim.h"

id objc_constructInstance(Class cls, void *bytes);
void *objc_destructInstance(id obj);
unsigned long class_getInstanceSize(Class cls);
Class class_getSuperclass(Class cls);
bool class_respondsToSelector(Class cls, SEL sel);
id _objc_rootAutorelease(id obj);
typedef id (*msim_imp_t)(id, SEL, ...);
void objc_setForwardHandler(msim_imp_t forward, msim_imp_t forward_stret);
void objc_setUncaughtExceptionHandler(void (*handler)(id));

/* 16 bytes keep the object itself 16-byte aligned, as malloc's was. */
typedef struct msim_header {
    atomic_size_t refcount;
    size_t pad;
} msim_header_t;

static atomic_uint_fast64_t live_objects;

static inline msim_header_t *header_of(id obj)
{
    return (msim_header_t *)(void *)obj - 1;
}

NSUInteger msim__retain_count(id obj)
{
    return obj ? (NSUInteger)atomic_load(&header_of(obj)->refcount) : 0;
}

uint64_t msim__live_objects(void)
{
    return atomic_load(&live_objects);
}

@implementation NSObject

+ (void)initialize
{
}

+ (instancetype)alloc
{
    msim_header_t *h = calloc(1, sizeof *h + class_getInstanceSize(self));
    if (!h)
        return nil;
    atomic_init(&h->refcount, 1);
    atomic_fetch_add(&live_objects, 1);
    return objc_constructInstance(self, h + 1);
}

+ (instancetype)new
{
    return [[self alloc] init];
}

+ (Class)class
{
    return self;
}

/* Class objects are not reference counted. */
+ (id)retain
{
    return self;
}

+ (oneway void)release
{
}

+ (id)autorelease
{
    return self;
}

- (instancetype)init
{
    return self;
}

- (instancetype)retain
{
    atomic_fetch_add_explicit(&header_of(self)->refcount, 1, memory_order_relaxed);
    return self;
}

- (oneway void)release
{
    if (atomic_fetch_sub_explicit(&header_of(self)->refcount, 1, memory_order_acq_rel) == 1)
        [self dealloc];
}

- (instancetype)autorelease
{
    return _objc_rootAutorelease(self);
}

- (NSUInteger)retainCount
{
    return msim__retain_count(self);
}

- (void)dealloc
{
    /* Runs ARC's ivar cleanup (.cxx_destruct) of every class in the chain. */
    objc_destructInstance(self);
    atomic_fetch_sub(&live_objects, 1);
    free(header_of(self));
}

- (BOOL)respondsToSelector:(SEL)selector
{
    return class_respondsToSelector(object_getClass(self), selector) ? YES : NO;
}

- (BOOL)isKindOfClass:(Class)cls
{
    for (Class c = object_getClass(self); c; c = class_getSuperclass(c))
        if (c == cls)
            return YES;
    return NO;
}

- (id)copy
{
    return [(id<NSCopying>)self copyWithZone:NULL];
}

@end

@implementation NSConstantString

/* Constant strings live in the binary's data: no reference count. */
- (instancetype)retain
{
    return self;
}

- (oneway void)release
{
}

- (instancetype)autorelease
{
    return self;
}

- (NSUInteger)retainCount
{
    return (NSUInteger)-1;
}

- (const char *)UTF8String
{
    return _cString;
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    return self;
}

@end

/* ---- the runtime's hooks ----------------------------------------------------- */

/* Apple's runtime answers an unknown selector with NSInvalidArgumentException
 * ("unrecognized selector sent to instance"); ObjFW's default would abort
 * the process. */
static id msim_forward(id self, SEL cmd, ...)
{
    msim__raise(NSInvalidArgumentException, "-[%s %s]: unrecognized selector sent to instance %p",
                class_getName(object_getClass(self)), sel_getName(cmd), (void *)self);
}

static void msim_uncaught(id exception)
{
    NSException *e = exception;
    const char *name = "?", *reason = "";
    if ([e isKindOfClass:[NSException class]]) {
        name = e.name.UTF8String;
        reason = e.reason ? e.reason.UTF8String : "";
    }
    fprintf(stderr, "metalsim: uncaught Objective-C exception %s: %s\n", name, reason);
    abort();
}

void msim__install_runtime_hooks(void)
{
    objc_setForwardHandler(msim_forward, msim_forward);
    objc_setUncaughtExceptionHandler(msim_uncaught);
}
