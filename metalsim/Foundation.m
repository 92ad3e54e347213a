/*
 * Foundation.m -- the Foundation classes metal.m and the simulator use:
 * NSString (immutable UTF-8), NSArray (immutable), NSError, NSException
 * and NSProcessInfo, with Apple's observable behaviour where metal.m can
 * see it (stringWithCString:encoding: returns nil for invalid UTF-8,
 * objectAtIndex: raises NSRangeException, NSProcessInfo reports the
 * simulated macOS version).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

NSExceptionName const NSInvalidArgumentException = @"NSInvalidArgumentException";
NSExceptionName const NSRangeException = @"NSRangeException";
NSExceptionName const NSInternalInconsistencyException = @"NSInternalInconsistencyException";

/* ---- NSString ------------------------------------------------------------------ */

/* A string that owns a NUL-terminated UTF-8 copy. NSString itself has no
 * ivars, so that NSConstantString keeps the layout clang emits. */
@interface MSimString : NSString {
    char *_bytes;
}
- (instancetype)initWithBytes:(const char *)bytes length:(size_t)length;
@end

/* Well-formed UTF-8 (no overlong forms, no surrogates, at most U+10FFFF). */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        static const uint32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_for_len[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += len;
    }
    return true;
}

@implementation NSString

+ (instancetype)stringWithCString:(const char *)cString encoding:(NSStringEncoding)enc
{
    if (!cString || enc != NSUTF8StringEncoding)
        return nil;
    size_t n = strlen(cString);
    if (!valid_utf8((const unsigned char *)cString, n))
        return nil;
    return [[MSimString alloc] initWithBytes:cString length:n];
}

+ (NSString *)msim_stringWithFormat:(const char *)fmt, ...
{
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    if (n < 0)
        return @"(out of memory formatting a message)";
    NSString *s = [[MSimString alloc] initWithBytes:text length:(size_t)n];
    free(text);
    return s;
}

- (const char *)UTF8String
{
    return NULL;
}

- (BOOL)isEqualToString:(NSString *)other
{
    const char *a = self.UTF8String, *b = other.UTF8String;
    return a && b && strcmp(a, b) == 0;
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    return self;
}

@end

@implementation MSimString

- (instancetype)initWithBytes:(const char *)bytes length:(size_t)length
{
    self = [super init];
    _bytes = malloc(length + 1);
    if (!_bytes)
        return nil;
    memcpy(_bytes, bytes, length);
    _bytes[length] = '\0';
    return self;
}

- (void)dealloc
{
    free(_bytes);
}

- (const char *)UTF8String
{
    return _bytes;
}

@end

/* ---- NSArray -------------------------------------------------------------------- */

@implementation NSArray {
    __strong id *_objects;
    NSUInteger _count;
}

+ (instancetype)arrayWithObjects:(const id _Nonnull[])objects count:(NSUInteger)cnt
{
    NSArray *a = [[self alloc] init];
    if (cnt) {
        a->_objects = (__strong id *)calloc(cnt, sizeof(id));
        if (!a->_objects)
            msim__raise(NSInternalInconsistencyException, "cannot allocate an array of %lu objects",
                        (unsigned long)cnt);
        for (NSUInteger i = 0; i < cnt; i++)
            a->_objects[i] = objects[i];
        a->_count = cnt;
    }
    return a;
}

- (void)dealloc
{
    for (NSUInteger i = 0; i < _count; i++)
        _objects[i] = nil;
    free(_objects);
}

- (NSUInteger)count
{
    return _count;
}

- (id)objectAtIndex:(NSUInteger)index
{
    if (index >= _count)
        msim__raise(NSRangeException, "-[NSArray objectAtIndex:]: index %lu beyond bounds [0 .. %ld]",
                    (unsigned long)index, (long)_count - 1);
    return _objects[index];
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    return self;
}

@end

/* ---- NSError -------------------------------------------------------------------- */

@implementation NSError {
    NSString *_domain;
    NSInteger _code;
    NSString *_description;
}

+ (NSError *)msim_errorWithDomain:(NSErrorDomain)domain
                             code:(NSInteger)code
                      description:(NSString *)description
{
    NSError *e = [[self alloc] init];
    e->_domain = domain;
    e->_code = code;
    e->_description = description;
    return e;
}

- (NSErrorDomain)domain
{
    return _domain;
}

- (NSInteger)code
{
    return _code;
}

- (NSString *)localizedDescription
{
    return _description;
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    return self;
}

@end

/* ---- NSException ------------------------------------------------------------------ */

@implementation NSException {
    NSExceptionName _name;
    NSString *_reason;
}

+ (NSException *)exceptionWithName:(NSExceptionName)name
                            reason:(NSString *)reason
                          userInfo:(NSDictionary *)userInfo
{
    (void)userInfo;
    NSException *e = [[self alloc] init];
    e->_name = name;
    e->_reason = reason;
    return e;
}

- (void)raise
{
    @throw self;
}

- (NSExceptionName)name
{
    return _name;
}

- (NSString *)reason
{
    return _reason;
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    return self;
}

@end

void msim__raise(NSExceptionName name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    int n = vasprintf(&text, fmt, ap);
    va_end(ap);
    NSString *reason = n >= 0 ? [NSString stringWithCString:text encoding:NSUTF8StringEncoding] : nil;
    free(text);
    @throw [NSException exceptionWithName:name reason:reason userInfo:nil];
}

/* ---- NSProcessInfo ----------------------------------------------------------------- */

@implementation NSProcessInfo

static NSProcessInfo *shared_process_info;
static pthread_once_t process_info_once = PTHREAD_ONCE_INIT;

static void make_process_info(void)
{
    shared_process_info = [[NSProcessInfo alloc] init];
}

+ (NSProcessInfo *)processInfo
{
    pthread_once(&process_info_once, make_process_info);
    return shared_process_info;
}

/* The simulated macOS: major.0.0 of the configured version. */
- (BOOL)isOperatingSystemAtLeastVersion:(NSOperatingSystemVersion)version
{
    NSInteger major = msim__config().macos_major;
    if (major != version.majorVersion)
        return major > version.majorVersion;
    return version.minorVersion <= 0 && version.patchVersion <= 0;
}

@end
