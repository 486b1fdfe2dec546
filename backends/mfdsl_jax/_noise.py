"""The counter-based Langevin noise (:mod:`mfdsl.plugin.noise`) in jax ops, traceable.

Under ``jax { noise = philox }`` the limit's particles take the noise a width-N network
of the torch backend takes:
entry e of parameter ``W{ℓ}`` (slot ``2(ℓ−1)``) or ``b{ℓ}`` (slot ``2(ℓ−1)+1``) at Euler
step s is the reference's normal for (key, s, slot, e), so that with N particles,
``dt = lr`` and ``reduce = none`` a noisy run is the torch run of width N (tested to
float64 rounding; XLA may fuse a product and a sum, so the bits may differ in the last
place).  Philox's 32×32→64-bit products are taken in 16-bit halves: uint32 arithmetic
only, which jax has with or without 64-bit types.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from mfdsl.plugin import noise

__all__ = ["key_array", "normal", "slot"]

_MASK = 0xFFFFFFFF


def slot(name: str) -> int:
    """The counter word of a parameter ``W{ℓ}`` or ``b{ℓ}`` (the torch backend's numbering)."""
    return 2 * (int(name[1:]) - 1) + (name[0] == "b")


def _mulhilo(a: Any, m: int) -> tuple[Any, Any]:
    """``(hi, lo)`` of the 64-bit product of uint32 words ``a`` and the constant ``m``."""
    u32 = jnp.uint32
    al, ah = a & u32(0xFFFF), a >> u32(16)
    ml, mh = u32(m & 0xFFFF), u32(m >> 16)
    ll, lh, hl, hh = al * ml, al * mh, ah * ml, ah * mh  # each < 2³²
    mid = (ll >> u32(16)) + (lh & u32(0xFFFF)) + (hl & u32(0xFFFF))
    lo = (mid << u32(16)) | (ll & u32(0xFFFF))
    hi = hh + (lh >> u32(16)) + (hl >> u32(16)) + (mid >> u32(16))
    return hi, lo


def _philox(c: list[Any], key: Any) -> list[Any]:
    u32 = jnp.uint32
    key = jnp.asarray(key, dtype=u32)
    for r in range(noise.ROUNDS):
        # uint32 arithmetic wraps: the key schedule mod 2³²
        q0 = key[0] + u32(r * noise.PHILOX_W[0] & _MASK)
        q1 = key[1] + u32(r * noise.PHILOX_W[1] & _MASK)
        hi0, lo0 = _mulhilo(c[0], noise.PHILOX_M[0])
        hi1, lo1 = _mulhilo(c[2], noise.PHILOX_M[1])
        c = [hi1 ^ c[1] ^ q0, lo1, hi0 ^ c[3] ^ q1, lo0]
    return c


def _horner(coefs: list[Any], w: Any) -> Any:
    p = jnp.full_like(w, coefs[0])
    for c in coefs[1:]:
        p = p * w + jnp.asarray(c, w.dtype)
    return p


def _box_muller(j1: Any, j2: Any, bits: int, dtype: Any) -> tuple[Any, Any]:
    """:func:`mfdsl.core.noise._box_muller` in jax ops."""
    k = noise.constants(np.dtype(dtype).type)
    c = lambda x: jnp.asarray(x, dtype)  # noqa: E731 - constants in the working precision
    u1 = (j1 + 1).astype(dtype) * c(2.0**-bits)
    m, e = jnp.frexp(u1)
    low = m < c(k["sqrt_half"])
    m = jnp.where(low, m + m, m)
    ef = (e - low.astype(e.dtype)).astype(dtype)
    f = m - c(1.0)
    s = f / (c(2.0) + f)
    p = _horner(k["log"], s * s)
    sp = s * p
    ln_u1 = ef * c(k["ln2_hi"]) + (ef * c(k["ln2_lo"]) + (sp + sp))
    r = jnp.sqrt(-(ln_u1 + ln_u1))
    quarter = 1 << (bits - 2)
    q = (j2 + (quarter >> 1)) >> (bits - 2)
    t = (j2 - q * quarter).astype(dtype) * c(2.0 ** -(bits - 2))
    th = t * c(k["half_pi"])
    w = th * th
    sin = th + th * (w * _horner(k["sin"], w))
    cos = c(1.0) + w * _horner(k["cos"], w)
    q = q & 3
    cs = jnp.where(q == 0, cos, jnp.where(q == 1, -sin, jnp.where(q == 2, -cos, sin)))
    sn = jnp.where(q == 0, sin, jnp.where(q == 1, cos, jnp.where(q == 2, -sin, -cos)))
    return r * cs, r * sn


def key_array(seed: int) -> Any:
    """A run's key words (:func:`mfdsl.plugin.noise.key`) as a uint32 array, to pass traced
    (one compilation serves every seed)."""
    return jnp.asarray(np.asarray(noise.key(seed), dtype=np.uint32))


def normal(key: Any, slot: int, step: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """The noise of parameter ``slot`` at ``step`` (a traced integer ≥ 0), ``shape``
    entries in row-major order, under ``key`` (two uint32 words, :func:`key_array`):
    :func:`mfdsl.plugin.noise.normal`'s row, in jax."""
    dt = np.dtype(dtype)
    lanes = noise.LANES[dt]
    n = int(np.prod(shape))
    blocks = -(-n // lanes)
    u32 = jnp.uint32
    step = jnp.asarray(step)
    lo = (step & _MASK).astype(u32) if step.dtype.itemsize == 8 else step.astype(u32)
    hi = (step >> 32).astype(u32) if step.dtype.itemsize == 8 else u32(0)
    b = jnp.arange(blocks, dtype=u32)
    c = [b, jnp.full_like(b, slot & _MASK), jnp.full_like(b, lo), jnp.full_like(b, hi)]
    x0, x1, x2, x3 = _philox(c, key)
    if lanes == 4:
        i32 = jnp.int32
        za, zb = _box_muller((x0 >> u32(8)).astype(i32), (x1 >> u32(8)).astype(i32), 24, dt)
        zc, zd = _box_muller((x2 >> u32(8)).astype(i32), (x3 >> u32(8)).astype(i32), 24, dt)
        lanes_of: tuple[Any, ...] = (za, zb, zc, zd)
    else:
        i64 = jnp.int64
        j1 = ((x0 >> u32(5)).astype(i64) << 26) | (x1 >> u32(6)).astype(i64)
        j2 = ((x2 >> u32(5)).astype(i64) << 26) | (x3 >> u32(6)).astype(i64)
        lanes_of = _box_muller(j1, j2, 53, dt)
    # interleaved by strided writes: XLA fuses a stack of the lanes into one loop that
    # recomputes the whole transform per entry (40× slower, measured)
    out = jnp.zeros(blocks * lanes, dt)
    for i, z in enumerate(lanes_of):
        out = out.at[i::lanes].set(z)
    return out[:n].reshape(shape)
