"""The counter-based Langevin noise (``torch { noise = philox }``, the default).

Its definition is :mod:`mfdsl.core.noise` (numpy); the torch backend draws it in C
(``_noise.c``) and, on CUDA or without a C compiler, in torch ops.  Tested here: the
Philox4x32-10 known answers (Random123's ``kat_vectors``); the three implementations
equal bit for bit; the draws are standard normals (moments and the Kolmogorov–Smirnov
distance within bounds that hold with probability ≥ 1 − 10⁻⁵ each), uncorrelated across
entries, steps, slots and seeds, and accurate against libm's Box–Muller of the same
uniforms; a draw does not depend on how the steps are chunked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mfdsl.core import noise

torch = pytest.importorskip("torch")
from mfdsl_torch import _native
from mfdsl_torch._noise import NoiseSource, _sqrt_rn, philox4x32, torch_normal

#: Random123's tests/kat_vectors, the three philox4x32 10 lines: counter, key, result
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

DTYPES = [(np.float32, torch.float32), (np.float64, torch.float64)]

needs_native = pytest.mark.skipif(
    _native.library() is None, reason="the native library cannot be built here (no C compiler)"
)


@pytest.mark.parametrize(("counter", "key", "want"), KAT)
def test_philox_known_answers(counter: tuple[int, ...], key: tuple[int, int], want: tuple[int, ...]) -> None:
    got = noise.philox4x32(tuple(np.array([c], np.uint32) for c in counter), key)
    assert tuple(int(w[0]) for w in got) == want
    if _native.library() is not None:
        assert philox4x32(counter, key) == want


# ---- one definition, three implementations


CASES = [
    # (slot, step0, steps, n): lanes split, a tail, a block of 64 counters and more,
    # the step crossing 2³², the largest slot
    (0, 0, 1, 1),
    (3, 7, 2, 3),
    (1, 5, 3, 4),
    (2, 0, 2, 5),
    (5, 2**32 - 2, 4, 255),
    (2**32 - 1, 11, 2, 256),
    (6, 1, 2, 257),
    (4, 123456789, 2, 1031),
]


@needs_native
@pytest.mark.parametrize(("np_dt", "t_dt"), DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_c_loop_draws_the_reference_bits(np_dt: type, t_dt: object, case: tuple[int, ...]) -> None:
    slot, step0, steps, n = case
    src = NoiseSource("philox", 17, "cpu", t_dt)  # type: ignore[arg-type]
    ref = noise.normal(src.key, slot, step0, steps, n, np_dt)
    out = torch.full((steps, n + 3), math.nan, dtype=t_dt)  # rows apart: a row stride > n
    src.fill_steps(out[:, :n], slot, step0)
    np.testing.assert_array_equal(out[:, :n].numpy(), ref)
    assert bool(out[:, n:].isnan().all()), "wrote outside the rows"


@pytest.mark.parametrize(("np_dt", "t_dt"), DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_torch_ops_draw_the_reference_bits(np_dt: type, t_dt: object, case: tuple[int, ...]) -> None:
    slot, step0, steps, n = case
    key = noise.key(17)
    got = torch_normal(key, slot, step0, steps, n, t_dt, "cpu")  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.numpy(), noise.normal(key, slot, step0, steps, n, np_dt))


@pytest.mark.parametrize(("np_dt", "t_dt"), DTYPES, ids=["float32", "float64"])
def test_many_entries_agree_bit_for_bit(np_dt: type, t_dt: object) -> None:
    """A larger draw, where rare roundings show: ``torch.sqrt`` on the CPU is off by an
    ulp for about 3 arguments in 1 000, which the torch-op version corrects."""
    key = noise.key(3)
    ref = noise.normal(key, 9, 40, 4, 50_000, np_dt)
    np.testing.assert_array_equal(torch_normal(key, 9, 40, 4, 50_000, t_dt, "cpu").numpy(), ref)  # type: ignore[arg-type]
    if _native.library() is not None:
        out = torch.empty((4, 50_000), dtype=t_dt)  # type: ignore[call-overload]
        NoiseSource("philox", 3, "cpu", t_dt).fill_steps(out, 9, 40)  # type: ignore[arg-type]
        np.testing.assert_array_equal(out.numpy(), ref)


def test_the_square_root_is_correctly_rounded() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(200_000) * 80 + 1e-12, rng.random(20_000) * 1e-9, [2.0, 4.0, 0.5]])
    np.testing.assert_array_equal(_sqrt_rn(torch.from_numpy(x)).numpy(), np.sqrt(x))
    x32 = x.astype(np.float32)
    got = _sqrt_rn(torch.from_numpy(x32).double()).float().numpy()
    np.testing.assert_array_equal(got, np.sqrt(x32))


def test_the_c_constants_come_from_the_reference() -> None:
    """``_noise.c`` takes every constant from the header :func:`noise.c_header` renders."""
    text = noise.c_header()
    k = noise.constants(np.float64)
    assert f"{float(k['half_pi']).hex()}" in text  # type: ignore[arg-type]
    assert f"#define PHILOX_ROUNDS {noise.ROUNDS}" in text
    source = (_native._NOISE_SOURCE).read_text()
    assert '#include "_noise_consts.h"' in source
    for literal in ("0xD2511F53", "0xCD9E8D57", "0x9E3779B9", "0xBB67AE85"):
        assert literal.lower() not in source.lower(), f"{literal} is defined in noise.py, not in C"


# ---- the draws are standard normals


def _ks_distance(z: np.ndarray) -> float:
    """The Kolmogorov–Smirnov distance between the sample ``z`` and N(0, 1)."""
    z = np.sort(z)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))
    n = z.size
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_draws_are_standard_normal(dtype: type) -> None:
    n = 1 << 18
    z = noise.normal(noise.key(5), 2, 1000, 4, n // 4, dtype).astype(np.float64).ravel()
    # 5-sigma bounds of the sampling distributions of the moments under N(0, 1)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z**3)) < 5 * math.sqrt(15 / n)
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / n)
    # P(√n D > 2.3) ≈ 1.2·10⁻⁴ (Kolmogorov's limit law)
    assert _ks_distance(z[:65536]) < 2.3 / math.sqrt(65536)
    # the tails reach as far as the uniforms' resolution lets them
    assert np.abs(z).max() > 4.0
    assert np.abs(z).max() <= (5.77 if dtype is np.float32 else 8.58)


def test_entries_steps_slots_and_seeds_are_uncorrelated() -> None:
    n = 1 << 16
    bound = 5 / math.sqrt(n)  # a correlation of independent samples is ≈ N(0, 1/n)
    key = noise.key(1)
    z = noise.normal(key, 0, 0, 2, n)
    pairs = {
        "neighbouring entries (one Box–Muller pair)": (z[0, 0::2], z[0, 1::2]),
        "entries four apart (neighbouring counters)": (z[0, :-4], z[0, 4:]),
        "consecutive steps": (z[0], z[1]),
        "neighbouring slots": (z[0], noise.normal(key, 1, 0, 1, n)[0]),
        "neighbouring seeds": (z[0], noise.normal(noise.key(2), 0, 0, 1, n)[0]),
    }
    for what, (a, b) in pairs.items():
        r = float(np.corrcoef(a, b)[0, 1])
        assert abs(r) < bound * math.sqrt(n / a.size), f"{what}: correlation {r:.4f}"
    # the squares too (Box–Muller's pair shares its radius: r cos θ, r sin θ are still independent)
    r2 = float(np.corrcoef(z[0, 0::2] ** 2, z[0, 1::2] ** 2)[0, 1])
    assert abs(r2) < 5 / math.sqrt(n / 2)


@pytest.mark.parametrize(
    ("dtype", "bits", "tol"), [(np.float32, 24, 8 * 2.0**-23), (np.float64, 53, 16 * 2.0**-52)]
)
def test_the_transform_is_accurate(dtype: type, bits: int, tol: float) -> None:
    """Against libm's ``log``, ``cos``, ``sin`` (float64) on the same uniforms: within 8
    ulp of float32, 16 of float64 (measured: 3 and 10; the reference's own roundings of
    ``2π u₂`` and of its products are a few of them), relative to ``max(1, |z|)``."""
    key, n = noise.key(8), 20_000
    lanes = noise.LANES[np.dtype(dtype)]
    z = noise.normal(key, 4, 9, 1, n, dtype)[0].astype(np.float64)
    b = np.arange(n // lanes, dtype=np.uint64)
    x = [w.astype(np.int64) for w in noise.philox4x32((b, np.uint64(4), np.uint64(9), np.uint64(0)), key)]
    if lanes == 4:
        pairs = [(x[0] >> 8, x[1] >> 8), (x[2] >> 8, x[3] >> 8)]
    else:
        pairs = [(((x[0] >> 5) << 26) | (x[1] >> 6), ((x[2] >> 5) << 26) | (x[3] >> 6))]
    ref = []
    for j1, j2 in pairs:
        u1 = (j1 + 1) * 2.0**-bits
        u2 = j2 * 2.0**-bits
        r = np.sqrt(-2 * np.log(u1))
        ref += [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]
    want = np.stack(ref, axis=-1).reshape(-1)
    err = np.abs(z - want) / np.maximum(1.0, np.abs(want))
    assert err.max() < tol, err.max()


# ---- a draw is a function of its place


def test_a_draw_does_not_depend_on_the_chunking() -> None:
    src = NoiseSource("philox", 4, "cpu", torch.float32)
    whole = torch.empty((10, 77), dtype=torch.float32)
    src.fill_steps(whole, 3, 100)
    for step in range(10):
        one = torch.empty(7, 11, dtype=torch.float32)  # any shape: its entries in order
        src.fill(one, 3, 100 + step)
        assert torch.equal(one.reshape(-1), whole[step])
    other = torch.empty((10, 77), dtype=torch.float32)
    src.fill_steps(other, 4, 100)
    assert not torch.equal(other, whole)


def test_torch_noise_is_torchs_generator_in_order() -> None:
    from mfdsl.core.streams import Stream, torch_seed

    src = NoiseSource("torch", 4, "cpu", torch.float64)
    gen = torch.Generator()
    gen.manual_seed(torch_seed(4, Stream.NOISE))
    a, b = torch.empty(5, dtype=torch.float64), torch.empty(3, dtype=torch.float64)
    src.fill(a, 0, 0)
    src.fill(b, 7, 99)  # the slot and step do not matter: the next numbers
    want = torch.empty(8, dtype=torch.float64).normal_(generator=gen)
    assert torch.equal(torch.cat([a, b]), want)
    with pytest.raises(ValueError, match="draws in order"):
        src.fill_steps(torch.empty(2, 2, dtype=torch.float64), 0, 0)
    with pytest.raises(ValueError, match="unknown noise kind"):
        NoiseSource("mt19937", 4, "cpu", torch.float64)


def test_torch_ops_drawn_ahead_give_the_same_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C loop (CUDA, no compiler) the source draws blocks of steps ahead in
    torch ops; the numbers are those of the C loop step by step, across block edges, for
    any order of slots."""
    import mfdsl_torch._noise as mod

    ref = noise.normal(noise.key(6), 0, 0, 70, 33, np.float32)
    ref_b = noise.normal(noise.key(6), 1, 0, 70, 5, np.float32)
    monkeypatch.setattr(mod, "_library", lambda: None)
    monkeypatch.setattr(mod, "_AHEAD_STEPS", 8)
    src = NoiseSource("philox", 6, "cpu", torch.float32)
    out, out_b = torch.empty(33), torch.empty(5)
    for step in [*range(0, 20), 40, 41, 69, 3]:
        src.fill(out, 0, step)
        src.fill(out_b, 1, step)
        np.testing.assert_array_equal(out.numpy(), ref[step])
        np.testing.assert_array_equal(out_b.numpy(), ref_b[step])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_jax_limit_draws_the_same_noise(dtype: type) -> None:
    """The jax backend's version (traced, for the limit's particles): Philox's words
    exactly, the normals to the last place (XLA may fuse a product and a sum)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from mfdsl_jax import _noise as jnoise

    key = noise.key(12)
    b = np.arange(300, dtype=np.uint32)
    counter = (b, np.full_like(b, 5), np.full_like(b, 2**32 - 1), np.full_like(b, 1))
    want = noise.philox4x32(counter, key)
    got = jnoise._philox([jnp.asarray(c) for c in counter], jnoise.key_array(12))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    from mfdsl_jax._solver import _x64

    shape = (37, 11)
    with _x64(dtype is np.float64):
        z = jax.jit(lambda s: jnoise.normal(jnoise.key_array(12), 3, s, shape, dtype))(jnp.asarray(40))
        z = np.asarray(z)
    ref = noise.normal(key, 3, 40, 1, 37 * 11, dtype)[0].reshape(shape)
    eps = float(np.finfo(dtype).eps)
    assert z.dtype == ref.dtype
    np.testing.assert_allclose(z, ref, rtol=4 * eps, atol=4 * eps)
    assert jnoise.slot("W1") == 0 and jnoise.slot("b1") == 1 and jnoise.slot("W3") == 4
