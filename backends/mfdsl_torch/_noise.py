"""The torch backend's Langevin noise, one source per network (``torch { noise = … }``).

* ``philox`` (the default): the counter-based noise that :mod:`mfdsl.plugin.noise`
  defines — entry ``e`` of parameter slot ``j`` at step ``s`` is a function of the run's
  key and ``(s, j, e)`` alone.  On the CPU the native library's C loop draws it (about
  1.5 ns a float32 normal, a third of torch's ``normal_``); elsewhere (CUDA, or no C
  compiler) torch ops do, with the same bits: every implementation performs the same
  correctly rounded operations in the same order (tests compare them with the numpy
  reference).  Neither the step loop, nor the chunking, nor the device changes a run's
  noise.
* ``torch``: a ``torch.Generator`` seeded from stream ``NOISE`` (index 0), drawn in the
  order the steps consume it — the noise of mfdsl's stores before stream layout 3, kept
  so that their runs can be reproduced bit for bit.

A network's parameters are numbered by :func:`slot`: weight layer ``i``'s weights
``2i``, its bias ``2i + 1``.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np
import torch

from mfdsl.plugin import Stream, noise
from mfdsl.plugin import streams as _streams

__all__ = ["KINDS", "NoiseSource", "slot", "torch_normal"]

#: the values of the ``noise`` option
KINDS = ("philox", "torch")

_MASK = 0xFFFFFFFF

#: torch-op draws: steps drawn at once per parameter, and the most entries of such a block
_AHEAD_STEPS = 64
_AHEAD_ENTRIES = 1 << 20


def slot(layer: int, bias: bool = False) -> int:
    """The counter word of a parameter: weight layer ``layer``'s (0-based) weights or bias."""
    return 2 * layer + int(bias)


