"""Pinned stores: three small specs run through ``mfdsl run`` must write, bit for bit,
the numbers they wrote when the pins below were taken.

What the pins protect.  Every coordinate and data variable of each store (the trained
trajectories, ``status`` and ``message``, the sweep and step coordinates, ``time``) is
hashed — dims, dtype, shape and raw bytes, NaNs canonicalised — and compared with the
sha256 digest pinned for it, one digest per variable, so that a failure names the
variables that changed.  The store's deterministic attributes (the spec's text and IR,
the backends, the format numbers, every variable's attributes) are pinned as one more
entry, ``@attrs``.  Left out are only the attributes that differ from run to run or
machine to machine by nature: ``created`` and ``finalized`` (wall-clock timestamps),
``host``, ``versions`` (library versions) and ``spec_path`` (where the spec file lay).
The store holds no wall-clock quantity among its variables.

The specs together cover the torch backend at batch 1 (the native C row loop: a
depth-2 ReLU network with biases, momentum, logistic loss) and at batch > 1 (the native
gemm loop; ATen's batched path through ``torch { native = off }``), ensembles of several
seeds, widths and learning rates, Langevin noise with weight decay, every observable
(``output``, ``neuron_spread``, ``weight_change``, ``particles`` — with the NaN rows of
a width below the sample), a schedule, a frozen layer, teacher data walked by epochs,
and the jax backend's mean-field limit (float64, Langevin) at ``width = inf`` next to
finite widths.  Each spec runs in a subprocess through the public CLI with
``--workers 1``; the three run at once.  (Three specs, not more: one ``mfdsl run`` costs
about 6.5 s of CPU whatever the spec — the driver and its worker each import torch —
and the training here is a small fraction of that.)

The pins exist so that a restructuring meant to leave behaviour unchanged (moving
modules, splitting functions) cannot change a stored number unnoticed.  A change that
*means* to change the numbers (a new random draw, a different summation order) updates
them deliberately:

    python tests/test_store_pins.py --update

reruns the specs and rewrites the ``PINS`` table of this file; say in the commit why the
numbers moved.

Bit-stability: on the machine they were taken on the digests came out the same over
repeated runs, on a busy machine (two extra processes spinning), with the worker
confined to one core or given two (its BLAS thread count follows the cores it may use),
with ``OMP_NUM_THREADS`` 1 or 2, with the specs run one after another or at once, and
with the native loop rebuilt for AVX2 + FMA instead of AVX-512.  They do depend on the
platform: MKL's AVX2 kernels round otherwise than its AVX-512 ones (torch's products,
the native gemm loop, the probes' evaluation), XLA's do below AVX-512, the native loop
without FMA; and a new numpy, torch or jax release may change them.  So the pins record
where they were taken (``PINNED_ON``: the CPU's vendor and vector units, the numeric
libraries' versions), and elsewhere the comparison is skipped with the difference named
— a platform that should be the reference retakes them with ``--update``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

#: the store's root attributes that differ between runs or machines by nature
UNPINNED_ATTRS = frozenset({"created", "finalized", "host", "versions", "spec_path"})

#: a generous bound on one spec's run (each takes seconds)
RUN_TIMEOUT_S = 600

SPECS: dict[str, str] = {
    "batch1": """\
# batch 1: the native row loop, ensembles of 2 seeds; a depth-2 ReLU network with
# biases, momentum, logistic loss and every observable
experiment pin_batch1
data isotropic_gaussian { dim = 5, delta = 0.5, train = online, test = 32 }
network mlp { hidden = 2, activation = relu, bias = true }
scaling mean_field
init {
  layer 1 ~ normal(0, 1 / sqrt(dim))
  layer 2 ~ normal(1, 1)
  layer 3 ~ normal(0, 1)
}
train {
  optimizer = sgd(lr = 0.1, momentum = 0.5)
  loss      = logistic
  batch     = 1
  steps     = 60
}
record every 20 {
  train_loss, test_loss, test_accuracy
  output(probes = 3)
  neuron_spread
  weight_change
  particles(layer = 2, sample = 4)
}
sweep { width = [6, 10], seed = 0..1 }
backends torch
""",
    "langevin": """\
