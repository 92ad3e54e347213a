/*
 * list.m -- MSimList, a growable array of strong references: the one
 * container the simulator needs (pending residency operations, passes,
 * commands, completion handlers).
 */
#include <stdlib.h>

#include "sim.h"

@implementation MSimList {
    __strong id *_items;
    NSUInteger _count, _cap;
}

- (void)dealloc
{
    [self removeAll];
    free(_items);
}

- (NSUInteger)count
{
    return _count;
}

- (void)add:(id)object
{
    if (_count == _cap) {
        NSUInteger cap = _cap ? _cap * 2 : 8;
        __strong id *items = (__strong id *)calloc(cap, sizeof(id));
        if (!items)
            msim__raise(NSInternalInconsistencyException, "cannot grow a list to %lu items",
                        (unsigned long)cap);
        for (NSUInteger i = 0; i < _count; i++) {
            items[i] = _items[i];
            _items[i] = nil;
        }
        free(_items);
        _items = items;
        _cap = cap;
    }
    _items[_count++] = object;
}

- (id)at:(NSUInteger)index
{
    if (index >= _count)
        msim__raise(NSRangeException, "MSimList index %lu beyond %lu items", (unsigned long)index,
                    (unsigned long)_count);
    return _items[index];
}

- (void)removeAt:(NSUInteger)index
{
    if (index >= _count)
        msim__raise(NSRangeException, "MSimList index %lu beyond %lu items", (unsigned long)index,
                    (unsigned long)_count);
    for (NSUInteger i = index; i + 1 < _count; i++)
        _items[i] = _items[i + 1];
    _items[--_count] = nil;
}

- (void)removeAll
{
    while (_count)
        _items[--_count] = nil;
}

- (BOOL)containsIdentical:(id)object
{
    for (NSUInteger i = 0; i < _count; i++)
        if (_items[i] == object)
            return YES;
    return NO;
}

- (NSArray *)array
{
    return [NSArray arrayWithObjects:_items count:_count];
}

@end
