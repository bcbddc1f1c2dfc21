"""A bijection on ``[0, 2**bits)`` that spreads raw item ids over the whole range
(``embedding.managed.id_hash=mix``; used by ``model/managed.py``).

Why: TorchRec's sharded managed-collision table routes a raw id to the rank owning
``[r, r+1) * input_hash_size / buckets`` before any hashing, so real catalogues' ids (a shared
offset such as ``2**40 + k * 7919``, snowflake ids sharing their high bits) all land on one rank.
``mix`` maps each id to another id of the same range, well spread in its high bits, before the
managed table sees it; being a bijection it keeps distinct ids distinct (zero collisions stay
zero) and ``unmix`` gives the original id back (slot state -> raw ids for exports and eval).

The map, for ``bits = k`` and ``s = ceil(k / 2)``, all mod ``2**k``::

    x ^= x >> s;  x *= C1;  x ^= x >> s;  x *= C2

``x ^= x >> s`` with ``2s >= k`` is its own inverse (``x >> 2s`` is 0), and multiplying by an odd
constant is inverted by multiplying by its inverse mod ``2**k``, so ``unmix`` runs the steps
backwards. The final multiply carries every lower bit into the high bits the routing reads.
int64 products wrap mod ``2**64``, which is exact mod ``2**k`` after masking with ``2**k - 1``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

# splitmix64's finaliser constants (odd), reduced mod 2**bits
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def hash_bits(input_hash_size: int) -> int:
    """``k`` with ``input_hash_size == 2**k`` (1 <= k <= 62); ValueError otherwise. Not 2**63: a
    mixed id could then be int64 max, TorchRec's marker of a free slot."""
    n = int(input_hash_size)
    if n < 2 or n & (n - 1) or n > 2**62:
        raise ValueError(f"embedding.managed.input_hash_size={n}: id_hash=mix needs a power of two "
                         f"between 2 and 2**62 (the default), or set id_hash=none")
    return n.bit_length() - 1


@lru_cache(maxsize=None)
def _constants(bits: int) -> Tuple[int, int, int, int, int, int]:
    """(shift, mask, C1, C2, C1^-1, C2^-1) mod 2**bits, as Python ints that fit int64."""
    if not 1 <= bits <= 63:
        raise ValueError(f"id mix bits must be in [1, 63], got {bits}")
    mod = 1 << bits
    c1, c2 = _C1 % mod, _C2 % mod  # odd, < 2**63
    return (bits + 1) // 2, mod - 1, c1, c2, pow(c1, -1, mod), pow(c2, -1, mod)


def _xorshift(x: torch.Tensor, s: int) -> torch.Tensor:
    return torch.bitwise_xor(x, torch.bitwise_right_shift(x, s))


def _mul(x: torch.Tensor, c: int, mask: int) -> torch.Tensor:
    return torch.bitwise_and(x * c, mask)  # wraps mod 2**64, exact mod 2**bits


def mix(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """ids: int64 tensor of any shape, every value in ``[0, 2**bits)`` (not checked here; see
    ``check_range``). Returns a new int64 tensor of the same shape and device, values in
    ``[0, 2**bits)``; ``unmix(mix(x)) == x``. Never pass free-slot markers (int64 max)."""
    s, mask, c1, c2, _, _ = _constants(bits)
    x = ids.to(torch.int64)
    x = _mul(_xorshift(x, s), c1, mask)
    return _mul(_xorshift(x, s), c2, mask)


def unmix(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``mix`` (same shapes, dtype and range rules)."""
    s, mask, _, _, i1, i2 = _constants(bits)
    x = _xorshift(_mul(ids.to(torch.int64), i2, mask), s)
    return _xorshift(_mul(x, i1, mask), s)


def check_range(ids: torch.Tensor, input_hash_size: int, what: str = "item id") -> None:
    """ValueError naming the first id outside ``[0, input_hash_size)`` (one host sync)."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= input_hash_size)
    if bool(bad.any()):
        first = int(ids[torch.nonzero(bad)[0, 0]])
        raise ValueError(f"{what} {first} is outside [0, {input_hash_size}) of embedding.managed.input_hash_size "
                         f"({int(bad.sum())} such id(s)): raw ids must be >= 0 and below it")