# batch 8: the native gemm loop, ensembles of 6 (seeds and learning rates as members);
# Langevin noise and weight decay, a cosine schedule, teacher data with a finite
# training set walked by epochs; particles sample more neurons than width 2 has; torch's
# generator for the noise (noise = torch: the draws of stream layout 2, which these
# pins were taken with and still match)
experiment pin_langevin
data teacher { dim = 4, teacher = mlp(width = 3), noise = 0.1, train = 64, test = 32 }
network mlp { hidden = 1, activation = act }
scaling mean_field
train {
  optimizer = langevin(lr = rate, temperature = 0.01, weight_decay = 0.1)
  loss      = mse
  batch     = 8
  epochs    = 5
  schedule  = cosine(final = 0.2)
}
record every 10 { train_loss, test_loss, output(probes = 2), neuron_spread, weight_change, particles(sample = 3) }
sweep { width = [2, 12], seed = 0..2, rate = [0.05, 0.2], act = [sigmoid, gelu] }
backends torch
torch { noise = torch }
""",
    "limit": """\
# the mean-field limit (jax, float64) next to finite widths trained in ATen's batched
# ensemble path (native = off); noisy SGD (torch: the counter-based noise; jax: jax.random),
# biases, a frozen read-out
experiment pin_limit
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 32 }
network mlp { hidden = 1, activation = tanh, bias = true }
scaling mean_field
init {
  layer 1 ~ normal(0, 1 / sqrt(dim))
  layer 2 ~ normal(0.5, 1)
}
train {
  optimizer = langevin(lr = 0.1, temperature = 0.001)
  loss      = mse
  batch     = 4
  steps     = 30
  freeze    = [last]
}
record every 10 { train_loss, test_loss, test_accuracy, neuron_spread, weight_change, particles(sample = 3) }
sweep { width = [8], seed = 0..1 }
backends torch, jax
torch { native = off }
jax { particles = 64, data_samples = 32, dtype = float64 }
""",
}

# --- pins: begin (written by `python tests/test_store_pins.py --update`)
PINNED_ON: dict[str, str] = {
    "machine": "x86_64",
    "cpu": "GenuineIntel avx2 avx512f fma",
    "numpy": "2.4.6",
    "torch": "2.13.0+cpu",
    "jax": "0.10.2",
    "jaxlib": "0.10.2",
}
PINS: dict[str, dict[str, str]] = {
    "batch1": {
        "@attrs": "30dd72427c5722dcba112ea7b57c3d9682c05fd53af03c0980072a58f4199be1",
        "component": "12c3205dddf393c0852206efb0e5ee4f40b826d90c220f9bd4eeadf28a0b7274",
        "layer": "33d71807e7417a736360fb8cce0c2764d268a55b285d2a82d1b36543c1bb34c7",
        "message": "02b84d44212e3b243502723b96ac583bb02358c92a13053c6d3a083d57f525de",
        "neuron_spread": "6c51a2a1e063a7726f5e52f15b851775ef53cc5e7ea96fd57902f64e389c4750",
        "output": "6f4dad75b2048aefc2fdef9131a3beb100423dbfcf9887119d367dcc3423e75f",
        "particle": "e2055ff55915f03d4f6d7e944e51e0ac243c03143f443909fbb834a5b8ac5a84",
        "particles": "0dec78dc4291568f401ae55f51468055710b75024bf97d211ce6137997d38b67",
        "probe": "031aeb2ca6e53cdcf14ff08d09efa2819ec4ee43f9cb78964876bf2ebaaee8a1",
        "seed": "d9ade9c1f09f1caa490cfb07a59c50950b7eb0364767558c7315ff853f99a1d8",
        "status": "b6aff513a5ffc4382386d8da8ba0c13951748511ebf16f193f0225302617bedb",
        "step": "f8c3889dabbb2432208b71452bdf79c320b09452f34a2b4e0248f3ec33ec5b63",
        "test_accuracy": "9c059172203bd94a07c80fe8a793db4e494762199174a268d077685d667473ff",
        "test_loss": "955f6f1c8cab146fd69fbe1201905ced652f736486881bab2a22a1103cb2fd5c",
        "time": "58796be37e9ed2558c028523637eef3ad78791bc4e32ca7e2814149a8236349a",
        "train_loss": "b372cac5d59d32afc428a3d5e2ea3149eb9bdd02924548aea12c3d774142f970",
        "weight_change": "dbf35d72df2414d91a96af8973b08933be33d6ddf7c2235b2425bf06ce18fc73",
        "width": "6a7f97eaa549b29b75b5c89ed3e6bca684d9266b565bce1c3ea7fe9f7189818c",
    },
    "langevin": {
        "@attrs": "88286b9468e7867bd22484dd76f9f7fdbd48c4d31ac67a05ef233a0128cb22f3",
        "act": "7a87cc79c7b3b8d8a2e5512a8b85d64ee84caa7e0a9a2002b5249d28a77f5c28",
        "component": "12c3205dddf393c0852206efb0e5ee4f40b826d90c220f9bd4eeadf28a0b7274",
        "layer": "3c4abe8e2fbbe799e9f744be7a54c3b28726dc200183ceaf7cfcfbe1c23587bc",
        "message": "c0405ea1354ffe907bc3d4e00d98403c1ec40171d8e07e336fc7620baa3e40f2",
        "neuron_spread": "55acf6eb5e2fa21ca98d930a369a9865db48ddd9911f7c6f17ae867c14562aab",
        "output": "d06ccaf5efbb3503539a0b27d792d3dac9d4233c1c10948fc8c96a417ee969c0",
        "particle": "8b12caf3bafb7025ab4aa46fecfa41f1f24970d3c7492fea0e893c5888228727",
        "particles": "299b7a04d4ed9659e3a66a73022653d6abcf0a310f0ae1aec0419081876107f1",
        "probe": "891aab88a42c20a508553c036026aa6dac5ba1c95447688aaa49c3a4eaaac7fe",
        "rate": "102e8b5695e3b2f1e0e47947317cd86d9de8ecebf2b41ec9e0a56bd1371f3aa0",
        "seed": "20612f917b0f4c3b311750a461db467ee17f8e4519a74f3cf215b7b060d62ae2",
        "status": "c332074b5c3fc2cf6b8dec947b9e0566dd73f8ba67c841f196df5937a697fd6d",
        "step": "7e8d89a3a1d93bd990993b099aca63a9dc97087a841ca29a19f9733c46c65b17",
        "test_loss": "969e7728b19691def38d3e5f0d7da124e64629f6f795cbdfd09e3a21ae0433eb",
        "time": "906afc2b3b2cb8ea82214b0f45274adc3169190004e5cf0061f5dee42b56f23d",
        "train_loss": "62091ce67ca5caa1f1a3a42e146f082dbd796466e3aeb73ea19c7c92c3940662",
        "weight_change": "c3c8bbc3e498c50d3730e0bc33936604765dd4573d53ddb374945d13d20369dc",
        "width": "fe724d727f841e9c9ed0cc621c9aee73941ebf90c928fd9a86d5fa55e610ffc1",
    },
    "limit": {
        "@attrs": "9bde079cb2c85e5a5881068b99d971257118e7c12e124558435e13fe809b1880",
        "component": "12c3205dddf393c0852206efb0e5ee4f40b826d90c220f9bd4eeadf28a0b7274",
        "layer": "3c4abe8e2fbbe799e9f744be7a54c3b28726dc200183ceaf7cfcfbe1c23587bc",
        "message": "f8d5b1d0984a7dddb828b41b55c4d1d49f9b1e6b7e1aab390ddbb2df3bac3f4d",
        "neuron_spread": "11e03bb1c07394b08e9dea0bbde12b243f8f2e06dd37602488eaebb3c0360691",
        "particle": "8b12caf3bafb7025ab4aa46fecfa41f1f24970d3c7492fea0e893c5888228727",
        "particles": "b954c871af6e07b2a118f67d30381a0e8a8ea38d14fd2849732b906b8ce303b0",
        "seed": "d9ade9c1f09f1caa490cfb07a59c50950b7eb0364767558c7315ff853f99a1d8",
        "status": "b6aff513a5ffc4382386d8da8ba0c13951748511ebf16f193f0225302617bedb",
        "step": "1f4ecd2a4e2ef4d0acb6b9ee038eea730426a32e40896a21b4c709b75617b32b",
        "test_accuracy": "5a9723861c306c3923391d2bf964ca78cad5950bd2c96330a2e4c328279aefea",
        "test_loss": "14e98b5c37c1bca136e521d84daad915a9cda8886b5a19ac8073e5860f2aeebd",
        "time": "e4547f1e00943895fb79df306ca9f0a0ed9e606748cad7080de59de502079bdc",
        "train_loss": "09ebe81a416a8fd92935cc2dc3ca95fbb406d981b0b47ac04e79a77a3bb91414",
        "weight_change": "0fe3ca5a70161aed31ae7278fe7d464100c59a0ca091dba350cbea15302f5c99",
        "width": "49e2d5fbd30eb2bb1f61b1ffe185021567263701c89b96db552b03ff195a839a",
    },
}
# --- pins: end


# ---- where the pins hold ---------------------------------------------------------------

#: the libraries whose kernels compute the stored numbers
NUMERIC_LIBRARIES = ("numpy", "torch", "jax", "jaxlib")


def platform_fingerprint() -> dict[str, str]:
    """What, besides mfdsl's code, decides the stored bits: the CPU's architecture, vendor
    and vector units, and the numeric libraries' versions.  Measured where the pins were
    taken: MKL's AVX-512 and AVX2 kernels (torch's products, the native gemm loop's BLAS)
    round differently, so do XLA's; the native loop is the same with AVX-512 and with
    AVX2 + FMA, not without FMA.  Another CPU with the same vendor and flags is taken to
    run the same kernels."""
    out = {"machine": platform.machine()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        out["cpu"] = platform.processor()
    else:
        first = cpuinfo.split("\n\n", 1)[0]  # the first processor's block
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}
        vendor = fields.get("vendor_id") or fields.get("CPU implementer", "")
        flags = set((fields.get("flags") or fields.get("Features", "")).split())
        out["cpu"] = " ".join([vendor, *sorted(flags & {"avx2", "avx512f", "fma"})])
    for name in NUMERIC_LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def pins_do_not_hold_here() -> str | None:
    """Why the pins cannot be compared on this machine (another CPU class or other
    library versions: the same code gives other bits there), or ``None``."""
    here = platform_fingerprint()
    if here == PINNED_ON:
        return None
    diff = ", ".join(
        f"{key} {PINNED_ON.get(key, '?')!r} there, {here.get(key, '?')!r} here"
        for key in sorted(here.keys() | PINNED_ON.keys())
        if here.get(key) != PINNED_ON.get(key)
    )
    return (
        f"the pins were taken on another platform ({diff}); where this platform is the "
        "reference, retake them with `python tests/test_store_pins.py --update`"
    )


# ---- digests ---------------------------------------------------------------------------


def _canonical(value: object) -> object:
    """JSON-ready: numpy scalars and arrays as Python values, NaN spelled out."""
    if isinstance(value, np.ndarray):
        return [_canonical(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _canonical(value.item())
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def variable_digest(dims: tuple[str, ...], values: np.ndarray) -> str:
    """sha256 of a variable's dims, dtype, shape and values.  Numbers are hashed as their
    raw little-endian bytes, every NaN as the one quiet NaN (a NaN's payload and sign
    are not a number the store means); strings (whatever string dtype zarr reads them
    as) as their JSON list."""
    header: dict[str, object] = {"dims": list(dims), "shape": list(values.shape)}
    if values.dtype.kind in "biuf":
        data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        if data.dtype.kind == "f":
            data = np.where(np.isnan(data), np.array(np.nan, data.dtype), data)
        header["dtype"] = data.dtype.str
        payload = data.tobytes()
    elif values.dtype.kind in "OTUS":
        header["dtype"] = "str"
        payload = json.dumps([str(v) for v in values.ravel().tolist()]).encode()
    else:  # pragma: no cover - the store holds numbers and strings only
        raise TypeError(f"cannot pin a variable of dtype {values.dtype}")
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(b"\0")
    h.update(payload)
    return h.hexdigest()


def store_digests(store: Path) -> dict[str, str]:
    """One digest per coordinate and data variable of ``store``, by name, and one for
    its deterministic attributes (``@attrs``)."""
    import xarray as xr

    ds = xr.open_zarr(store)
    try:
        ds.load()
        out = {
            name: variable_digest(tuple(map(str, ds[name].dims)), ds[name].values) for name in ds.variables
        }
        attrs = {
            "store": {k: v for k, v in ds.attrs.items() if k not in UNPINNED_ATTRS},
            "variables": {name: dict(ds[name].attrs) for name in ds.variables},
        }
    finally:
        ds.close()
    blob = json.dumps(_canonical(attrs), sort_keys=True).encode()
    out["@attrs"] = hashlib.sha256(blob).hexdigest()
    return dict(sorted(out.items()))


def run_specs(folder: Path, names: list[str]) -> dict[str, Path]:
    """``mfdsl run`` on each named spec, all at once (one subprocess each, one worker
    each); their stores by name.  A failed run fails with its output."""
    from conftest import process_group

    stores = {name: folder / f"{name}.zarr" for name in names}
    with contextlib.ExitStack() as stack:
        procs = {}
        for name in names:
            spec = folder / f"{name}.mf"
            spec.write_text(SPECS[name], encoding="utf-8")
            args = [
                sys.executable,
                "-m",
                "mfdsl",
                "run",
                str(spec),
                "-o",
                str(stores[name]),
                "--workers",
                "1",
            ]
            procs[name] = stack.enter_context(process_group(args, folder))
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"mfdsl run {name}.mf did not finish in {RUN_TIMEOUT_S} s")
            assert proc.returncode == 0, f"mfdsl run {name}.mf exited {proc.returncode}\n{out}\n{err}"
    return stores


def describe_mismatch(name: str, got: Mapping[str, str], pinned: Mapping[str, str]) -> str:
    changed = sorted(k for k in got.keys() & pinned.keys() if got[k] != pinned[k])
    new = sorted(got.keys() - pinned.keys())
    gone = sorted(pinned.keys() - got.keys())
    lines = [f"the store of spec '{name}' no longer matches its pins:"]
    if changed:
        lines.append(f"  changed: {', '.join(changed)}")
    if new:
        lines.append(f"  new (not pinned): {', '.join(new)}")
    if gone:
        lines.append(f"  missing (pinned): {', '.join(gone)}")
    lines.append(
        "A change that means to move stored numbers updates the pins with "
        "`python tests/test_store_pins.py --update` (see the module docstring)."
    )
    return "\n".join(lines)


# ---- tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinned_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    reason = pins_do_not_hold_here()
    if reason is not None:
        pytest.skip(reason)
    return run_specs(tmp_path_factory.mktemp("pins"), list(SPECS))


def test_every_spec_is_pinned() -> None:
    assert sorted(PINS) == sorted(SPECS)
    assert sorted(PINNED_ON) == sorted(["machine", "cpu", *NUMERIC_LIBRARIES])


@pytest.mark.parametrize("name", list(SPECS))
def test_store_matches_pins(name: str, pinned_stores: dict[str, Path]) -> None:
    got = store_digests(pinned_stores[name])
    assert got == PINS[name], describe_mismatch(name, got, PINS[name])


def test_other_platform_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another torch (or CPU, …) than the pins were taken with skips the comparison, and
    the reason names what differs, and only that."""
    here = platform_fingerprint()
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "PINNED_ON", dict(here))
    assert pins_do_not_hold_here() is None
    monkeypatch.setattr(module, "PINNED_ON", {**here, "torch": "0.0.1"})
    reason = pins_do_not_hold_here()
    assert reason is not None
    assert f"torch '0.0.1' there, {here['torch']!r} here" in reason
    assert "numpy '" not in reason and "cpu '" not in reason and "--update" in reason


