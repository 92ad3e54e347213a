/*
 * prefix.h -- included first in every Objective-C file of a simulator
 * build (clang -include), on Linux only.
 *
 * clang needs the interface of the constant-string class
 * (-fconstant-string-class=NSConstantString) in every translation unit
 * that writes an @"..." literal. Apple's SDK has no such class (its
 * literals are CoreFoundation constant strings), so the Foundation header
 * cannot declare it; this header does. The ivar layout is the one clang
 * emits for the ObjFW runtime: isa, then the bytes and their length, which
 * is why the root class keeps its reference count outside the object.
 */
#ifndef METALSIM_PREFIX_H
#define METALSIM_PREFIX_H

#ifdef __OBJC__
#import <Foundation/Foundation.h>

@interface NSConstantString : NSString {
    const char *_cString;
    unsigned int _length;
}
@end
#endif

#endif /* METALSIM_PREFIX_H */
