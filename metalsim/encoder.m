/*
 * encoder.m -- blit and compute command encoders, and the passes and
 * commands they record for the GPU thread.
 *
 * Rules modelled (Apple's MTLCommandEncoder, MTLBlitCommandEncoder and
 * MTLComputeCommandEncoder documentation):
 * - An encoder must end with endEncoding before it is released, and takes
 *   no command after it.
 * - Blit copies and fills stay inside their buffers; on macOS their
 *   offsets and sizes are multiples of 4. A copy's ranges must not overlap.
 *   Within one blit encoder, a command that depends on an earlier one is a
 *   hazard (hazards.m).
 * - Compute: setBytes takes at most 4 KiB; a device-space setBuffer offset
 *   is a multiple of the argument's element size (at least 4, at most 16);
 *   every [[buffer(n)]] argument of the kernel is bound; grid and
 *   threadgroup have no zero dimension and the threadgroup stays within
 *   the pipeline's maxTotalThreadsPerThreadgroup; the kernel has an
 *   implementation (the simulator runs registered ones).
 * - A serial compute encoder orders its dispatches; memoryBarrierWithScope:
 *   is accepted and changes nothing.
 */
#include <stdlib.h>
#include <string.h>

#include "sim.h"

#define MSIM_ARG_SLOTS 31
#define MSIM_MAX_SET_BYTES 4096

@implementation MSimCommand

- (void)dealloc
{
    free(_constants);
}

@end

@implementation MSimBinding

- (void)dealloc
{
    free(_bytes);
}

@end

@implementation MSimPass

- (instancetype)init
{
    self = [super init];
    _commands = [[MSimList alloc] init];
    _fenceWaits = [[MSimList alloc] init];
    _fenceUpdates = [[MSimList alloc] init];
    _predecessors = [[MSimList alloc] init];
    return self;
}

- (NSString *)msim_description
{
    static const char *kinds[] = {"", "blit pass", "compute pass", "event signal", "event wait"};
    return [NSString msim_stringWithFormat:"%s %lu of command buffer #%llu", kinds[self.kind],
                                           (unsigned long)self.position + 1,
                                           (unsigned long long)self.commandBufferSerial];
}

@end

/* ---- the common part --------------------------------------------------------------------- */

@implementation MSimEncoder {
  @protected
    MSimCommandBuffer *_cb;           /* held until endEncoding            */
    MSimPass *_pass;
    BOOL _ended;
    const char *_kind;
}

- (instancetype)initWithCommandBuffer:(MSimCommandBuffer *)cb pass:(MSimPass *)pass
{
    self = [super init];
    _cb = cb;
    _pass = pass;
    _kind = pass.kind == MSIM_PASS_BLIT ? "MTLBlitCommandEncoder" : "MTLComputeCommandEncoder";
    MSIM_COUNT(encoders_created, 1);
    return self;
}

- (void)dealloc
{
    if (!_ended) {
        msim__invalid("encoder-not-ended",
                      "%s of command buffer #%llu released without endEncoding", _kind,
                      (unsigned long long)_cb.serial);
        [_cb msim_abandonPass:_pass];
    }
}

/* NO (after recording the error) when the encoder no longer takes work. */
- (BOOL)msim_open:(SEL)cmd
{
    if (!_ended)
        return YES;
    msim__invalid("encoder-ended", "-[%s %s] after endEncoding", _kind, sel_getName(cmd));
    return NO;
}

/* A resource of this command buffer's device, or NO after the error. */
- (BOOL)msim_usable:(id)object role:(const char *)role cmd:(SEL)cmd
{
    if (![object isKindOfClass:[MSimBuffer class]]) {
        msim__invalid("wrong-object", "-[%s %s]: the %s is not an MTLBuffer of the simulator",
                      _kind, sel_getName(cmd), role);
        return NO;
    }
    if (((MSimBuffer *)object).msimDevice != _cb.msimDevice) {
        msim__invalid("wrong-device",
                      "-[%s %s]: the %s belongs to another MTLDevice than the command buffer",
                      _kind, sel_getName(cmd), role);
        return NO;
    }
    return YES;
}

- (void)endEncoding
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd])
        return;
    _ended = YES;
    [_cb msim_endPass:_pass];
    _cb = nil;
}

- (void)updateFence:(id<MTLFence>)fence
{
    MSIM_ENTRY();
    if ([self msim_open:_cmd])
        [_pass.fenceUpdates add:fence];
}

- (void)waitForFence:(id<MTLFence>)fence
{
    MSIM_ENTRY();
    if ([self msim_open:_cmd])
        [_pass.fenceWaits add:fence];
}

@end

/* ---- blit ------------------------------------------------------------------------------- */

@implementation MSimBlitEncoder

static bool inside(NSUInteger offset, NSUInteger size, NSUInteger length)
{
    return offset <= length && size <= length - offset;
}

