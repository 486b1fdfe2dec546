"""Counter-based Gaussian noise: the definition of the ``philox`` Langevin noise.

A noise entry is a function of where it sits, not of what was drawn before it:

    Z[run, step s, parameter slot j, entry e]

is computed from the run's 64-bit key (:func:`key`: stream ``NOISE``, index 1, of the
run's ``data_seed``) and the counter ``(e // L, j, s mod 2³², s div 2³²)`` by
Philox4x32-10 (Salmon et al., *Parallel random numbers: as easy as 1, 2, 3*, SC 2011;
the generator of cuRAND and of torch's CUDA streams), whose four 32-bit words make
``L`` normals by the Box–Muller transform: ``L = 4`` in float32 (24-bit uniforms, two
pairs), ``L = 2`` in float64 (53-bit uniforms, one pair).  So the noise of a step does
not depend on how steps are chunked, on which other networks train beside it, on the
device, or on which step loop draws it, and skipping a draw (a layer whose rate is 0)
shifts nothing.

The transform uses only operations IEEE 754 rounds exactly — ``+ − × ÷ √``, integer
arithmetic and exact conversions (``frexp``), never a library ``log``/``sin``/``cos``,
whose last bits differ between libms and devices: ``ln`` is the ``atanh`` series
``2 s (1 + s²/3 + s⁴/5 + …)`` on ``[√½, √2)``, ``cos``/``sin`` Taylor polynomials on
``[−π/4, π/4]`` after an exact reduction by quarter turns.  Every implementation that
performs these operations in this order — this module (numpy, the reference), the
torch backend's C loop (compiled without FMA contraction) and its torch-op version
(CPU or CUDA) — produces the same bits; tests compare them.  The jax backend draws it
too under ``jax { noise = philox }``, for the limit's particles (XLA may fuse a product
and a sum: equal to the last place).  The polynomials'
truncation errors are below half an ulp of their precision (``|z|`` is accurate to a
few ulp); the largest ``|z|`` is ``√(2·24 ln 2) ≈ 5.77`` in float32 and ``≈ 8.57`` in
float64.

This module is the source of the constants: :func:`c_header` renders them for C.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from . import streams
from .streams import Stream

__all__ = [
    "KEY_INDEX",
    "LANES",
    "PHILOX_M",
    "PHILOX_W",
    "ROUNDS",
    "c_header",
    "constants",
    "key",
    "normal",
    "philox4x32",
]

#: the index of stream NOISE that keys the counter-based noise (index 0 seeds torch's
#: generator under ``noise = torch``)
KEY_INDEX = 1

#: Philox4x32's multipliers and Weyl key increments (Random123)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10

#: normals per counter: one per 32-bit word in float32 (24-bit uniforms), one per two in
#: float64 (53-bit uniforms)
LANES = {np.dtype(np.float32): 4, np.dtype(np.float64): 2}

_MASK = 0xFFFFFFFF


def key(seed: int) -> tuple[int, int]:
    """The two key words of the counter-based noise of a run with data seed ``seed``."""
    words = streams.seed_sequence(seed, Stream.NOISE, KEY_INDEX).generate_state(2, np.uint32)
    return int(words[0]), int(words[1])


def philox4x32(counter: tuple[Any, ...], key_words: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of four arrays of counter words (any shape, broadcast) under the key
    ``key_words``: four ``uint32`` arrays."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK for c in counter)
    k0, k1 = (np.uint64(k) for k in key_words)
    m0, m1 = (np.uint64(m) for m in PHILOX_M)
    w0, w1 = (np.uint64(w) for w in PHILOX_W)
    mask, shift = np.uint64(_MASK), np.uint64(32)
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = m0 * c0, m1 * c2  # < 2⁶⁴: exact in uint64
        c0, c1, c2, c3 = (
            ((p1 >> shift) ^ c1 ^ k0) & mask,
            p1 & mask,
            ((p0 >> shift) ^ c3 ^ k1) & mask,
            p0 & mask,
        )
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


# ---- the Box–Muller transform's constants, per precision


_LN2 = Fraction("0.69314718055994530941723212145817656807550013436")
_PI = Fraction("3.14159265358979323846264338327950288419716939938")


def _truncated(x: Fraction, bits: int) -> float:
    """``x`` with its significand cut to ``bits`` bits (``0 < x``)."""
    e = math.floor(math.log2(x))
    scale = Fraction(2) ** (bits - 1 - e)
    return float(Fraction(math.floor(x * scale)) / scale)


def _rounded(x: Fraction, dtype: type) -> np.floating:
    return dtype(float(x)) if dtype is np.float64 else np.float32(float(x))


#: terms of the atanh series (1, 1/3, 1/5, …) and of the sine's and cosine's Taylor
#: polynomials kept per precision: truncation below half an ulp on the reduced ranges
_TERMS: dict[Any, tuple[int, int, int]] = {np.float32: (6, 5, 6), np.float64: (12, 9, 10)}


def _constants(dtype: type) -> dict[str, Any]:
    n_log, n_sin, n_cos = _TERMS[dtype]
    # ln 2 = hi + lo, hi with few enough significant bits that e·hi is exact for every
    # exponent e of a uniform (|e| ≤ 53)
    hi = _truncated(_LN2, 16 if dtype is np.float32 else 40)
    ln2_hi, ln2_lo = Fraction(hi), _LN2 - Fraction(hi)
    fact = math.factorial
    return {
        "ln2_hi": _rounded(ln2_hi, dtype),
        "ln2_lo": _rounded(ln2_lo, dtype),
        "sqrt_half": _rounded(Fraction(math.sqrt(0.5)), dtype),
        "half_pi": _rounded(_PI / 2, dtype),
        # highest power first (Horner)
        "log": [_rounded(Fraction(1, 2 * k + 1), dtype) for k in reversed(range(n_log))],
        "sin": [_rounded(Fraction((-1) ** k, fact(2 * k + 1)), dtype) for k in reversed(range(1, n_sin))],
        "cos": [_rounded(Fraction((-1) ** k, fact(2 * k)), dtype) for k in reversed(range(1, n_cos))],
    }


_CONST = {np.dtype(np.float32): _constants(np.float32), np.dtype(np.float64): _constants(np.float64)}


def constants(dtype: type) -> dict[str, Any]:
    """The transform's constants in ``dtype`` (float32 or float64): ``ln2_hi``, ``ln2_lo``,
    ``sqrt_half``, ``half_pi`` and the Horner coefficients ``log``, ``sin``, ``cos``
    (highest power first)."""
    return _CONST[np.dtype(dtype)]


def _horner(coefs: list[np.floating], w: np.ndarray) -> np.ndarray:
    p = np.full_like(w, coefs[0])
    for c in coefs[1:]:
        p = p * w + c
    return p


def _box_muller(j1: np.ndarray, j2: np.ndarray, bits: int, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(r cos 2πu₂, r sin 2πu₂)``, ``r = √(−2 ln u₁)``, for ``u₁ = (j₁ + 1) 2^−bits`` and
    ``u₂ = j₂ 2^−bits`` (``j`` integers in ``[0, 2^bits)``, int64)."""
    k = _CONST[dt]
    ftype = dt.type
    one, two = ftype(1), ftype(2)
    u1 = (j1 + 1).astype(dt) * ftype(2.0**-bits)  # exact
    m, e = np.frexp(u1)  # u1 = m 2^e, m ∈ [½, 1): exact
    low = m < k["sqrt_half"]
    m = np.where(low, m + m, m)
    e = (e - low).astype(dt)
    f = m - one
    s = f / (two + f)
    p = _horner(k["log"], s * s)
    sp = s * p
    ln_u1 = e * k["ln2_hi"] + (e * k["ln2_lo"] + (sp + sp))
    r = np.sqrt(-(ln_u1 + ln_u1))
    # 2π u₂ = (q + t) π/2 with q = round(4 u₂) and t ∈ [−½, ½]: exact in integers
    quarter = 1 << (bits - 2)
    q = (j2 + (quarter >> 1)) >> (bits - 2)
    t = (j2 - q * quarter).astype(dt) * ftype(2.0 ** -(bits - 2))
    th = t * k["half_pi"]
    w = th * th
    sin = th + th * (w * _horner(k["sin"], w))
    cos = one + w * _horner(k["cos"], w)
    q &= 3
    c = np.where(q == 0, cos, np.where(q == 1, -sin, np.where(q == 2, -cos, sin)))
    sn = np.where(q == 0, sin, np.where(q == 1, cos, np.where(q == 2, -sin, -cos)))
    return r * c, r * sn


