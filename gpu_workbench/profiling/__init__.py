"""Profiling ranges for Nsight (NVTX), a host timeline (Chrome/Perfetto trace) and torch.profiler.

    from gpu_workbench.profiling import range as prange, mark
    with prange("fwd", mb=3, stage=1):
        ...
"""

from gpu_workbench.profiling import timeline
from gpu_workbench.profiling.ranges import listening, mark, range, refresh_listeners

__all__ = ["listening", "mark", "range", "refresh_listeners", "timeline"]
