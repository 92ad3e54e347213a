/*
 * heap.m -- MTLHeapDescriptor and MTLHeap: one mapping that buffers are
 * sub-allocated from (first fit, 256-byte granules).
 *
 * Rules modelled (Apple's MTLHeap and MTLResource documentation): a heap's
 * resources share its storage mode; with MTLHazardTrackingModeDefault a
 * heap is untracked, and so are its resources unless their options say
 * otherwise; a sub-allocated buffer keeps its heap alive; a residency set
 * that holds one of its buffers makes the whole heap resident
 * (residency.m).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "sim.h"

#define MSIM_HEAP_GRANULE 256u

@implementation MTLHeapDescriptor {
    NSUInteger _size;
    MTLStorageMode _storageMode;
    MTLCPUCacheMode _cpuCacheMode;
    MTLHazardTrackingMode _hazardTrackingMode;
    MTLHeapType _type;
}

- (NSUInteger)size { return _size; }
- (void)setSize:(NSUInteger)size { _size = size; }
- (MTLStorageMode)storageMode { return _storageMode; }
- (void)setStorageMode:(MTLStorageMode)mode { _storageMode = mode; }
- (MTLCPUCacheMode)cpuCacheMode { return _cpuCacheMode; }
- (void)setCpuCacheMode:(MTLCPUCacheMode)mode { _cpuCacheMode = mode; }
- (MTLHazardTrackingMode)hazardTrackingMode { return _hazardTrackingMode; }
- (void)setHazardTrackingMode:(MTLHazardTrackingMode)mode { _hazardTrackingMode = mode; }
- (MTLHeapType)type { return _type; }
- (void)setType:(MTLHeapType)type { _type = type; }

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    MTLHeapDescriptor *c = [[MTLHeapDescriptor alloc] init];
    c->_size = _size;
    c->_storageMode = _storageMode;
    c->_cpuCacheMode = _cpuCacheMode;
    c->_hazardTrackingMode = _hazardTrackingMode;
    c->_type = _type;
    return c;
}

@end

/* A free range of the heap. */
typedef struct msim_range {
    NSUInteger offset, length;
} msim_range_t;

@implementation MSimHeap {
    MSimDevice *_device;
    NSUInteger _size;
    MTLStorageMode _storageMode;
    MTLHazardTrackingMode _hazardTrackingMode;
    MTLHeapType _type;
    uint8_t *_bytes;
    uint64_t _serial;
    pthread_mutex_t _lock;           /* guards the free list and _used   */
    msim_range_t *_free;             /* sorted by offset, coalesced      */
    NSUInteger _nfree, _used;
}

- (instancetype)initWithDevice:(MSimDevice *)device descriptor:(MTLHeapDescriptor *)descriptor
{
    NSUInteger size = (NSUInteger)msim__round_up(descriptor.size, MSIM_PAGE_SIZE);
    if (size == 0 || size > device.config.max_buffer_length)
        return nil;
    if (descriptor.type == MTLHeapTypeSparse || descriptor.storageMode == MTLStorageModeMemoryless) {
        msim__invalid("heap-type", "newHeapWithDescriptor: sparse and memoryless heaps are not "
                      "modelled by the simulator");
        return nil;
    }
    uint8_t *bytes = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bytes == MAP_FAILED)
        return nil;
    self = [super init];
    _free = malloc(sizeof *_free);
    if (!_free) {
        munmap(bytes, size);
        return nil;
    }
    _device = device;
    _size = size;
    _storageMode = descriptor.storageMode;
    _hazardTrackingMode = descriptor.hazardTrackingMode == MTLHazardTrackingModeTracked
                              ? MTLHazardTrackingModeTracked
                              : MTLHazardTrackingModeUntracked;
    _type = descriptor.type;
    _bytes = bytes;
    _serial = MSIM_SERIAL();
    pthread_mutex_init(&_lock, NULL);
    _free[0] = (msim_range_t){0, size};
    _nfree = 1;
    MSIM_COUNT(live_heaps, 1);
    MSIM_COUNT(live_heap_bytes, size);
    [device msim_allocated:(int64_t)size];
    return self;
}

- (void)dealloc
{
    if (!_bytes)
        return;
    munmap(_bytes, _size);
    free(_free);
    pthread_mutex_destroy(&_lock);
    MSIM_UNCOUNT(live_heaps, 1);
    MSIM_UNCOUNT(live_heap_bytes, _size);
    [_device msim_allocated:-(int64_t)_size];
}

- (uint64_t)serial
{
    return _serial;
}

- (NSUInteger)msimSize
{
    return _size;
}

