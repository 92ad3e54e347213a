/*
 * buffer.m -- MTLBuffer: device allocations, no-copy wraps of caller
 * memory, and heap sub-allocations.
 *
 * Rules modelled (Apple's documentation of MTLDevice and MTLBuffer):
 * - newBufferWithLength:options: gives zero-filled memory aligned to the
 *   simulated 16 KiB page; length is what was asked for, allocatedSize
 *   whole pages. Length 0 or above maxBufferLength gives nil.
 * - contents is NULL for Private storage.
 * - newBufferWithBytesNoCopy: needs a pointer aligned to the process's VM
 *   page and a length of whole pages; anything else is nil and a
 *   validation error. The deallocator block runs exactly once, when the
 *   last reference goes, on the thread that drops it.
 * - A buffer may outlive its creator's release: command buffers and
 *   residency sets hold it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sim.h"

uint64_t msim__round_up(uint64_t n, uint64_t to)
{
    if (n > UINT64_MAX - (to - 1))
        return 0;
    return (n + to - 1) & ~(to - 1);
}

/* Live buffers, for residency_held_bytes (guarded by the simulator lock). */
static __unsafe_unretained MSimBuffer *live_head;

@implementation MSimBuffer {
    MSimDevice *_device;
    MSimHeap *_heap;
    NSUInteger _length, _allocated, _heapOffset;
    MTLResourceOptions _options;
    uint8_t *_bytes;
    void *_map;                      /* our own mapping (not no-copy)   */
    size_t _mapLength;
    BOOL _noCopy, _readOnly;
    void (^_deallocator)(void *, NSUInteger);
    uint64_t _serial;
    NSUInteger _setRefs;
    MSimList *_accesses;
    __unsafe_unretained MSimBuffer *_prev;
    __unsafe_unretained MSimBuffer *_next;
}

static MTLStorageMode storage_of(MTLResourceOptions options)
{
    return (MTLStorageMode)((options >> 4) & 0xF);
}

static MTLHazardTrackingMode hazard_of(MTLResourceOptions options)
{
    return (MTLHazardTrackingMode)((options >> 8) & 0x3);
}

- (void)msim_registerLive
{
    _serial = MSIM_SERIAL();
    msim__lock();
    _next = live_head;
    if (live_head)
        live_head->_prev = self;
    live_head = self;
    msim__unlock();
    MSIM_COUNT(live_buffers, 1);
    MSIM_COUNT(buffers_created, 1);
    if (!_heap) {
        MSIM_COUNT(live_bytes, _allocated);
        [_device msim_allocated:(int64_t)_allocated];
    }
}

+ (instancetype)newWithDevice:(MSimDevice *)device
                       length:(NSUInteger)length
                         options:(MTLResourceOptions)options
{
    if (length == 0 || length > device.config.max_buffer_length)
        return nil;
    MTLStorageMode mode = storage_of(options);
    if (mode == MTLStorageModeMemoryless) {
        msim__invalid("buffer-storage", "newBufferWithLength:%lu options:0x%lx: buffers cannot "
                      "be Memoryless", (unsigned long)length, (unsigned long)options);
        return nil;
    }
    uint64_t allocated = msim__round_up(length, MSIM_PAGE_SIZE);
    if (allocated == 0)
        return nil;
    /* Map a page more than needed and trim, so the start is 16 KiB aligned. */
    size_t span = (size_t)allocated + MSIM_PAGE_SIZE;
    uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return nil;
    uintptr_t start = ((uintptr_t)raw + MSIM_PAGE_SIZE - 1) & ~(uintptr_t)(MSIM_PAGE_SIZE - 1);
    size_t head = start - (uintptr_t)raw;
    if (head)
        munmap(raw, head);
    size_t tail = span - head - (size_t)allocated;
    if (tail)
        munmap((uint8_t *)start + allocated, tail);
    MSimBuffer *b = [[self alloc] init];
    b->_device = device;
    b->_length = length;
    b->_allocated = (NSUInteger)allocated;
    b->_options = options;
    b->_bytes = (uint8_t *)start;
    b->_map = (void *)start;
    b->_mapLength = (size_t)allocated;
    if (msim__take_misalign() && allocated - length >= 256)
        b->_bytes += 256;
    [b msim_registerLive];
    return b;
}