- (void)copyFromBuffer:(id<MTLBuffer>)src
          sourceOffset:(NSUInteger)so
              toBuffer:(id<MTLBuffer>)dst
     destinationOffset:(NSUInteger)dof
                  size:(NSUInteger)size
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd] || ![self msim_usable:src role:"source" cmd:_cmd] ||
        ![self msim_usable:dst role:"destination" cmd:_cmd])
        return;
    MSimBuffer *s = (MSimBuffer *)src, *d = (MSimBuffer *)dst;
    NSUInteger slen = s.msimLength, dlen = d.msimLength;
    if (!inside(so, size, slen) || !inside(dof, size, dlen)) {
        msim__invalid("blit-range",
                      "copyFromBuffer: %lu bytes from offset %lu of %s to offset %lu of %s "
                      "reach past the end of a buffer",
                      (unsigned long)size, (unsigned long)so, s.msim_description.UTF8String,
                      (unsigned long)dof, d.msim_description.UTF8String);
        return;
    }
    if ((so | dof | size) & 3u)
        msim__invalid("blit-alignment",
                      "copyFromBuffer: source offset %lu, destination offset %lu and size %lu "
                      "must be multiples of 4 on macOS",
                      (unsigned long)so, (unsigned long)dof, (unsigned long)size);
    if (s == d && size && so < dof + size && dof < so + size)
        msim__invalid("blit-overlap",
                      "copyFromBuffer: %lu bytes from offset %lu to offset %lu of the same %s: "
                      "the ranges overlap",
                      (unsigned long)size, (unsigned long)so, (unsigned long)dof,
                      s.msim_description.UTF8String);
    MSimCommand *c = [[MSimCommand alloc] init];
    c.kind = MSIM_CMD_COPY;
    c.src = s;
    c.dst = d;
    c.srcOffset = so;
    c.dstOffset = dof;
    c.size = size;
    msim__blit_hazard_check(_pass, c);
    [_pass.commands add:c];
    MSIM_COUNT(blits, 1);
}

- (void)fillBuffer:(id<MTLBuffer>)buffer range:(NSRange)range value:(uint8_t)value
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd] || ![self msim_usable:buffer role:"buffer" cmd:_cmd])
        return;
    MSimBuffer *b = (MSimBuffer *)buffer;
    if (range.length == 0 || !inside(range.location, range.length, b.msimLength)) {
        msim__invalid("blit-range",
                      "fillBuffer: range {%lu, %lu} is empty or reaches past the end of %s",
                      (unsigned long)range.location, (unsigned long)range.length,
                      b.msim_description.UTF8String);
        return;
    }
    if ((range.location | range.length) & 3u)
        msim__invalid("blit-alignment",
                      "fillBuffer: range {%lu, %lu}: start and length must be multiples of 4 "
                      "on macOS",
                      (unsigned long)range.location, (unsigned long)range.length);
    MSimCommand *c = [[MSimCommand alloc] init];
    c.kind = MSIM_CMD_FILL;
    c.dst = b;
    c.dstOffset = range.location;
    c.size = range.length;
    c.value = value;
    msim__blit_hazard_check(_pass, c);
    [_pass.commands add:c];
    MSIM_COUNT(blits, 1);
}

@end

/* ---- compute ------------------------------------------------------------------------------ */

@implementation MSimComputeEncoder {
    MSimPipeline *_pipeline;
    MSimBinding *_slots[MSIM_ARG_SLOTS];
}

- (BOOL)msim_index:(NSUInteger)index cmd:(SEL)cmd
{
    if (index < MSIM_ARG_SLOTS)
        return YES;
    msim__invalid("buffer-index", "-[%s %s]: index %lu is beyond the %d argument slots", _kind,
                  sel_getName(cmd), (unsigned long)index, MSIM_ARG_SLOTS);
    return NO;
}

- (void)setComputePipelineState:(id<MTLComputePipelineState>)state
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd])
        return;
    if (![(id)state isKindOfClass:[MSimPipeline class]]) {
        msim__invalid("wrong-object", "setComputePipelineState: not a pipeline of the simulator");
        return;
    }
    _pipeline = (MSimPipeline *)state;
}

- (void)setBuffer:(id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd] || ![self msim_index:index cmd:_cmd])
        return;
    if (!buffer) {
        _slots[index] = nil;
        return;
    }
    if (![self msim_usable:buffer role:"buffer" cmd:_cmd])
        return;
    MSimBuffer *b = (MSimBuffer *)buffer;
    if (offset > b.msimLength) {
        msim__invalid("buffer-offset", "setBuffer: offset %lu is past the end of %s",
                      (unsigned long)offset, b.msim_description.UTF8String);
        return;
    }
    MSimBinding *binding = [[MSimBinding alloc] init];
    binding.index = index;
    binding.buffer = b;
    binding.offset = offset;
    _slots[index] = binding;
}

