"""``mfdsl check``'s science checks (mfdsl.plan.diagnose): a limit that cannot move, a
homogeneous network on norm-separated classes, degenerate middle layers."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from mfdsl.core.activations import derivative, numpy_activation
from mfdsl.language.expand import expand
from mfdsl.language.load import parse
from mfdsl.plan.compile import limit_layer_plans
from mfdsl.plan.diagnose import STILL, allowed, diagnose, velocity_z

ROOT = Path(__file__).resolve().parents[1]

# The quickstart as it landed before issue 13: bias-free ReLU on isotropic Gaussians.
LANDED_QUICKSTART = """\
experiment quickstart
data isotropic_gaussian { dim = 20, delta = 0.5, train = online, test = 2000 }
network mlp { hidden = 1, activation = relu }
scaling mean_field
init {
  layer 1 ~ normal(0, 1 / sqrt(dim))
  layer 2 ~ normal(0, 1)
}
train { optimizer = sgd(lr = 0.05), loss = mse, batch = 8, steps = 2000 }
record every 50 { train_loss, test_loss, test_accuracy }
sweep { width = [64, 256, 1024], seed = 0..2 }
backends torch, jax
"""

# frozen_ends.mf as it landed: centred middle weights, tanh, centred frozen read-out.
LANDED_FROZEN_ENDS = """\
experiment frozen_ends
data teacher {
  dim     = 10
  teacher = mlp(hidden = 1, width = 4, activation = tanh)
  noise   = 0.05
  train   = 4096
  test    = 1024
}
network mlp { hidden = 3, activation = tanh }
scaling mean_field
init {
  layer 1    ~ normal(0, 1 / sqrt(dim))
  layer 2..3 ~ normal(0, 1)
  layer 4    ~ normal(0, 1)
}
train { optimizer = sgd(lr = 0.01), loss = mse, batch = 32, epochs = 20, freeze = [1, 4] }
record every 100 { train_loss, test_loss }
sweep { width = [128, 512], seed = 0..1 }
backends torch
"""

# Two layers, sigmoid, a symmetric first layer and a centred read-out on symmetric data:
# E_w σ(<w, x>) = 1/2 for every x, so the limit's output and its velocity vanish.
CENTRED_SIGMOID = """\
experiment centred_sigmoid
data isotropic_gaussian { dim = 20, delta = 0.5, train = online, test = 500 }
network mlp { hidden = 1, activation = sigmoid }
scaling mean_field
init {
  layer 1 ~ normal(0, 1 / sqrt(dim))
  layer 2 ~ normal(0, 1)
}
train { optimizer = sgd(lr = 0.05), loss = mse, batch = 8, steps = 100 }
record every 50 { train_loss, test_accuracy }
sweep { width = [64], seed = 0..1 }
backends torch
"""


def warnings_of(text: str) -> list[str]:
    spec = parse(text, "spec.mf")
    return [w.render() for w in diagnose(spec, expand(spec))]


def test_landed_quickstart_warns_homogeneous() -> None:
    (warning,) = warnings_of(LANDED_QUICKSTART)
    assert warning.startswith("spec.mf:3:40:")  # activation = relu
    assert "positively homogeneous" in warning and "chance" in warning
    assert "bias = true" in warning


def test_landed_frozen_ends_warns_saddle_at_the_middle_rule() -> None:
    (warning,) = warnings_of(LANDED_FROZEN_ENDS)
    assert warning.startswith("spec.mf:13:3:")  # layer 2..3 ~ normal(0, 1)
    assert "cannot move" in warning and "whole training set" in warning
    assert "non-centred middle weights" in warning


def test_centred_sigmoid_warns_saddle() -> None:
    (warning,) = warnings_of(CENTRED_SIGMOID)
    assert "cannot move" in warning and "sampling noise" in warning
    assert warning.startswith("spec.mf:7:3:")  # the centred read-out


@pytest.mark.parametrize(
    "change",
    [
        ("layer 2 ~ normal(0, 1)", "layer 2 ~ normal(1, 1)"),  # a non-centred read-out
        ("activation = sigmoid", "activation = sigmoid, bias = true"),  # biases
        ("activation = sigmoid", "activation = relu, bias = true"),
    ],
)
def test_a_limit_that_moves_is_not_flagged(change: tuple[str, str]) -> None:
    assert warnings_of(CENTRED_SIGMOID.replace(*change)) == []


def test_frozen_ends_with_a_non_centred_read_out_moves() -> None:
    text = LANDED_FROZEN_ENDS.replace("layer 4    ~ normal(0, 1)", "layer 4    ~ normal(1, 1)")
    text = text.replace("layer 2..3 ~ normal(0, 1)", "layer 2..3 ~ normal(1, 1)")
    assert warnings_of(text) == []


def test_the_statistic_is_noise_at_a_saddle_and_large_when_moving() -> None:
    """Across seeds, z stays O(1) at the sigmoid saddle and far above the threshold
    once the read-out is non-centred (the test's power and size)."""

    def z(text: str, seed: int) -> float:
        spec = next(iter(expand(parse(text)))).spec
        from mfdsl.plan.diagnose import _samples

        x, y, task, whole = _samples(spec.data, seed)
        act = spec.network.activation
        return velocity_z(
            limit_layer_plans(spec),
            numpy_activation(act),
            derivative(act),
            spec.network.output,
            spec.train.loss,
            x,
            y,
            task,
            exact=whole,
            seed=seed,
        )

    still = [z(CENTRED_SIGMOID, s) for s in range(6)]
    moving = [
        z(CENTRED_SIGMOID.replace("layer 2 ~ normal(0, 1)", "layer 2 ~ normal(1, 1)"), s) for s in range(3)
    ]
    assert max(still) < STILL, still
    assert abs(float(np.mean(still))) < 2.0
    assert min(moving) > 2 * STILL, moving


def test_degenerate_middle_layers_warn_where_recorded() -> None:
    text = LANDED_FROZEN_ENDS.replace("layer 2..3 ~ normal(0, 1)", "layer 2..3 ~ normal(1, 1)")
    text = text.replace("layer 4    ~ normal(0, 1)", "layer 4    ~ normal(1, 1)")
    text = text.replace("{ train_loss, test_loss }", "{ train_loss, neuron_spread(layer = 2..3) }")
    (warning,) = warnings_of(text)
    assert "layer 2 become identical" in warning and "n^-1/2" in warning
    assert warning.startswith("spec.mf:17:")
    # the last hidden layer does not degenerate: recording only it is silent
    assert warnings_of(text.replace("layer = 2..3", "layer = 3")) == []


def test_allow_comment_silences_a_check_and_names_unknown_ones() -> None:
    silenced = "# mfdsl: allow homogeneous\n" + LANDED_QUICKSTART
    assert warnings_of(silenced) == []
    (warning,) = warnings_of(
        "# mfdsl: allow homogenous\n" + LANDED_QUICKSTART.replace("relu", "tanh, bias = true")
    )
    assert "'homogenous' is not a check" in warning and "did you mean 'homogeneous'" in warning
    assert allowed("# mfdsl: allow saddle, degenerate\nx = 1 # mfdsl: allow homogeneous")[0] == {
        "saddle",
        "degenerate",
        "homogeneous",
    }


def test_no_limit_no_velocity_check() -> None:
    """ntk and standard have no mean-field limit: only the network checks apply."""
    text = CENTRED_SIGMOID.replace("scaling mean_field", "scaling standard")
    assert warnings_of(text) == []


def test_the_spec_library_is_silent_and_fast() -> None:
    """Every spec of specs/ passes the checks (each states what it demonstrates), and
    checking all of them stays well under the 2 s the issue allows."""
    start = time.perf_counter()
    for path in sorted((ROOT / "specs").glob("*.mf")):
        spec = parse(path.read_text(), str(path))
        found = [w.render() for w in diagnose(spec, expand(spec))]
        assert found == [], "\n".join(found)
    assert time.perf_counter() - start < 2.0 * 4  # generous: CI machines are shared
    assert math.isfinite(STILL)


def test_strict_makes_science_warnings_errors(tmp_path: Path) -> None:
    from conftest import run_cli

    path = tmp_path / "quick.mf"
    path.write_text(LANDED_QUICKSTART, encoding="utf-8")
    lenient = run_cli("check", path)
    assert lenient.code == 0 and "warning: a relu network without biases" in lenient.err
    strict = run_cli("check", path, "--strict")
    assert strict.code == 2
    assert "error: a relu network without biases" in strict.err
    assert "1 warning, an error under --strict" in strict.err
    assert "Traceback" not in strict.err


def test_inputs_too_wide_to_sample_skip_the_velocity_test() -> None:
    """A huge ``dim`` must not make check allocate samples × dim (the memory estimate,
    not this check, judges such a spec)."""
    text = CENTRED_SIGMOID.replace("dim = 20", "dim = 100000000")
    spec = parse(text, "spec.mf")
    point = next(iter(expand(spec)))
    from mfdsl.plan.diagnose import _still

    assert _still(point.spec, 0) is None
