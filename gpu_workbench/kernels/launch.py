"""Small plain-Python helpers every kernel launcher uses. triton.cdiv and triton.next_power_of_2 are @jit
constexpr functions: microseconds per call from Python, on every launch."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def pow2_bucket(n: int, cap: int | None = None) -> int:
    """The autotune cache's size class of `n`: its next power of two, at most `cap`."""
    return next_pow2(n) if cap is None else min(next_pow2(n), cap)
