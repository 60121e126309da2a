"""On CPUs, vLLM's engine processes wait for each other asleep, not spinning.

vLLM passes each step's work from the EngineCore to its worker processes, and
their results back, through shared-memory queues. A reader that has read
within the last second waits for the next message by spinning on
`sched_yield` (`SpinCondition.wait`); only after a second without messages
does it sleep on the queue's notification socket, which the writer pings after
every message. On a GPU host the spinning process has a core of its own. On a
CPU host where every core runs the worker's OpenMP threads (our default,
`qwen_vl/server/cpu.py`), the EngineCore spins through each forward pass on
those cores: measured at concurrency 16 on 2 cores, it burns 5-16% of a
core, and every time it is scheduled, the OpenMP thread it displaces holds up
the other threads at their next barrier.

So on CPUs every reader takes the sleeping path at once. The writer's ping
wakes it; the cost is one wake-up per message (tens of microseconds, against
engine steps of tens of milliseconds). `QWEN_VL_CPU_WAIT=spin` keeps vLLM's
spinning.
"""

import functools
import os

OPT_OUT = "QWEN_VL_CPU_WAIT"


def install_cpu_blocking_waits() -> bool:
    """Make every shared-memory queue reader created from now on in this process sleep while it
    waits (on CPUs, unless opted out)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get(OPT_OUT) == "spin":
        return False
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    if getattr(SpinCondition.__init__, "sleeps_while_waiting", False):
        return True
    spinning_init = SpinCondition.__init__

    @functools.wraps(spinning_init)
    def __init__(self, *args, **kwargs):
        spinning_init(self, *args, **kwargs)
        # `wait` spins only within busy_loop_s of the last read.
        self.busy_loop_s = 0

    __init__.sleeps_while_waiting = True
    SpinCondition.__init__ = __init__
    return True