def test_digest_names_the_change() -> None:
    """The digest sees dtype, shape, dims, each bit of a number and each string; it does
    not see a NaN's payload."""
    base = np.array([[0.5, np.nan], [1.0, -0.0]])
    ref = variable_digest(("a", "b"), base)
    other_nan = base.copy()
    other_nan.view(np.uint64)[0, 1] |= np.uint64(1)  # another NaN payload
    assert math.isnan(other_nan[0, 1])
    assert variable_digest(("a", "b"), other_nan) == ref
    flipped = base.copy()
    flipped.view(np.uint64)[0, 0] ^= np.uint64(1)  # the last bit of 0.5
    for dims, values in [
        (("a", "c"), base),
        (("a", "b"), flipped),
        (("a", "b"), base.astype(np.float32)),
        (("a", "b"), np.where(base == 0, 0.0, base)),  # -0.0 → 0.0
        (("b", "a"), base.T.copy()),
    ]:
        assert variable_digest(dims, values) != ref
    strings = np.array(["", "diverged"], dtype=object)
    assert variable_digest(("w",), strings) == variable_digest(("w",), strings.astype(str))
    assert variable_digest(("w",), strings) != variable_digest(("w",), np.array(["", "failed"]))
    pinned = {"a": "1", "b": "2", "c": "3"}
    message = describe_mismatch("x", {"a": "1", "b": "9", "d": "4"}, pinned)
    assert "changed: b" in message and "new (not pinned): d" in message and "missing (pinned): c" in message


