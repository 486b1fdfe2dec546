"""The four scalings, from the compiler's table to how the trained networks behave.

* mean_field: after a few SGD steps every weight entry has moved by O(lr), at any width;
* mup: Yang & Hu's coordinate check — mean |activation| of every layer after a few
  steps at a large learning rate is flat in the width, while standard scaling's grows;
* ntk: forward multipliers 1/√fan_in;
* the plan of every scaling matches the table in ``mfdsl/plan/compile.py``'s docstring.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import mfdsl
from mfdsl.data.make import make_dataset
from mfdsl.plan import compile as _compile
from mfdsl.plan.compile import compile_point
from mfdsl.plan.types import RunPlan

SCALINGS = ("mean_field", "ntk", "standard", "mup")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small matmuls run faster on one thread (and never wait on a busy core)."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def concrete(text: str) -> mfdsl.Spec:
    """The spec at its (only) sweep point; tests then pick widths and seeds."""
    return next(mfdsl.expand(mfdsl.parse(text))).spec


def plan_at(spec: mfdsl.Spec, width: int, seed: int = 0) -> RunPlan:
    return compile_point(spec, {"width": width, "seed": seed}, "torch")


def train_steps(plan: RunPlan) -> tuple[Any, list[Any], Any]:
    """The engine's network after ``plan.steps`` SGD steps: ``(network, initial weights,
    dataset)``."""
    from mfdsl_torch._single import Network, Trainer

    data = make_dataset(plan.data, plan.seed)
    net = Network(plan)
    w0 = [w.clone() for w in net.W]
    trainer = Trainer(net, plan, data.task, data.outputs)
    xs, ys = trainer.prepare_chunk(*data.train_chunk(0, plan.steps, plan.batch))
    trainer.run(xs, ys, 0)
    return net, w0, data


def mean_abs_activations(net: Any, x: np.ndarray) -> np.ndarray:
    """Mean |H_ℓ| over the inputs and neurons of every layer ℓ = 1 … L, and mean |z|
    of the output."""
    import torch

    with torch.no_grad():
        hs, _ = net.forward(torch.as_tensor(x, dtype=net.dtype))
    return np.array([float(h.abs().mean()) for h in hs])


def spread(values: np.ndarray) -> np.ndarray:
    """max / min across widths (axis 0), per layer."""
    return values.max(axis=0) / values.min(axis=0)


# ---- mean field: every weight moves by O(lr) -----------------------------------------------

# Sigmoid and non-centred middle and last layers keep every layer's mean-field gradient
# O(1) (docs/mean-field.md §3: a centred layer makes the signal to the layers below vanish
# like n^{-1/2}, which would be a true but different width dependence).
MEAN_FIELD = """\
experiment mean_field_steps
data isotropic_gaussian { dim = 8, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 3, activation = sigmoid }
scaling mean_field
init {
  layer 1    ~ normal(0, 1 / sqrt(dim))
  layer 2..3 ~ normal(1, 1)
  layer last ~ normal(1, 1)
}
train { optimizer = sgd(lr = 0.05), loss = mse, batch = 16, steps = 3 }
sweep { width = [64] }
"""
WIDTHS = (64, 256, 1024)


def weight_moves(plan: RunPlan) -> np.ndarray:
    """max |ΔW_ℓ| / lr for every weight layer ℓ."""
    net, w0, _ = train_steps(plan)
    return (
        np.array([float((w - w_0).abs().max()) for w, w_0 in zip(net.W, w0, strict=True)]) / plan.optimizer.lr
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_field_updates_are_order_lr_at_every_width(seed: int) -> None:
    pytest.importorskip("torch")
    spec = concrete(MEAN_FIELD)
    moves = np.array([weight_moves(plan_at(spec, n, seed)) for n in WIDTHS])
    assert np.all(moves > 0)
    # Each entry's move is O(lr) with a width-free law; the max over the n² entries of a
    # middle layer (n·d of the first) grows only like the max of as many sub-Gaussian
    # factors, √(2 ln n) per factor: (ln 1024 / ln 64) = 1.7 at most from 64 to 1024.
    # Finite-width fluctuations at n = 64 add some 10 %; 3 leaves a wide margin while a
    # missing width factor (≥ 16 across this range) cannot pass.
    assert np.all(spread(moves) < 3), moves


def test_mean_field_bound_catches_missing_lr_multipliers() -> None:
    """The same measure with the learning-rate multipliers r_ℓ removed falls with the
    width (like 1/n, 1/n²): the bound above is not vacuous."""
    pytest.importorskip("torch")
    spec = concrete(MEAN_FIELD)
    moves = []
    for n in WIDTHS:
        plan = plan_at(spec, n)
        plan = dataclasses.replace(
            plan, layers=tuple(dataclasses.replace(p, lr_mult=1.0) for p in plan.layers)
        )
        moves.append(weight_moves(plan))
    assert np.all(spread(np.array(moves)) > 3)


# ---- mup: the coordinate check ----------------------------------------------------------

# Two hidden layers (one hidden-to-hidden matrix), two SGD steps at lr = 1.  Under standard
# scaling an SGD step moves a hidden pre-activation by ~lr·√n and the output by ~lr·n, so
# from width 64 to 1024 they grow by far more than 2; μP keeps every layer Θ(1).  (Over
# seeds 0–19 μP's max/min stayed below 1.6 and standard's output grew 250–2700×.)
COORD_CHECK = """\
experiment coord_check
data isotropic_gaussian {{ dim = 8, delta = 0.5, train = online, test = 64 }}
network mlp {{ hidden = 2, activation = tanh }}
scaling {scaling}
train {{ optimizer = sgd(lr = 1.0), loss = mse, batch = 32, steps = 2 }}
sweep {{ width = [64] }}
"""


def coordinate_check(scaling: str, seed: int) -> np.ndarray:
    """Mean |activation| per layer (columns H_1, H_2, z) at each width (rows)."""
    spec = concrete(COORD_CHECK.format(scaling=scaling))
    rows = []
    for n in WIDTHS:
        net, _, data = train_steps(plan_at(spec, n, seed))
        rows.append(mean_abs_activations(net, data.test_x))
    return np.array(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mup_coordinate_check_is_flat_and_standard_grows(seed: int) -> None:
    pytest.importorskip("torch")
    mup = coordinate_check("mup", seed)
    assert np.all(np.isfinite(mup)) and np.all(mup > 0)
    assert np.all(spread(mup) < 2), mup

    standard = coordinate_check("standard", seed)
    assert np.all(np.isfinite(standard))
    for layer in (1, 2):  # H_2 and the output z
        grows = standard[:, layer]
        assert grows[-1] / grows[0] > 2, standard
        assert np.all(np.diff(grows) > 0), standard


# ---- ntk: 1/√fan_in --------------------------------------------------------------------------

NTK = """\
experiment ntk
data isotropic_gaussian { dim = 9, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 3, activation = tanh }
scaling ntk
train { optimizer = sgd(lr = 0.1), loss = mse, batch = 8, steps = 1 }
sweep { width = [64] }
"""


@pytest.mark.parametrize("width", [16, 100, 1024])
def test_ntk_forward_multipliers_are_one_over_sqrt_fan_in(width: int) -> None:
    plan = plan_at(concrete(NTK), width)
    assert [p.fan_in for p in plan.layers] == [9, width, width, width]
    for p in plan.layers:
        assert p.forward_mult == pytest.approx(1 / math.sqrt(p.fan_in), rel=1e-15)
        assert p.lr_mult == 1.0
        # no init block: N(0, 1), unscaled
        assert (p.init.kind, p.init.mean, p.init.std) == ("normal", 0.0, 1.0)


def test_ntk_preactivations_are_order_one_at_init() -> None:
    """What the multipliers are for: with N(0, 1) weights, every layer's pre-activations
    keep their size as the width grows."""
    pytest.importorskip("torch")
    from mfdsl_torch._single import Network

    spec = concrete(NTK)
    x = make_dataset(spec.data, 0).test_x
    # Averaged over 16 initialisations.  A hidden layer's mean |H| averages n neurons and is
    # steady (max/min over widths 1.00–1.03 for any 4 seeds), but the output is one random
    # function per seed, z(x) = n^-1/2 Σ_i v_i tanh(H_3(x)_i), nearly the same Gaussian
    # draw at every input (the deep tanh kernel is strongly correlated across inputs), so
    # mean |z| is ≈ |g| · const with g ~ N(0, 1): relative s.d. 0.76 per seed.  Measured
    # over 64 seeds in disjoint blocks: max/min over the widths 1.11–1.68 for blocks of 4
    # (3 of 16 blocks above 1.5), 1.09–1.22 for blocks of 16 (0.76/√16 = 0.19 relative).
    rows = np.array(
        [[mean_abs_activations(Network(plan_at(spec, n, seed)), x) for seed in range(16)] for n in WIDTHS]
    )
    rows = rows.mean(axis=1)
    # a missing 1/√n would grow a layer ×4 from 64 to 1024, and compound with depth
    assert np.all(spread(rows) < 1.5), rows


# ---- the compiler's table -------------------------------------------------------------------


def docstring_table() -> dict[str, dict[str, str]]:
    """The scaling table of ``mfdsl/plan/compile.py``'s docstring (an RST simple table), as
    ``{scaling: {"m": ..., "init": ..., "r": ...}}`` with continuation lines joined."""
    doc = _compile.__doc__ or ""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+( +=+)+ *", line)]
    assert len(rules) == 3, "the docstring's scaling table has moved or changed shape"
    columns = [m.span() for m in re.finditer(r"=+", lines[rules[0]])]
    columns[-1] = (columns[-1][0], 10**6)  # the last column runs to the end of the line
    table: dict[str, dict[str, str]] = {}
    last = ""
    for line in lines[rules[1] + 1 : rules[2]]:
        cells = [line[a:b].strip() for a, b in columns]
        if cells[0]:
            last = cells[0]
            table[last] = {"m": cells[1], "init": cells[2], "r": cells[3]}
        else:  # a continuation line
            for key, cell in zip(("m", "init", "r"), cells[1:], strict=True):
                if cell:
                    table[last][key] = f"{table[last][key]} {cell}"
    return table


def evaluate(expr: str, **names: float) -> float:
    """A table entry such as ``1/√n``, ``n²`` or ``1/√d`` at the given values."""
    python = re.sub(r"√(\w+)", r"sqrt(\1)", expr.strip()).replace("²", "**2")
    assert re.fullmatch(r"[\w\s/*().+-]+", python), expr
    return float(eval(python, {"__builtins__": {}, "sqrt": math.sqrt}, names))


def init_scales(text: str, fan_in: list[int]) -> list[float]:
    """The ``init of W_ℓ`` column as a factor on the spec's law per layer: "as the spec
    says" is 1, "spec's law / √fan_in" divides by √fan_in, and a further "output layer /
    fan_in" sets the last layer's factor."""
    parts = [p.strip() for p in text.split(",")]
    scales = [1.0] * len(fan_in)
    if "/" in parts[0]:
        divisor = parts[0].split("/", 1)[1]
        scales = [1 / evaluate(divisor, fan_in=f) for f in fan_in]
    for part in parts[1:]:
        if part.startswith("output layer"):
            scales[-1] = 1 / evaluate(part.split("/", 1)[1], fan_in=fan_in[-1])
    return scales


