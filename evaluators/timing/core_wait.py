"""How long a model's threads waited for a CPU core, from Linux's per-thread scheduler statistics.

`/proc/<pid>/task/<tid>/schedstat` holds, per thread, the nanoseconds it ran on a core and the
nanoseconds it was runnable but waited in a run queue. Over one request, the waiting share of the
serving threads' runnable time says whether the machine gave them the cores they asked for: about
0 on an idle machine, 1/2 when twice as many threads as cores want to run. A latency measured while
that share is high is the machine's load as much as the model's speed.

A vLLM request crosses processes: the front end (the process that calls `generate`) hands it to the
engine-core process, which hands each step to the workers, over shared-memory queues whose readers
spin while they wait. All of them must get a core for the request to advance, so their threads are
counted together (the vLLM engine's `compute_pids`,
`engines.vllm.request_path`); the workers' alone miss most of a busy loop's effect.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerTimes:
    """Nanoseconds on a core and waiting for one, summed over the threads of some processes."""

    running_ns: int
    waiting_ns: int

    @classmethod
    def of(cls, pids) -> "SchedulerTimes | None":
        """The sums over every thread of `pids` now; None where the kernel keeps no schedstat."""
        running = waiting = 0
        found = False
        for pid in pids:
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for thread in threads:
                try:
                    with open(f"/proc/{pid}/task/{thread}/schedstat") as stat:
                        on_core, queued = stat.read().split()[:2]
                except (OSError, ValueError):  # the thread ended meanwhile
                    continue
                running, waiting, found = running + int(on_core), waiting + int(queued), True
        return cls(running, waiting) if found else None


def waiting_share(before: SchedulerTimes | None, after: SchedulerTimes | None) -> float:
    """Δwaiting / (Δrunning + Δwaiting) between two readings; NaN when either is unknown or the
    threads did not run."""
    if before is None or after is None:
        return math.nan
    running, waiting = after.running_ns - before.running_ns, after.waiting_ns - before.waiting_ns
    return waiting / (running + waiting) if running + waiting > 0 else math.nan

