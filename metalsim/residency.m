/*
 * residency.m -- MTLResidencySetDescriptor and MTLResidencySet (macOS 15).
 *
 * Rules modelled (Apple's MTLResidencySet documentation; where it is
 * silent, the conservative reading):
 * - addAllocation:/removeAllocation: only stage; commit applies them.
 *   allAllocations, allocationCount and allocatedSize describe the
 *   committed state; containsAllocation: sees staged changes too.
 * - One membership per allocation object: a duplicate add is ignored, one
 *   remove ends the membership however many adds came before.
 * - The set holds a strong reference to every staged or committed member
 *   until its removal is committed (allAllocations hands the objects back,
 *   so the set must keep them): memory released by its owner stays held.
 * - A buffer sub-allocated from a heap makes the whole heap resident.
 * - Not thread-safe: two threads inside calls on one set at once is a
 *   validation error.
 * - On simulated macOS 14 the API is absent.
 */
#include <stdlib.h>
#include <string.h>

#include "sim.h"

static bool residency_api_present(const char *what)
{
    int major = msim__config().macos_major;
    if (major >= 15)
        return true;
    msim__invalid("macos15-api", "%s used on simulated macOS %d: the residency-set API needs "
                  "macOS 15", what, major);
    return false;
}

@implementation MTLResidencySetDescriptor {
    NSString *_label;
    NSUInteger _initialCapacity;
}

/* On macOS 14 the class does not exist: a weak-linked reference is nil,
 * and a message to nil gives nil. */
+ (instancetype)alloc
{
    if (!residency_api_present("MTLResidencySetDescriptor"))
        return nil;
    return [super alloc];
}

- (NSString *)label { return _label; }
- (void)setLabel:(NSString *)label { _label = [label copy]; }
- (NSUInteger)initialCapacity { return _initialCapacity; }
- (void)setInitialCapacity:(NSUInteger)n { _initialCapacity = n; }

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    MTLResidencySetDescriptor *c = [[MTLResidencySetDescriptor alloc] init];
    c->_label = _label;
    c->_initialCapacity = _initialCapacity;
    return c;
}

@end

/* Give back a reference taken with __bridge_retained. */
static void drop_ref(void *p)
{
    id obj = (__bridge_transfer id)p;
    (void)obj;
}

/* One allocation the set knows: committed, and/or with a staged change.
 * The set holds a +1 reference on obj while the entry exists. */
typedef struct msim_member {
    void *obj;
    bool committed;
    int staged;                       /* +1 add, -1 remove, 0 none */
} msim_member_t;

@implementation MSimResidencySet {
    MSimDevice *_device;
    NSString *_label;
    msim_member_t *_members;
    size_t _count, _cap;
    size_t *_index;                   /* open addressing: member index + 1 */
    size_t _indexCap;
    NSUInteger _committedCount;
    uint64_t _committedSize;
    BOOL _resident;
    _Atomic(uintptr_t) _owner;        /* thread inside a call, 0 if none */
    _Atomic(const char *) _ownerCall;
}

- (instancetype)initWithDevice:(MSimDevice *)device
                    descriptor:(MTLResidencySetDescriptor *)descriptor
{
    self = [super init];
    _device = device;
    _label = descriptor.label;
    MSIM_COUNT(residency_sets_live, 1);
    return self;
}

- (void)dealloc
{
    msim__lock();
    for (size_t i = 0; i < _count; i++)
        if ([(__bridge id)_members[i].obj isKindOfClass:[MSimBuffer class]]) {
            MSimBuffer *b = (__bridge MSimBuffer *)_members[i].obj;
            b.setRefs = b.setRefs - 1;
        }
    msim__unlock();
    for (size_t i = 0; i < _count; i++)
        drop_ref(_members[i].obj);
    free(_members);
    free(_index);
    MSIM_UNCOUNT(residency_members, _committedCount);
    MSIM_UNCOUNT(residency_sets_live, 1);
}

/* ---- thread-safety check --------------------------------------------------------------- */