/* First fit; returns NO when no free range is long enough. */
- (BOOL)msim_take:(NSUInteger)length offset:(NSUInteger *)offset
{
    BOOL ok = NO;
    pthread_mutex_lock(&_lock);
    for (NSUInteger i = 0; i < _nfree; i++) {
        if (_free[i].length >= length) {
            *offset = _free[i].offset;
            _free[i].offset += length;
            _free[i].length -= length;
            if (_free[i].length == 0) {
                memmove(&_free[i], &_free[i + 1], (_nfree - i - 1) * sizeof *_free);
                _nfree--;
            }
            _used += length;
            ok = YES;
            break;
        }
    }
    pthread_mutex_unlock(&_lock);
    return ok;
}

- (void)msim_freeOffset:(NSUInteger)offset length:(NSUInteger)length
{
    pthread_mutex_lock(&_lock);
    NSUInteger i = 0;
    while (i < _nfree && _free[i].offset < offset)
        i++;
    msim_range_t *grown = realloc(_free, (_nfree + 1) * sizeof *_free);
    if (grown) {
        _free = grown;
        memmove(&_free[i + 1], &_free[i], (_nfree - i) * sizeof *_free);
        _free[i] = (msim_range_t){offset, length};
        _nfree++;
        /* Coalesce with the neighbours. */
        if (i + 1 < _nfree && _free[i].offset + _free[i].length == _free[i + 1].offset) {
            _free[i].length += _free[i + 1].length;
            memmove(&_free[i + 1], &_free[i + 2], (_nfree - i - 2) * sizeof *_free);
            _nfree--;
        }
        if (i > 0 && _free[i - 1].offset + _free[i - 1].length == _free[i].offset) {
            _free[i - 1].length += _free[i].length;
            memmove(&_free[i], &_free[i + 1], (_nfree - i - 1) * sizeof *_free);
            _nfree--;
        }
    }
    _used -= length;
    pthread_mutex_unlock(&_lock);
}

/* ---- MTLHeap / MTLAllocation -------------------------------------------------------- */

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (MTLStorageMode)storageMode
{
    MSIM_ENTRY();
    return _storageMode;
}

- (MTLHazardTrackingMode)hazardTrackingMode
{
    MSIM_ENTRY();
    return _hazardTrackingMode;
}

- (MTLHeapType)type
{
    MSIM_ENTRY();
    return _type;
}

- (NSUInteger)size
{
    MSIM_ENTRY();
    return _size;
}

- (NSUInteger)usedSize
{
    MSIM_ENTRY();
    pthread_mutex_lock(&_lock);
    NSUInteger used = _used;
    pthread_mutex_unlock(&_lock);
    return used;
}

- (NSUInteger)currentAllocatedSize
{
    MSIM_ENTRY();
    return _size;
}

- (NSUInteger)allocatedSize
{
    MSIM_ENTRY();
    return _size;
}

- (NSUInteger)maxAvailableSizeWithAlignment:(NSUInteger)alignment
{
    MSIM_ENTRY();
    if (alignment == 0 || (alignment & (alignment - 1)))
        alignment = MSIM_HEAP_GRANULE;
    NSUInteger best = 0;
    pthread_mutex_lock(&_lock);
    for (NSUInteger i = 0; i < _nfree; i++) {
        NSUInteger start = (NSUInteger)msim__round_up(_free[i].offset, alignment);
        NSUInteger end = _free[i].offset + _free[i].length;
        if (start < end && end - start > best)
            best = end - start;
    }
    pthread_mutex_unlock(&_lock);
    return best / MSIM_HEAP_GRANULE * MSIM_HEAP_GRANULE;
}

- (id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options
{
    MSIM_ENTRY();
    if (msim__take_fault(MSIM_FAULT_NEW_BUFFER) || length == 0)
        return nil;
    MTLStorageMode wanted = (MTLStorageMode)((options >> 4) & 0xF);
    if (wanted != _storageMode) {
        msim__invalid("heap-storage",
                      "-[MTLHeap newBufferWithLength:%lu options:0x%lx]: storage mode %lu differs "
                      "from the heap's (%lu)",
                      (unsigned long)length, (unsigned long)options, (unsigned long)wanted,
                      (unsigned long)_storageMode);
        return nil;
    }
    NSUInteger allocated = (NSUInteger)msim__round_up(length, MSIM_HEAP_GRANULE);
    NSUInteger offset;
    if (allocated == 0 || ![self msim_take:allocated offset:&offset])
        return nil;
    /* Apple promises nothing about a heap buffer's initial bytes, and heap
     * memory is reused: fill it with a pattern, so code that relies on
     * zeroes shows. */
    memset(_bytes + offset, 0xCD, allocated);
    return [MSimBuffer newInHeap:self
                           bytes:_bytes + offset
                          offset:offset
                          length:length
                   allocatedSize:allocated
                         options:options];
}

@end
