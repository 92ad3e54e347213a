/*
 * sync.m -- MTLFence, MTLEvent and MTLSharedEvent.
 *
 * The simulated GPU runs command buffers one after another, so fences
 * change nothing at run time; they matter to the ordering analysis of
 * untracked resources (hazards.m). Events do both: a wait blocks the GPU
 * thread until the value is reached (a watchdog turns a 10 s wait into a
 * validation error), and signal/wait pairs order passes across command
 * buffers.
 */
#include "sim.h"

@implementation MSimFence {
    MSimDevice *_device;
    MSimPass *_lastUpdate;
}

- (instancetype)initWithDevice:(MSimDevice *)device
{
    self = [super init];
    _device = device;
    return self;
}

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (MSimPass *)lastUpdate
{
    return _lastUpdate;
}

- (void)setLastUpdate:(MSimPass *)pass
{
    _lastUpdate = pass;
}

@end

@implementation MSimEvent {
    MSimDevice *_device;
    uint64_t _value;                 /* guarded by the simulator lock */
    MSimList *_signals;
}

- (instancetype)initWithDevice:(MSimDevice *)device
{
    self = [super init];
    _device = device;
    _signals = [[MSimList alloc] init];
    return self;
}

- (id<MTLDevice>)device
{
    MSIM_ENTRY();
    return _device;
}

- (MSimList *)signals
{
    return _signals;
}

- (uint64_t)msim_value
{
    msim__lock();
    uint64_t v = _value;
    msim__unlock();
    return v;
}

- (void)msim_signal:(uint64_t)value
{
    msim__lock();
    if (value > _value)
        _value = value;
    msim__broadcast();
    msim__unlock();
}

- (BOOL)msim_waitFor:(uint64_t)value seconds:(double)seconds
{
    double deadline = msim__now() + seconds;
    msim__lock();
    while (_value < value && msim__wait_until(deadline)) {
    }
    BOOL reached = _value >= value;
    msim__unlock();
    return reached;
}

@end

@implementation MSimSharedEvent

- (uint64_t)signaledValue
{
    MSIM_ENTRY();
    return [self msim_value];
}

/* Apple: setting the value only ever raises it. */
- (void)setSignaledValue:(uint64_t)value
{
    MSIM_ENTRY();
    [self msim_signal:value];
}

- (BOOL)waitUntilSignaledValue:(uint64_t)value timeoutMS:(uint64_t)milliseconds
{
    MSIM_ENTRY();
    double seconds = (double)milliseconds / 1000.0;
    BOOL watchdog = seconds > MSIM_WATCHDOG_SECONDS;
    if (watchdog)
        seconds = MSIM_WATCHDOG_SECONDS;
    BOOL reached = [self msim_waitFor:value seconds:seconds];
    if (!reached && watchdog)
        msim__invalid("event-wait-timeout",
                      "waitUntilSignaledValue:%llu timeoutMS:%llu waited %d s for a value that "
                      "never came (the event is at %llu)",
                      (unsigned long long)value, (unsigned long long)milliseconds,
                      MSIM_WATCHDOG_SECONDS, (unsigned long long)[self msim_value]);
    return reached;
}

@end