- (void)msim_enter:(SEL)cmd
{
    uintptr_t me = (uintptr_t)pthread_self(), expected = 0;
    if (!atomic_compare_exchange_strong(&_owner, &expected, me) && expected != me) {
        msim__invalid("residency-threads",
                      "-[MTLResidencySet %s] on set '%s' while another thread is inside "
                      "-[MTLResidencySet %s]: residency sets are not thread-safe",
                      sel_getName(cmd), _label ? _label.UTF8String : "", atomic_load(&_ownerCall));
        return;
    }
    atomic_store(&_ownerCall, sel_getName(cmd));
}

- (void)msim_exit
{
    uintptr_t me = (uintptr_t)pthread_self();
    atomic_compare_exchange_strong(&_owner, &me, 0);
}

#define SET_BEGIN()               \
    MSIM_ENTRY();                 \
    [self msim_enter:_cmd]
#define SET_END() [self msim_exit]

/* ---- the member table ---------------------------------------------------------------- */

static size_t slot_of(const void *p, size_t cap)
{
    uint64_t h = (uint64_t)(uintptr_t)p;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return (size_t)h & (cap - 1);
}

- (void)msim_reindex
{
    size_t cap = 16;
    while (cap < _count * 2 + 2)
        cap *= 2;
    size_t *index = calloc(cap, sizeof *index);
    if (!index)
        msim__raise(NSInternalInconsistencyException, "cannot grow a residency set's index");
    for (size_t i = 0; i < _count; i++) {
        size_t s = slot_of(_members[i].obj, cap);
        while (index[s])
            s = (s + 1) & (cap - 1);
        index[s] = i + 1;
    }
    free(_index);
    _index = index;
    _indexCap = cap;
}

/* The member index of obj, or -1. */
- (long)msim_find:(id)obj
{
    if (!_indexCap)
        return -1;
    void *p = (__bridge void *)obj;
    for (size_t s = slot_of(p, _indexCap); _index[s]; s = (s + 1) & (_indexCap - 1))
        if (_members[_index[s] - 1].obj == p)
            return (long)(_index[s] - 1);
    return -1;
}

- (void)msim_insert:(id)obj staged:(int)staged
{
    if (_count == _cap) {
        size_t cap = _cap ? _cap * 2 : 16;
        msim_member_t *m = realloc(_members, cap * sizeof *m);
        if (!m)
            msim__raise(NSInternalInconsistencyException, "cannot grow a residency set");
        _members = m;
        _cap = cap;
    }
    _members[_count++] = (msim_member_t){(__bridge_retained void *)obj, false, staged};
    if (_count * 2 + 2 > _indexCap)
        [self msim_reindex];
    else {
        size_t s = slot_of(_members[_count - 1].obj, _indexCap);
        while (_index[s])
            s = (s + 1) & (_indexCap - 1);
        _index[s] = _count;
    }
    if ([obj isKindOfClass:[MSimBuffer class]]) {
        msim__lock();
        ((MSimBuffer *)obj).setRefs += 1;
        msim__unlock();
    }
}

/* Drop the members whose entries ended; their references go after the
 * bookkeeping, outside the simulator lock (a release may deallocate). */
- (void)msim_compact
{
    size_t kept = 0, dropped = 0;
    void **gone = NULL;
    for (size_t i = 0; i < _count; i++)
        if (!_members[i].committed && _members[i].staged != 1)
            dropped++;
    if (!dropped)
        return;
    gone = malloc(dropped * sizeof *gone);
    if (!gone)
        msim__raise(NSInternalInconsistencyException, "cannot compact a residency set");
    dropped = 0;
    msim__lock();
    for (size_t i = 0; i < _count; i++) {
        msim_member_t m = _members[i];
        if (!m.committed && m.staged != 1) {
            if ([(__bridge id)m.obj isKindOfClass:[MSimBuffer class]]) {
                MSimBuffer *b = (__bridge MSimBuffer *)m.obj;
                b.setRefs = b.setRefs - 1;
            }
            gone[dropped++] = m.obj;
        } else {
            _members[kept++] = m;
        }
    }
    msim__unlock();
    _count = kept;
    [self msim_reindex];
    for (size_t i = 0; i < dropped; i++)
        drop_ref(gone[i]);
    free(gone);
}