def normal(
    key_words: tuple[int, int], slot: int, step0: int, steps: int, n: int, dtype: type = np.float64
) -> np.ndarray:
    """The noise of parameter slot ``slot`` for steps ``step0 … step0 + steps − 1``, ``n``
    entries each: an array ``(steps, n)`` of ``dtype`` (float32 or float64)."""
    dt = np.dtype(dtype)
    if dt not in LANES:
        raise ValueError(f"the counter-based noise comes in float32 or float64, not {dt}")
    lanes = LANES[dt]
    blocks = -(-n // lanes)
    step = np.arange(step0, step0 + steps, dtype=np.uint64)[:, None]
    b = np.arange(blocks, dtype=np.uint64)[None, :]
    x0, x1, x2, x3 = philox4x32(
        (b, np.uint64(slot), step & np.uint64(_MASK), step >> np.uint64(32)), key_words
    )
    x0, x1, x2, x3 = (np.broadcast_to(x, (steps, blocks)).astype(np.int64) for x in (x0, x1, x2, x3))
    if lanes == 4:
        za, zb = _box_muller(x0 >> 8, x1 >> 8, 24, dt)
        zc, zd = _box_muller(x2 >> 8, x3 >> 8, 24, dt)
        out = np.stack([za, zb, zc, zd], axis=-1)
    else:
        j1 = ((x0 >> 5) << 26) | (x1 >> 6)
        j2 = ((x2 >> 5) << 26) | (x3 >> 6)
        out = np.stack(_box_muller(j1, j2, 53, dt), axis=-1)
    return out.reshape(steps, blocks * lanes)[:, :n].copy()


def c_header() -> str:
    """The constants above as C (``_noise_consts.h`` of the torch backend's native loop)."""
    lines = [
        "/* generated by mfdsl/core/noise.py: the counter-based noise's constants; edit them there */",
        "#ifndef MF_NOISE_CONSTS_H",
        "#define MF_NOISE_CONSTS_H",
        f"#define PHILOX_M0 {PHILOX_M[0]:#x}u",
        f"#define PHILOX_M1 {PHILOX_M[1]:#x}u",
        f"#define PHILOX_W0 {PHILOX_W[0]:#x}u",
        f"#define PHILOX_W1 {PHILOX_W[1]:#x}u",
        f"#define PHILOX_ROUNDS {ROUNDS}",
    ]
    for dt, sfx, lit in ((np.dtype(np.float32), "F32", "f"), (np.dtype(np.float64), "F64", "")):
        k = _CONST[dt]
        for name in ("ln2_hi", "ln2_lo", "sqrt_half", "half_pi"):
            lines.append(f"#define NZ_{name.upper()}_{sfx} {float(k[name]).hex()}{lit}")
        for name in ("log", "sin", "cos"):
            coefs = k[name]
            body = ", ".join(f"{float(c).hex()}{lit}" for c in coefs)
            lines.append(f"#define NZ_N{name.upper()}_{sfx} {len(coefs)}")
            lines.append(f"#define NZ_{name.upper()}_{sfx} {{{body}}}")
    lines += ["#endif", ""]
    return "\n".join(lines)
