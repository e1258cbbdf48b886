"""A profiling request the user can fix (a bad --steps, a missing Nsight tool). `wb` prints it as one
line with exit 2. Defined here because `profiling` imports nothing else of the project."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user asked the profiler for; the message names the argument."""