static bool staged_member(const msim_member_t *m)
{
    return m->staged == 1 || (m->committed && m->staged != -1);
}

- (void)msim_stageRemove:(long)i
{
    if (i < 0 || !staged_member(&_members[i]))
        return;
    _members[i].staged = _members[i].committed ? -1 : 0;
}

/* ---- MTLResidencySet ----------------------------------------------------------------- */

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (NSString *)label
{
    MSIM_ENTRY();
    return _label;
}

- (void)addAllocation:(id<MTLAllocation>)allocation
{
    SET_BEGIN();
    MSIM_COUNT(residency_adds, 1);
    long i = [self msim_find:allocation];
    if (i < 0)
        [self msim_insert:allocation staged:1];
    else if (_members[i].staged == -1)
        _members[i].staged = 0;
    /* else: already a member (staged or committed): ignored. */
    SET_END();
}

- (void)removeAllocation:(id<MTLAllocation>)allocation
{
    SET_BEGIN();
    MSIM_COUNT(residency_removes, 1);
    [self msim_stageRemove:[self msim_find:allocation]];
    [self msim_compact];
    SET_END();
}

- (void)removeAllAllocations
{
    SET_BEGIN();
    for (size_t i = 0; i < _count; i++)
        [self msim_stageRemove:(long)i];
    [self msim_compact];
    SET_END();
}

- (BOOL)containsAllocation:(id<MTLAllocation>)allocation
{
    SET_BEGIN();
    long i = [self msim_find:allocation];
    BOOL in = i >= 0 && staged_member(&_members[i]);
    SET_END();
    return in;
}

- (void)commit
{
    SET_BEGIN();
    MSIM_COUNT(residency_commits, 1);
    NSUInteger before = _committedCount, count = 0;
    for (size_t i = 0; i < _count; i++) {
        if (_members[i].staged == 1)
            _members[i].committed = true;
        else if (_members[i].staged == -1)
            _members[i].committed = false;
        _members[i].staged = 0;
    }
    [self msim_compact];
    /* allocatedSize: each buffer's pages, and each heap (whether added or
     * reached through one of its buffers) once. */
    uint64_t size = 0;
    MSimList *heaps = [[MSimList alloc] init];
    for (size_t i = 0; i < _count; i++) {
        id obj = (__bridge id)_members[i].obj;
        count++;
        MSimHeap *heap = nil;
        if ([obj isKindOfClass:[MSimHeap class]])
            heap = obj;
        else if ([obj isKindOfClass:[MSimBuffer class]] && ((MSimBuffer *)obj).msimHeap)
            heap = ((MSimBuffer *)obj).msimHeap;
        if (heap) {
            if (![heaps containsIdentical:heap]) {
                [heaps add:heap];
                size += heap.msimSize;
            }
        } else if ([obj isKindOfClass:[MSimBuffer class]]) {
            size += ((MSimBuffer *)obj).msimAllocatedSize;
        }
    }
    _committedCount = count;
    _committedSize = size;
    if (count >= before)
        MSIM_COUNT(residency_members, count - before);
    else
        MSIM_UNCOUNT(residency_members, before - count);
    SET_END();
}

- (uint64_t)allocatedSize
{
    SET_BEGIN();
    uint64_t n = _committedSize;
    SET_END();
    return n;
}

- (NSUInteger)allocationCount
{
    SET_BEGIN();
    NSUInteger n = _committedCount;
    SET_END();
    return n;
}

- (NSArray<id<MTLAllocation>> *)allAllocations
{
    SET_BEGIN();
    MSimList *list = [[MSimList alloc] init];
    for (size_t i = 0; i < _count; i++)
        if (_members[i].committed)
            [list add:(__bridge id)_members[i].obj];
    SET_END();
    return list.array;
}

- (void)requestResidency
{
    SET_BEGIN();
    MSIM_COUNT(residency_requests, 1);
    _resident = YES;
    SET_END();
}

- (void)endResidency
{
    SET_BEGIN();
    _resident = NO;
    SET_END();
}

@end
