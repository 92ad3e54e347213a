/*
 * hazards.m -- which GPU work Metal leaves unordered, checked at commit.
 *
 * Untracked resources (MTLHazardTrackingModeUntracked, the default for
 * heaps) get no ordering from Metal: two passes (encoders, of one command
 * buffer or of two) that touch the same untracked buffer, at least one of
 * them writing, need a fence (updateFence: in the first, waitForFence: in
 * the second; fences order passes of one queue) or an event (a signal
 * after the first, a wait before the second) between them. Anything else
 * is "unordered access to untracked buffer". Work whose command buffer
 * has completed is ordered before everything committed afterwards.
 * Compute passes count a buffer as written when the kernel's argument is
 * `device` and not `const`.
 *
 * Within one blit encoder the simulator takes the conservative reading
 * where Apple is silent: the encoder's commands are not ordered among
 * themselves (a serial compute encoder's dispatches are), so a blit that
 * reads or writes bytes an earlier blit of the same encoder wrote, or
 * writes bytes it read, is a hazard.
 */
#include "sim.h"

@interface MSimAccess : NSObject
@property (nonatomic, strong) MSimPass *pass;
@property (nonatomic) BOOL write;
@end

@implementation MSimAccess
@end

/* Is q ordered before p through fences and events? */
static BOOL ordered_before(MSimPass *q, MSimPass *p)
{
    MSimList *todo = [[MSimList alloc] init], *seen = [[MSimList alloc] init];
    [todo add:p];
    while (todo.count) {
        MSimPass *n = [todo at:todo.count - 1];
        [todo removeAt:todo.count - 1];
        for (NSUInteger i = 0; i < n.predecessors.count; i++) {
            MSimPass *pred = [n.predecessors at:i];
            if (pred == q)
                return YES;
            if (![seen containsIdentical:pred]) {
                [seen add:pred];
                [todo add:pred];
            }
        }
    }
    return NO;
}

/* Whether argument `index` of the dispatch's kernel is written. */
static BOOL dispatch_writes(MSimCommand *c, NSUInteger index)
{
    MSimFunction *fn = c.pipeline.function;
    for (NSUInteger i = 0; i < fn.nargs; i++)
        if (fn.args[i].index == index)
            return fn.args[i].written;
    return YES;
}

static void each_access(MSimPass *pass, void (^visit)(MSimBuffer *buffer, BOOL write))
{
    for (NSUInteger i = 0; i < pass.commands.count; i++) {
        MSimCommand *c = [pass.commands at:i];
        switch (c.kind) {
        case MSIM_CMD_COPY:
            visit(c.src, NO);
            visit(c.dst, YES);
            break;
        case MSIM_CMD_FILL:
            visit(c.dst, YES);
            break;
        case MSIM_CMD_DISPATCH:
            for (NSUInteger k = 0; k < c.bindings.count; k++) {
                MSimBinding *b = [c.bindings at:k];
                visit(b.buffer, dispatch_writes(c, b.index));
            }
            break;
        }
    }
}

static void check_untracked(MSimPass *pass, MSimBuffer *buffer, BOOL write)
{
    if (!buffer.untracked)
        return;
    if (!buffer.accesses)
        buffer.accesses = [[MSimList alloc] init];
    MSimList *history = buffer.accesses;
    MSimAccess *mine = nil;
    BOOL reported = NO;
    for (NSUInteger k = history.count; k-- > 0;) {
        MSimAccess *e = [history at:k];
        if (e.pass.completed) {
            [history removeAt:k];
        } else if (e.pass == pass) {
            mine = e;
        } else if (!reported && (write || e.write) && !ordered_before(e.pass, pass)) {
            msim__invalid("untracked-hazard",
                          "unordered access to untracked buffer %s: the %s %s it and the %s "
                          "%s it, with no fence or event between them",
                          buffer.msim_description.UTF8String,
                          e.pass.msim_description.UTF8String, e.write ? "writes" : "reads",
                          pass.msim_description.UTF8String, write ? "writes" : "reads");
            reported = YES;
        }
    }
    if (mine) {
        mine.write = mine.write || write;
    } else {
        MSimAccess *a = [[MSimAccess alloc] init];
        a.pass = pass;
        a.write = write;
        [history add:a];
    }
}