# ---- updating the pins -----------------------------------------------------------------


def _update() -> None:
    path = Path(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        stores = run_specs(Path(tmp), list(SPECS))
        pins = {name: store_digests(store) for name, store in stores.items()}
    lines = ["PINNED_ON: dict[str, str] = {"]
    lines.extend(
        f"    {json.dumps(key)}: {json.dumps(value)}," for key, value in platform_fingerprint().items()
    )
    lines.append("}")
    lines.append("PINS: dict[str, dict[str, str]] = {")
    for name, digests in pins.items():
        lines.append(f"    {json.dumps(name)}: {{")
        lines.extend(f"        {json.dumps(var)}: {json.dumps(digest)}," for var, digest in digests.items())
        lines.append("    },")
    lines.append("}")
    text = path.read_text(encoding="utf-8")
    block = re.compile(r"^(# --- pins: begin[^\n]*\n).*?^(# --- pins: end)", re.DOTALL | re.MULTILINE)
    new, count = block.subn(lambda m: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text)
    if count != 1:
        raise SystemExit(f"{path}: the pins block's markers are missing")
    path.write_text(new, encoding="utf-8")
    changed = sum(pins[n].get(v) != PINS.get(n, {}).get(v) for n in pins for v in pins[n])
    print(f"{path}: pinned {sum(map(len, pins.values()))} digests of {len(pins)} stores ({changed} changed)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit(f"usage: python {sys.argv[0]} --update")
    _update()