class NoiseSource:
    """The Langevin noise of one network: its kind, and its key (``philox``) or its
    generator (``torch``, whose state advances as it draws)."""

    def __init__(self, kind: str, seed_of_data: int, device: torch.device | str, dtype: torch.dtype) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.device = torch.device(device)
        self.dtype = dtype
        self.key = noise.key(seed_of_data)
        self.generator: torch.Generator | None = None
        # the C loop, where it draws (the CPU, a compiler at hand): looked up once
        self._lib = _library() if kind == "philox" and self.device.type == "cpu" else None
        # torch-op draws ahead: per slot, (first step, (steps, n) block)
        self._ahead: dict[int, tuple[int, torch.Tensor | None]] = {}
        if kind == "torch":
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(_streams.torch_seed(seed_of_data, Stream.NOISE))

    @property
    def counter_based(self) -> bool:
        """Whether a draw is keyed by its place (``philox``) rather than by the draws before it."""
        return self.kind == "philox"

    def fill(self, out: torch.Tensor, slot: int, step: int) -> torch.Tensor:
        """``out`` (contiguous, any shape) ← the noise of parameter ``slot`` at ``step``
        (``torch``: the generator's next ``out.numel()`` normals)."""
        if self.generator is not None:
            return out.normal_(generator=self.generator)
        row = out.view(1, -1)
        if out.device.type == "cpu" and self._lib is not None:
            self.fill_steps(row, slot, step)
            return out
        # torch ops cost ~100 small kernels a draw whatever its size: draw up to
        # _AHEAD_STEPS steps at once (at most _AHEAD_ENTRIES entries) and hand them out
        n = row.shape[1]
        first, block = self._ahead.get(slot, (0, None))
        if block is None or not (first <= step < first + block.shape[0]) or block.shape[1] != n:
            ahead = max(1, min(_AHEAD_STEPS, _AHEAD_ENTRIES // max(1, n)))
            block = torch_normal(self.key, slot, step, ahead, n, out.dtype, out.device)
            first = step
            self._ahead[slot] = (first, block)
        row.copy_(block[step - first])
        return out

    def fill_steps(self, out: torch.Tensor, slot: int, step0: int) -> torch.Tensor:
        """``out`` ``(m, n)`` (rows contiguous, any row stride) ← the counter-based noise
        of parameter ``slot`` at steps ``step0 … step0 + m − 1``."""
        if self.generator is not None:
            raise ValueError("a torch generator draws in order; fill_steps is for counter-based noise")
        m, n = (int(x) for x in out.shape)
        if m == 0 or n == 0:
            return out
        if out.stride(1) != 1 and n > 1:
            raise ValueError("fill_steps needs rows of contiguous entries")
        lib = self._lib if out.device.type == "cpu" else None
        if lib is not None and out.dtype in (torch.float32, torch.float64):
            fn = lib.mf_normal_f64 if out.dtype == torch.float64 else lib.mf_normal_f32
            fn(self.key[0], self.key[1], slot, step0, m, n, out.data_ptr(), out.stride(0))
        else:
            out.copy_(torch_normal(self.key, slot, step0, m, n, out.dtype, out.device))
        return out


def _library() -> Any:
    from . import _native

    return _native.library()


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 of one counter by the native library (the known-answer tests)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native library is not available")
    ctr = (ctypes.c_uint32 * 4)(*counter)
    out = (ctypes.c_uint32 * 4)()
    lib.mf_philox4x32(key[0], key[1], ctypes.addressof(ctr), ctypes.addressof(out))
    return tuple(int(x) for x in out)


# ---- the same noise in torch ops (CUDA, or without a C compiler)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` of the 64-bit product of 32-bit words ``a`` (int64) and ``m``, in int64
    arithmetic that never overflows (``m`` split into 16-bit halves)."""
    p1 = a * (m >> 16)  # < 2⁴⁸
    p0 = a * (m & 0xFFFF)
    lo = (((p1 & 0xFFFF) << 16) + p0) & _MASK
    hi = (p1 + (p0 >> 16)) >> 16
    return hi, lo


def _philox(c: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    k0, k1 = key
    for r in range(noise.ROUNDS):
        q0 = (k0 + r * noise.PHILOX_W[0]) & _MASK
        q1 = (k1 + r * noise.PHILOX_W[1]) & _MASK
        hi0, lo0 = _mulhilo(c[0], noise.PHILOX_M[0])
        hi1, lo1 = _mulhilo(c[2], noise.PHILOX_M[1])
        c = [hi1 ^ c[1] ^ q0, lo1, hi0 ^ c[3] ^ q1, lo0]
    return c


def _two_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)`` with ``p = fl(a b)`` and ``a b = p + e`` exactly (Dekker, float64, no FMA)."""
    split = 134217729.0  # 2²⁷ + 1

    def halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = v * split
        hi = t - (t - v)
        return hi, v - hi

    (ah, al), (bh, bl) = halves(a), halves(b)
    p = a * b
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of float64 ``x > 0``.  ``torch.sqrt`` on the CPU
    is off by an ulp for some arguments (measured: 3 in 1 000); the exact residues of
    ``y·y⁺`` and ``y⁻·y`` against ``x`` (Tuckerman's test) say whether to step up or down."""
    y = torch.sqrt(x)
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    p, e = _two_product(y, up)
    y = torch.where((x - p) - e >= 0, up, y)  # x ≥ y·y⁺: y is below √x's rounding
    down = torch.nextafter(y, torch.zeros_like(y))
    p, e = _two_product(down, y)
    return torch.where((x - p) - e <= 0, down, y)  # x ≤ y⁻·y: above it


def _horner(coefs: list[Any], w: torch.Tensor) -> torch.Tensor:
    p = torch.full_like(w, float(coefs[0]))
    for c in coefs[1:]:
        p = p * w + float(c)
    return p


def _box_muller(
    j1: torch.Tensor, j2: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """:func:`mfdsl.core.noise._box_muller` in torch ops, operation for operation."""
    k = noise.constants(np.float64 if dtype == torch.float64 else np.float32)
    u1 = (j1 + 1).to(dtype) * 2.0**-bits
    m, e = torch.frexp(u1)
    low = m < float(k["sqrt_half"])
    m = torch.where(low, m + m, m)
    ef = (e.to(torch.int64) - low.to(torch.int64)).to(dtype)
    f = m - 1.0
    s = f / (f + 2.0)
    p = _horner(k["log"], s * s)
    sp = s * p
    ln_u1 = ef * float(k["ln2_hi"]) + (ef * float(k["ln2_lo"]) + (sp + sp))
    # √ correctly rounded (float32: through float64, where double rounding is exact for √)
    r = _sqrt_rn((-(ln_u1 + ln_u1)).to(torch.float64)).to(dtype)
    quarter = 1 << (bits - 2)
    q = (j2 + (quarter >> 1)) >> (bits - 2)
    t = (j2 - q * quarter).to(dtype) * 2.0 ** -(bits - 2)
    th = t * float(k["half_pi"])
    w = th * th
    sin = th + th * (w * _horner(k["sin"], w))
    cos = w * _horner(k["cos"], w) + 1.0
    q = q & 3
    c = torch.where(q == 0, cos, torch.where(q == 1, -sin, torch.where(q == 2, -cos, sin)))
    sn = torch.where(q == 0, sin, torch.where(q == 1, cos, torch.where(q == 2, -sin, -cos)))
    return r * c, r * sn


def torch_normal(
    key: tuple[int, int],
    slot: int,
    step0: int,
    m: int,
    n: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """:func:`mfdsl.plugin.noise.normal` in torch ops on ``device``: ``(m, n)``."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the counter-based noise comes in float32 or float64, not {dtype}")
    lanes = noise.LANES[np.dtype(np.float64 if dtype == torch.float64 else np.float32)]
    blocks = -(-n // lanes)
    i64 = torch.int64
    steps = torch.arange(step0, step0 + m, dtype=i64, device=device)[:, None]
    b = torch.arange(blocks, dtype=i64, device=device)[None, :]
    shape = (m, blocks)
    c = [
        b.expand(shape) & _MASK,
        torch.full(shape, slot & _MASK, dtype=i64, device=device),
        (steps & _MASK).expand(shape),
        (steps >> 32).expand(shape),
    ]
    x0, x1, x2, x3 = _philox(c, key)
    if lanes == 4:
        za, zb = _box_muller(x0 >> 8, x1 >> 8, 24, dtype)
        zc, zd = _box_muller(x2 >> 8, x3 >> 8, 24, dtype)
        out = torch.stack([za, zb, zc, zd], dim=-1)
    else:
        j1 = ((x0 >> 5) << 26) | (x1 >> 6)
        j2 = ((x2 >> 5) << 26) | (x3 >> 6)
        out = torch.stack(list(_box_muller(j1, j2, 53, dtype)), dim=-1)
    return out.reshape(m, blocks * lanes)[:, :n]