void msim__hazards_commit_locked(MSimList *passes)
{
    MSimList *waited = [[MSimList alloc] init];
    for (NSUInteger i = 0; i < passes.count; i++) {
        MSimPass *p = [passes at:i];
        switch (p.kind) {
        case MSIM_PASS_SIGNAL: {
            for (NSUInteger j = 0; j < i; j++)
                [p.predecessors add:[passes at:j]];
            MSimList *signals = p.event.signals;
            for (NSUInteger k = signals.count; k-- > 0;)
                if (((MSimPass *)[signals at:k]).completed)
                    [signals removeAt:k];
            [signals add:p];
            break;
        }
        case MSIM_PASS_WAIT: {
            /* The first signal that reaches the value releases the wait; a
             * value already reached orders nothing still running. */
            MSimList *signals = p.event.signals;
            for (NSUInteger k = 0; k < signals.count; k++) {
                MSimPass *s = [signals at:k];
                if (s.eventValue >= p.eventValue) {
                    [waited add:s];
                    break;
                }
            }
            break;
        }
        case MSIM_PASS_BLIT:
        case MSIM_PASS_COMPUTE:
            for (NSUInteger k = 0; k < waited.count; k++)
                [p.predecessors add:[waited at:k]];
            for (NSUInteger k = 0; k < p.fenceWaits.count; k++) {
                MSimFence *f = [p.fenceWaits at:k];
                if (f.lastUpdate && f.lastUpdate != p)
                    [p.predecessors add:f.lastUpdate];
            }
            each_access(p, ^(MSimBuffer *buffer, BOOL write) {
                check_untracked(p, buffer, write);
            });
            for (NSUInteger k = 0; k < p.fenceUpdates.count; k++)
                ((MSimFence *)[p.fenceUpdates at:k]).lastUpdate = p;
            break;
        }
    }
}

void msim__hazards_complete_locked(MSimList *passes)
{
    for (NSUInteger i = 0; i < passes.count; i++) {
        MSimPass *p = [passes at:i];
        p.completed = YES;
        each_access(p, ^(MSimBuffer *buffer, BOOL write) {
            (void)write;
            MSimList *history = buffer.accesses;
            for (NSUInteger k = history.count; k-- > 0;)
                if (((MSimAccess *)[history at:k]).pass.completed)
                    [history removeAt:k];
        });
    }
}

/* ---- within one blit encoder ---------------------------------------------------------------- */

typedef struct msim_span {
    __unsafe_unretained MSimBuffer *buffer;
    NSUInteger offset, size;
    BOOL write;
} msim_span_t;

static int spans_of(MSimCommand *c, msim_span_t out[2])
{
    int n = 0;
    if (c.kind == MSIM_CMD_COPY)
        out[n++] = (msim_span_t){c.src, c.srcOffset, c.size, NO};
    out[n++] = (msim_span_t){c.dst, c.dstOffset, c.size, YES};
    return n;
}

void msim__blit_hazard_check(MSimPass *pass, MSimCommand *command)
{
    msim_span_t mine[2], theirs[2];
    int nm = spans_of(command, mine);
    for (NSUInteger i = 0; i < pass.commands.count; i++) {
        MSimCommand *earlier = [pass.commands at:i];
        int nt = spans_of(earlier, theirs);
        for (int a = 0; a < nm; a++) {
            for (int b = 0; b < nt; b++) {
                msim_span_t x = mine[a], y = theirs[b];
                if (x.buffer != y.buffer || !(x.write || y.write) || !x.size || !y.size ||
                    x.offset >= y.offset + y.size || y.offset >= x.offset + x.size)
                    continue;
                msim__invalid("blit-hazard",
                              "blit command %lu of the %s %s bytes [%lu, %lu) of %s that blit "
                              "command %lu of the same encoder %s: the commands of one blit "
                              "encoder are not ordered among themselves (end the encoder "
                              "between dependent blits)",
                              (unsigned long)pass.commands.count + 1,
                              pass.msim_description.UTF8String, x.write ? "writes" : "reads",
                              (unsigned long)x.offset, (unsigned long)(x.offset + x.size),
                              x.buffer.msim_description.UTF8String, (unsigned long)i + 1,
                              y.write ? "wrote" : "read");
                return;
            }
        }
    }
}