/* Whether [p, p + n) is mapped, and writable, per /proc/self/maps. */
static bool range_mapping(const void *p, size_t n, bool *writable)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return false;
    uintptr_t want = (uintptr_t)p, end = want + n;
    bool all_writable = true;
    char line[512];
    while (want < end && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3)
            continue;
        if (hi <= want || lo > want)
            continue;
        if (perms[1] != 'w')
            all_writable = false;
        want = hi;
    }
    fclose(f);
    *writable = all_writable;
    return want >= end;
}

+ (instancetype)newWithDevice:(MSimDevice *)device
                        bytes:(void *)pointer
                          length:(NSUInteger)length
                         options:(MTLResourceOptions)options
                     deallocator:(void (^)(void *, NSUInteger))deallocator
{
    long page = sysconf(_SC_PAGESIZE);
    if (!pointer || length == 0 || (uintptr_t)pointer % (uintptr_t)page ||
        length % (NSUInteger)page) {
        msim__invalid("nocopy-alignment",
                      "newBufferWithBytesNoCopy:%p length:%lu: the pointer must be aligned to "
                      "the %ld-byte VM page and the length a non-zero multiple of it",
                      pointer, (unsigned long)length, page);
        return nil;
    }
    if (length > device.config.max_buffer_length)
        return nil;
    MTLStorageMode mode = storage_of(options);
    if (mode != MTLStorageModeShared && mode != MTLStorageModeManaged) {
        msim__invalid("nocopy-storage",
                      "newBufferWithBytesNoCopy: with storage mode %lu: no-copy buffers must "
                      "be Shared (or Managed)",
                      (unsigned long)mode);
        return nil;
    }
    bool writable = true;
    if (!range_mapping(pointer, length, &writable)) {
        msim__invalid("nocopy-unmapped",
                      "newBufferWithBytesNoCopy:%p length:%lu: the memory is not mapped",
                      pointer, (unsigned long)length);
        return nil;
    }
    MSimBuffer *b = [[self alloc] init];
    b->_device = device;
    b->_length = length;
    b->_allocated = (NSUInteger)msim__round_up(length, MSIM_PAGE_SIZE);
    b->_options = options;
    b->_bytes = pointer;
    b->_noCopy = YES;
    b->_readOnly = !writable;
    b->_deallocator = deallocator;
    [b msim_registerLive];
    return b;
}

+ (instancetype)newInHeap:(MSimHeap *)heap
                       bytes:(uint8_t *)bytes
                      offset:(NSUInteger)offset
                      length:(NSUInteger)length
               allocatedSize:(NSUInteger)allocated
                     options:(MTLResourceOptions)options
{
    MSimBuffer *b = [[self alloc] init];
    b->_device = (MSimDevice *)heap.device;
    b->_heap = heap;
    b->_length = length;
    b->_allocated = allocated;
    b->_heapOffset = offset;
    /* A heap's resources take its storage mode, and its hazard tracking
     * unless the options ask for one. */
    MTLResourceOptions hazard = hazard_of(options) != MTLHazardTrackingModeDefault
                                    ? (options & (0x3UL << 8))
                                    : ((MTLResourceOptions)heap.hazardTrackingMode << 8);
    b->_options = (options & 0xFUL) | ((MTLResourceOptions)heap.storageMode << 4) | hazard;
    b->_bytes = bytes;
    [b msim_registerLive];
    return b;
}

