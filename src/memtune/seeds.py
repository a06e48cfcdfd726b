"""Seeds derived from integers, so random choices depend on what they are for, not on call order.

MeZO's perturbations (seed, step, sample, tensor) and TokenTune's token selection (seed, epoch,
example) draw from `torch.Generator`s seeded by `mix(...)`: the same choice in every process and after
every resume, whichever batch or rank the example lands in.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 finalizer over a running combination)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1