SCALED_INIT = """\
experiment table
data isotropic_gaussian {{ dim = {dim}, delta = 0.5, train = online, test = 64 }}
network mlp {{ hidden = {hidden}, activation = tanh, bias = true }}
scaling {scaling}
init {{
  layer 1     ~ normal(0.5, 2)
  layer 2..{hidden} ~ normal(0.25, 3)
  layer last  ~ uniform(-1, 3)
}}
train {{ optimizer = sgd(lr = 0.1), loss = mse, batch = 8, steps = 1 }}
sweep {{ width = [64] }}
"""


def test_docstring_table_lists_every_scaling() -> None:
    assert sorted(docstring_table()) == sorted(SCALINGS)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize(("dim", "hidden", "width"), [(5, 2, 8), (12, 3, 100)])
def test_plan_matches_the_docstring_table(scaling: str, dim: int, hidden: int, width: int) -> None:
    row = docstring_table()[scaling]
    plan = plan_at(concrete(SCALED_INIT.format(dim=dim, hidden=hidden, scaling=scaling)), width)
    layers = plan.layers
    assert len(layers) == hidden + 1
    n, d = float(width), float(dim)

    m_first, m_rest = (evaluate(e, n=n, d=d) for e in row["m"].split(","))
    assert layers[0].forward_mult == pytest.approx(m_first, rel=1e-14)
    for p in layers[1:]:
        assert p.forward_mult == pytest.approx(m_rest, rel=1e-14), p.index

    r_first, r_middle, r_last = (evaluate(e, n=n, d=d) for e in row["r"].split(","))
    expected_r = [r_first] + [r_middle] * (hidden - 1) + [r_last]
    assert [p.lr_mult for p in layers] == pytest.approx(expected_r, rel=1e-14)

    laws = [("normal", 0.5, 2.0)] + [("normal", 0.25, 3.0)] * (hidden - 1) + [("uniform", -1.0, 3.0)]
    scales = init_scales(row["init"], [p.fan_in for p in layers])
    for p, (kind, a, b), scale in zip(layers, laws, scales, strict=True):
        assert p.init.kind == kind, p.index
        assert (p.init.a, p.init.b) == pytest.approx((a * scale, b * scale), rel=1e-14), p.index

    # "A bias ... takes the learning-rate multiplier of the width it lives on (mean_field,
    # mup) or 1": n on hidden layers, 1 on the output.
    for p in layers:
        assert p.bias
        lives_on = 1.0 if p.index == hidden + 1 else n
        assert p.bias_lr_mult == (lives_on if scaling in ("mean_field", "mup") else 1.0), p.index