- (void)dealloc
{
    msim__lock();
    if (_prev)
        _prev->_next = _next;
    else
        live_head = _next;
    if (_next)
        _next->_prev = _prev;
    msim__unlock();
    MSIM_UNCOUNT(live_buffers, 1);
    if (_heap) {
        [_heap msim_freeOffset:_heapOffset length:_allocated];
    } else {
        MSIM_UNCOUNT(live_bytes, _allocated);
        [_device msim_allocated:-(int64_t)_allocated];
    }
    if (_map)
        munmap(_map, _mapLength);
    if (_noCopy) {
        if (_deallocator) {
            MSIM_COUNT(deallocators_run, 1);
            _deallocator(_bytes, _length);
        } else {
            /* Metal may touch the memory until its last reference goes;
             * with no deallocator, the owner must keep it mapped until
             * then. mincore fails with ENOMEM on unmapped pages. */
            long page = sysconf(_SC_PAGESIZE);
            unsigned char vec[64];
            size_t pages = _length / (size_t)page;
            for (size_t done = 0; done < pages; done += 64) {
                size_t n = pages - done < 64 ? pages - done : 64;
                if (mincore(_bytes + done * (size_t)page, n * (size_t)page, vec) != 0 &&
                    errno == ENOMEM) {
                    MSIM_COUNT(nocopy_unmapped_before_release, 1);
                    break;
                }
            }
        }
    }
}

uint64_t msim__held_bytes(void)
{
    uint64_t held = 0;
    msim__lock();
    for (__unsafe_unretained MSimBuffer *b = live_head; b; b = b->_next)
        if (b->_setRefs && msim__retain_count(b) == b->_setRefs)
            held += b->_allocated;
    msim__unlock();
    return held;
}

- (uint64_t)serial
{
    return _serial;
}

- (uint8_t *)bytes
{
    return _bytes;
}

- (BOOL)memoryReadOnly
{
    return _readOnly;
}

- (NSUInteger)msimAllocatedSize
{
    return _allocated;
}

- (NSUInteger)msimLength
{
    return _length;
}

- (MSimHeap *)msimHeap
{
    return _heap;
}

- (MSimDevice *)msimDevice
{
    return _device;
}

- (BOOL)untracked
{
    return hazard_of(_options) == MTLHazardTrackingModeUntracked;
}

- (NSUInteger)setRefs
{
    return _setRefs;
}

- (void)setSetRefs:(NSUInteger)n
{
    _setRefs = n;
}

- (MSimList *)accesses
{
    return _accesses;
}

- (void)setAccesses:(MSimList *)list
{
    _accesses = list;
}

- (NSString *)msim_description
{
    return [NSString msim_stringWithFormat:"buffer #%llu (%lu bytes%s%s)",
                                           (unsigned long long)_serial, (unsigned long)_length,
                                           self.untracked ? ", untracked" : "",
                                           _heap ? ", from a heap" : ""];
}

/* ---- MTLBuffer / MTLResource / MTLAllocation ---------------------------------- */

- (NSUInteger)length
{
    MSIM_ENTRY();
    return _length;
}

- (void *)contents
{
    MSIM_ENTRY();
    return storage_of(_options) == MTLStorageModePrivate ? NULL : _bytes;
}

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (MTLCPUCacheMode)cpuCacheMode
{
    MSIM_ENTRY();
    return (MTLCPUCacheMode)(_options & 0xF);
}

- (MTLStorageMode)storageMode
{
    MSIM_ENTRY();
    return storage_of(_options);
}

/* Resources made by a device default to tracked, heap resources to their
 * heap's mode (already folded into _options). */
- (MTLHazardTrackingMode)hazardTrackingMode
{
    MSIM_ENTRY();
    return self.untracked ? MTLHazardTrackingModeUntracked : MTLHazardTrackingModeTracked;
}

- (MTLResourceOptions)resourceOptions
{
    MSIM_ENTRY();
    MTLHazardTrackingMode mode =
        self.untracked ? MTLHazardTrackingModeUntracked : MTLHazardTrackingModeTracked;
    return (_options & ~(0x3UL << 8)) | ((MTLResourceOptions)mode << 8);
}

- (id<MTLHeap>)heap
{
    MSIM_ENTRY();
    return _heap;
}

/* Apple: zero unless the heap is a placement heap, which the simulator
 * does not model. */
- (NSUInteger)heapOffset
{
    MSIM_ENTRY();
    return 0;
}

- (NSUInteger)allocatedSize
{
    MSIM_ENTRY();
    return _allocated;
}

@end
