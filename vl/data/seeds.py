"""``stable_seed``: one seed from several integers, the same in every process, run and platform.

Python's ``hash()`` is salted per process for strings, and ``random.Random((a, b))`` hashes its tuple, so the data
pipelines derive their per-epoch, per-rank and per-worker generators from this instead.
"""

from __future__ import annotations


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over their 64-bit values)."""
    value = 1469598103934665603
    for part in parts:
        value = ((value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return value