- (void)setBytes:(const void *)bytes length:(NSUInteger)length atIndex:(NSUInteger)index
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd] || ![self msim_index:index cmd:_cmd])
        return;
    if (length > MSIM_MAX_SET_BYTES) {
        msim__invalid("set-bytes-size",
                      "setBytes: %lu bytes at index %lu: setBytes takes at most %d bytes (use a "
                      "buffer)",
                      (unsigned long)length, (unsigned long)index, MSIM_MAX_SET_BYTES);
        return;
    }
    MSimBinding *binding = [[MSimBinding alloc] init];
    binding.index = index;
    binding.length = length;
    binding.bytes = malloc(length ? length : 1);
    if (!binding.bytes)
        msim__raise(NSInternalInconsistencyException, "cannot copy %lu bytes", (unsigned long)length);
    if (length)
        memcpy(binding.bytes, bytes, length);
    _slots[index] = binding;
}

- (void)memoryBarrierWithScope:(MTLBarrierScope)scope
{
    MSIM_ENTRY();
    (void)scope;
    [self msim_open:_cmd];
}

static bool size_ok(MTLSize s)
{
    return s.width && s.height && s.depth;
}

- (void)dispatchThreads:(MTLSize)grid threadsPerThreadgroup:(MTLSize)group
{
    MSIM_ENTRY();
    if (![self msim_open:_cmd])
        return;
    if (!_pipeline) {
        msim__invalid("no-pipeline", "dispatchThreads: without a compute pipeline state");
        return;
    }
    const char *name = _pipeline.function.name.UTF8String;
    if (!size_ok(grid) || !size_ok(group)) {
        msim__invalid("dispatch-size",
                      "dispatchThreads: grid (%lu, %lu, %lu) and threadgroup (%lu, %lu, %lu) of "
                      "kernel %s must have no zero dimension",
                      (unsigned long)grid.width, (unsigned long)grid.height,
                      (unsigned long)grid.depth, (unsigned long)group.width,
                      (unsigned long)group.height, (unsigned long)group.depth, name);
        return;
    }
    NSUInteger max = _pipeline.maxTotalThreadsPerThreadgroup;
    if (group.width > max || group.height > max || group.depth > max ||
        group.width * group.height * group.depth > max) {
        msim__invalid("dispatch-size",
                      "dispatchThreads: threadgroup (%lu, %lu, %lu) of kernel %s exceeds "
                      "maxTotalThreadsPerThreadgroup %lu",
                      (unsigned long)group.width, (unsigned long)group.height,
                      (unsigned long)group.depth, name, (unsigned long)max);
        return;
    }
    MSimFunction *fn = _pipeline.function;
    BOOL ok = YES;
    for (NSUInteger i = 0; i < fn.nargs; i++) {
        const msim_arg_t *arg = &fn.args[i];
        MSimBinding *b = arg->index < MSIM_ARG_SLOTS ? _slots[arg->index] : nil;
        if (!b) {
            msim__invalid("unbound-argument", "dispatchThreads: kernel %s reads [[buffer(%u)]], "
                          "which nothing is bound to", name, arg->index);
            ok = NO;
        } else if (b.buffer && b.offset % arg->alignment) {
            msim__invalid("buffer-offset-alignment",
                          "dispatchThreads: kernel %s binds %s at offset %lu to [[buffer(%u)]], "
                          "which needs offsets aligned to %u bytes",
                          name, b.buffer.msim_description.UTF8String, (unsigned long)b.offset,
                          arg->index, arg->alignment);
        }
    }
    msim_kernel_fn impl;
    void *ctx;
    if (!msim__kernel_find(name, &impl, &ctx))
        msim__invalid("no-kernel-implementation",
                      "dispatchThreads: kernel %s has no implementation in the simulator "
                      "(register one with msim_register_kernel / mlxbuf.metalsim.register_kernel)",
                      name);
    if (!ok)
        return;
    MSimCommand *c = [[MSimCommand alloc] init];
    c.kind = MSIM_CMD_DISPATCH;
    c.pipeline = _pipeline;
    c.grid = grid;
    c.threadgroup = group;
    c.bindings = [[MSimList alloc] init];
    uint64_t total = 0;
    for (NSUInteger i = 0; i < MSIM_ARG_SLOTS; i++) {
        if (_slots[i].buffer)
            [c.bindings add:_slots[i]];
        else if (_slots[i])
            total += _slots[i].length;
    }
    c.constants = malloc(total ? total : 1);
    if (!c.constants)
        msim__raise(NSInternalInconsistencyException, "cannot copy dispatch constants");
    c.constantsLength = total;
    for (NSUInteger i = 0, at = 0; i < MSIM_ARG_SLOTS; i++) {
        if (_slots[i] && !_slots[i].buffer && _slots[i].length) {
            memcpy(c.constants + at, _slots[i].bytes, _slots[i].length);
            at += _slots[i].length;
        }
    }
    [_pass.commands add:c];
    MSIM_COUNT(dispatches, 1);
}

@end
