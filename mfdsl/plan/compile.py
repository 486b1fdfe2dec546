"""The compiler: one expanded sweep point → a backend-neutral :class:`RunPlan`.

Each scaling is a choice of three things per weight layer ℓ (see
``docs/mean-field.md``): a forward multiplier ``m_ℓ`` on the layer's sum, a scale on the
spec's initial law, and a learning-rate multiplier ``r_ℓ``.  With ``n`` the hidden width,
``d`` the input dimension and ``L`` hidden layers:

=========== ================ ======================== ===================================
scaling     m_1, m_ℓ (ℓ ≥ 2) init of W_ℓ              r_1, r_ℓ (2 ≤ ℓ ≤ L), r_{L+1}
=========== ================ ======================== ===================================
mean_field  1, 1/n           as the spec says (O(1))  n, n², n
ntk         1/√d, 1/√n       as the spec says         1, 1, 1
standard    1, 1             spec's law / √fan_in     1, 1, 1
mup         1, 1             spec's law / √fan_in,    n, 1, 1/n
                             output layer / fan_in
=========== ================ ======================== ===================================

``mup`` is μP for SGD (Yang & Hu 2021, Tensor Programs IV/V: input and bias learning rates
× fan_out, output × 1/fan_in, output init variance 1/fan_in²).  Under ``standard`` and
``mup`` the spec's distributions are the laws of the fan-in-normalised weights; under
``ntk`` the forward multiplier 1/√fan_in applies to the raw law, and under
``mean_field`` the law is the weights' own.  One ``init`` block therefore means
different initial scales under different scalings (docs/language.md, "scaling", has the
per-layer table); a spec comparing scalings takes each one's default.  A bias starts at 0 and takes the learning-rate
multiplier of the width it lives on (mean_field, mup) or 1.

Under ``adam`` the learning-rate multipliers are Adam's own (Adam's step per entry is
about ``lr`` whatever the gradient's scale, so SGD's rates, which undo the gradient's
1/n factors, do not carry over), and under ``mean_field`` Adam's ε scales with the
gradient (``eps_mult``); a bias takes ``bias_lr_mult`` and ``bias_eps_mult`` (r and ε of
the input, hidden and output layers):

* ``mean_field``: r = 1, 1, 1 (biases 1); ε × 1/n, 1/n², 1/n (biases 1/n on a hidden
  layer, 1 on the output);
* ``ntk``, ``standard``: r = 1 and ε × 1 everywhere (one global rate, as torch's Adam);
* ``mup``: r = 1, 1/n, 1/n (biases 1); ε × 1.

``mup`` is μP's Adam table (Yang et al. 2022, Tensor Programs V, Table 3; mup's
``MuAdam``) with base width 1, as SGD's rates above.  ``mean_field``: each particle
moves O(lr) a step, the ε of a layer is ε divided by SGD's rate there (the factor by
which its gradients shrink), so the run is Adam on the width-free particle gradients.

Langevin noise acts on the parameters indexed by neurons only: every weight and the
hidden layers' biases.  The output bias ``b_{L+1}`` is one coordinate shared by all
neurons at every width; noise on it would never average out, so it gets none, under
every scaling (``bias_noise_mult = 0``; weight decay still acts on it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mfdsl.core.errors import SpecError
from mfdsl.core.plugins import available_backends
from mfdsl.language import expr as ex
from mfdsl.language import ir as ir
from mfdsl.language.latent import bind
from mfdsl.plan.conv import ConvLayerPlan, ConvPlan
from mfdsl.plan.types import (
    DEFAULT_PROBES,
    DistPlan,
    LayerPlan,
    ObservablePlan,
    OptimizerPlan,
    RunPlan,
    SchedulePlan,
)

DEFAULT_SAMPLE = 100


def steps_for_epochs(epochs: int, n_train: int, batch: int) -> int:
    """The fewest steps that show every training example ``epochs`` times (batches run
    on through the concatenated epoch permutations, as ``mfdsl.data.make`` draws them)."""
    return max(1, math.ceil(epochs * n_train / batch))


def train_size(data: ir.Data) -> int | None:
    """The training-set size, or ``None`` for online data.  Image data with ``train =
    all`` holds every training image of its classes: the label files are read to count
    them (:func:`mfdsl.data.make.image_sizes`, which raises ``DataError`` without them)."""
    if data.train == "online":
        return None
    if data.train == "all":
        from mfdsl.data.make import image_sizes

        return image_sizes(data)[0]
    return int(data.train)


def total_steps(spec: ir.Spec) -> int:
    """The number of SGD steps of a concrete spec."""
    train = spec.train
    if train.steps is not None:
        return int(train.steps)
    n_train = train_size(spec.data)
    assert n_train is not None and train.epochs is not None
    return steps_for_epochs(int(train.epochs), n_train, int(train.batch))


def record_steps(record: ir.Record | None, steps: int) -> np.ndarray:
    """The recorded steps: 0, then every ``count`` steps (``every``) or ``count``
    log-spaced steps (``log``), always including the last step."""
    if record is None:
        record = ir.Record(mode="log", count=50, observables=(ir.Observable(name="train_loss"),))
    if record.mode == "every":
        chosen = np.arange(0, steps + 1, int(record.count), dtype=np.int64)
    else:
        chosen = np.round(np.geomspace(1, steps, int(record.count))).astype(np.int64)
    return np.unique(np.concatenate([[0], chosen, [steps]])).astype(np.int64)


def outputs(spec: ir.Spec) -> int:
    """The number of network outputs K: ``auto`` is one per class for multiclass data
    (``cross_entropy``'s logits, ``mse``'s one-hot targets), else 1."""
    if spec.network.outputs != "auto":
        return int(spec.network.outputs)
    if ir.task(spec.data) == "multiclass" and isinstance(spec.data, ir.ImageData):
        return len(spec.data.classes)
    if ir.task(spec.data) == "multiclass" and isinstance(spec.data, ir.Textures):
        return int(spec.data.classes)
    return 1


def default_observables(spec: ir.Spec) -> tuple[ir.Observable, ...]:
    """What is recorded when the spec has no ``record`` statement."""
    names = ["train_loss", "test_loss"]
    if ir.task(spec.data) != "regression":
        names.append("test_accuracy")
    return tuple(ir.Observable(name=n) for n in names)


def _dist(node: ir.Dist, scale: float = 1.0) -> DistPlan:
    if isinstance(node, ir.Embedded):
        # the scaling's factor multiplies the whole weight, mean function and noise alike
        mean = node.mean if ir.is_expr(node.mean) else ex.Num(value=float(node.mean))
        return DistPlan(kind="embedded", a=scale, b=node.std * scale, fn=bind(mean, {}))
    if isinstance(node, ir.Normal):
        return DistPlan(kind="normal", a=node.mean * scale, b=node.std * scale)
    if isinstance(node, ir.Uniform):
        return DistPlan(kind="uniform", a=node.low * scale, b=node.high * scale)
    return DistPlan(kind="constant", a=node.value * scale)


def _init_laws(spec: ir.Spec, depth: int, dim: int) -> dict[int, ir.Dist]:
    if spec.init is not None:
        laws: dict[int, ir.Dist] = {}
        for rule in spec.init.rules:
            for layer in rule.layers:
                laws[depth + 1 if layer == "last" else int(layer)] = rule.dist
        return laws
    first = 1.0 / math.sqrt(dim) if spec.scaling == "mean_field" else 1.0
    laws = {layer: ir.Normal(mean=0.0, std=1.0) for layer in range(1, depth + 2)}
    laws[1] = ir.Normal(mean=0.0, std=first)
    return laws


def adam_rates(scaling: str, n: int, is_first: bool, is_last: bool) -> tuple[float, float, float, float]:
    """A layer's Adam rates ``(lr_mult, bias_lr_mult, eps_mult, bias_eps_mult)`` under
    ``scaling`` at width ``n`` (the table in this module's docstring)."""
    if scaling == "mean_field":
        # SGD's rates (n, n², n; biases n, 1) are the gradients' 1/… factors: Adam's
        # step does not see them, its ε must
        sgd = float(n if (is_first or is_last) else n * n)
        return 1.0, 1.0, 1.0 / sgd, 1.0 if is_last else 1.0 / n
    if scaling == "mup":
        return (1.0 if is_first else 1.0 / n), 1.0, 1.0, 1.0
    return 1.0, 1.0, 1.0, 1.0


def conv_plan(spec: ir.Spec) -> ConvPlan | None:
    """The convolutional geometry of a ``network cnn`` (``None`` for an mlp)."""
    net = spec.network
    if not isinstance(net, ir.ConvNetwork):
        return None
    shape = ir.image_shape(spec.data)
    assert shape is not None  # the spec's validation requires image data
    channels, height, width = (int(v) for v in shape)
    layers = tuple(
        ConvLayerPlan(kernel=int(c.kernel), stride=int(c.stride), padding=int(c.padding), pool=int(c.pool))
        for c in net.layers
    )
    return ConvPlan(channels=channels, height=height, width=width, layers=layers, head=str(net.head))


def cnn_fans(conv: ConvPlan, depth: int, n: int | None, k: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of every weight layer of a cnn with ``n`` channels and
    neurons (``None``: a limit plan, whose hidden fans are 1 per particle): conv layer
    ℓ's is ``(C_{ℓ-1} k², n)``, the first layer after a ``flatten`` head's ``(n S, n)``
    (per particle ``(S, 1)``)."""
    fans: list[tuple[int, int]] = []
    channels = conv.channels
    for layer in conv.layers:
        fans.append((channels * layer.kernel**2 if n is not None or not fans else layer.kernel**2, n or 1))
        channels = n or 1
    head = conv.head_features(n or 1)
    for ell in range(len(conv.layers) + 1, depth + 2):
        fan_in = head if ell == len(conv.layers) + 1 else (n or 1)
        fans.append((fan_in, k if ell == depth + 1 else (n or 1)))
    return fans


def _fans(spec: ir.Spec, depth: int, n: int | None, k: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of every weight layer at width ``n`` (``None``: the limit's
    per-particle fans, every hidden fan 1): an mlp's, or a cnn's (:func:`cnn_fans`)."""
    conv = conv_plan(spec)
    if conv is not None:
        return cnn_fans(conv, depth, n, k)
    dim, hidden = int(ir.data_dim(spec.data)), n or 1
    return [(dim if ell == 1 else hidden, k if ell == depth + 1 else hidden) for ell in range(1, depth + 2)]


def layer_plans(spec: ir.Spec, width: int) -> tuple[LayerPlan, ...]:
    """Shapes, multipliers and initial laws of every weight layer.

    A cnn takes the mlp's table with channels as the width: conv layer ℓ ≥ 2 averages
    over input channels (``m = 1/n`` under mean_field, summing over the k² offsets),
    and so does the first layer after the head (with ``flatten`` it sums over the S
    positions); ``ntk``, ``standard`` and ``mup`` use the conv fan-in ``C k²`` (``n S``
    after a flatten head) where the mlp uses its fan-in (:func:`cnn_fans`)."""
    depth = int(spec.network.hidden)
    k = outputs(spec)
    n = width
    scaling = spec.scaling
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    fans = _fans(spec, depth, n, k)
    laws = _init_laws(spec, depth, fans[0][0])
    adam = isinstance(spec.train.optimizer, ir.Adam)
    plans = []
    for layer in range(1, depth + 2):
        fan_in, fan_out = fans[layer - 1]
        is_first, is_last = layer == 1, layer == depth + 1
        init_scale = 1.0
        if scaling == "mean_field":
            mult = 1.0 if is_first else 1.0 / n
            lr_mult = float(n if (is_first or is_last) else n * n)
            bias_lr = float(1 if is_last else n)
        elif scaling == "ntk":
            mult, lr_mult, bias_lr = 1.0 / math.sqrt(fan_in), 1.0, 1.0
        elif scaling == "standard":
            mult, lr_mult, bias_lr = 1.0, 1.0, 1.0
            init_scale = 1.0 / math.sqrt(fan_in)
        else:  # mup
            mult = 1.0
            init_scale = 1.0 / fan_in if is_last else 1.0 / math.sqrt(fan_in)
            lr_mult = float(n) if is_first else (1.0 / n if is_last else 1.0)
            bias_lr = float(1 if is_last else n)
        eps_mult = bias_eps = 1.0
        if adam:
            lr_mult, bias_lr, eps_mult, bias_eps = adam_rates(scaling, n, is_first, is_last)
        plans.append(
            LayerPlan(
                index=layer,
                fan_in=fan_in,
                fan_out=fan_out,
                forward_mult=mult,
                lr_mult=lr_mult,
                init=_dist(laws[layer], init_scale),
                bias=bool(spec.network.bias),
                bias_lr_mult=bias_lr,
                # mean-field decay and noise act on each weight at rate lr (see LayerPlan);
                # Adam's decoupled decay acts at the layer's Adam rate
                decay_mult=1.0 if scaling == "mean_field" and not adam else None,
                bias_decay_mult=1.0 if scaling == "mean_field" and not adam else None,
                # the output bias is shared by all neurons: no Langevin noise (see LayerPlan)
                bias_noise_mult=0.0 if is_last else None,
                eps_mult=eps_mult,
                bias_eps_mult=bias_eps,
                frozen=layer in frozen,
            )
        )
    return tuple(plans)


def limit_layer_plans(spec: ir.Spec) -> tuple[LayerPlan, ...]:
    """The layer plans of the infinite-width limit (``width = inf``).

    A limit has no width to resolve the multipliers with: every hidden fan is ``1``,
    every ``forward_mult``, ``lr_mult`` and ``bias_lr_mult`` is ``1`` and decay and noise
    act per weight at rate lr (``decay_mult = 1``).  A limit backend scales these by its
    own particle counts.  ``init`` is the law of the mean-field weight function
    ``w_ℓ(0, ·)``: the spec's law under ``mean_field``; under ``mup`` (whose only
    mean-field limit is at two layers) ``W_1``'s law scaled by ``1/√dim`` as at any
    width, and the output layer's law unscaled (the mean-field ``a = n·v`` of μP's
    ``v ~ law/n``).  Other scalings have no mean-field limit: their laws are the
    spec's.
    """
    depth = int(spec.network.hidden)
    k = outputs(spec)
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    fans = _fans(spec, depth, None, k)  # a cnn's: per particle
    dim = fans[0][0]
    laws = _init_laws(spec, depth, dim)
    plans = []
    for layer in range(1, depth + 2):
        scale = 1.0 / math.sqrt(dim) if (spec.scaling == "mup" and layer == 1) else 1.0
        plans.append(
            LayerPlan(
                index=layer,
                fan_in=fans[layer - 1][0],
                fan_out=fans[layer - 1][1],
                forward_mult=1.0,
                lr_mult=1.0,
                init=_dist(laws[layer], scale),
                bias=bool(spec.network.bias),
                bias_lr_mult=1.0,
                decay_mult=1.0,
                bias_decay_mult=1.0,
                bias_noise_mult=0.0 if layer == depth + 1 else None,
                frozen=layer in frozen,
            )
        )
    return tuple(plans)


def test_size(data: ir.Data) -> int:
    """The test-set size."""
    if data.test == "all" and isinstance(data, ir.ImageData):
        return ir.IMAGE_SIZES[data.kind][1]
    return int(data.test)


def _observables(spec: ir.Spec) -> tuple[ObservablePlan, ...]:
    depth = int(spec.network.hidden)
    record = spec.record.observables if spec.record is not None else default_observables(spec)
    # the probe inputs are the first test points: a small test set has fewer by default
    default_probes = min(DEFAULT_PROBES, test_size(spec.data))
    out = []
    for obs in record:
        kind = ir.OBSERVABLE_KINDS[obs.name]
        if obs.layer is not None:
            layers = tuple(depth + 1 if s == "last" else int(s) for s in obs.layer)
        else:
            layers = kind.layers(depth)
        probes = int(obs.probes) if obs.probes is not None else default_probes
        sample = int(obs.sample) if obs.sample is not None else DEFAULT_SAMPLE
        out.append(
            ObservablePlan(
                name=obs.name,  # type: ignore[arg-type]
                layers=layers,
                probes=probes if kind.probes else 0,
                sample=min(sample, 10**9) if obs.name == "particles" else 0,
            )
        )
    return tuple(out)


def _schedule(node: Any) -> SchedulePlan:
    if isinstance(node, ir.CosineSchedule):
        return SchedulePlan(kind="cosine", final=float(node.final))
    if isinstance(node, ir.LinearSchedule):
        return SchedulePlan(kind="linear", final=float(node.final))
    if isinstance(node, ir.StepSchedule):
        return SchedulePlan(kind="step", every=int(node.every), factor=float(node.factor))
    if isinstance(node, ir.InverseTimeSchedule):
        return SchedulePlan(kind="inverse_time", rate=float(node.rate))
    return SchedulePlan()


def backend_options(spec: ir.Spec, backend: str) -> dict[str, Any]:
    """The backend's declared defaults overlaid with the spec's options block."""
    declared = available_backends()[backend].options
    values = {o.name: o.default for o in declared if not o.required}
    block = spec.options_for(backend)
    if block is not None:
        values.update(dict(block.values))
    return values


def compile_point(spec: ir.Spec, coords: dict[str, Any], backend: str) -> RunPlan:
    """The run plan of one concrete sweep point (``spec`` from :func:`mfdsl.expand`)."""
    opt = spec.train.optimizer
    width = coords["width"]
    if isinstance(opt, ir.Langevin):
        optimizer = OptimizerPlan(
            kind="langevin", lr=opt.lr, weight_decay=opt.weight_decay, temperature=opt.temperature
        )
    elif isinstance(opt, ir.Adam):
        optimizer = OptimizerPlan(
            kind="adam",
            lr=opt.lr,
            beta1=opt.beta1,
            beta2=opt.beta2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
    else:
        optimizer = OptimizerPlan(kind="sgd", lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    steps = total_steps(spec)
    return RunPlan(
        experiment=spec.experiment,
        coords=dict(coords),
        width=float(width),
        seed=int(coords["seed"]),
        scaling=str(spec.scaling),
        layers=layer_plans(spec, int(width)) if math.isfinite(width) else limit_layer_plans(spec),
        activation=str(spec.network.activation),
        output=str(spec.network.output),
        loss=spec.train.loss,
        data=spec.data,
        batch=int(spec.train.batch),
        steps=steps,
        optimizer=optimizer,
        schedule=_schedule(spec.train.schedule),
        record_steps=record_steps(spec.record, steps),
        observables=_observables(spec),
        options=backend_options(spec, backend),
        data_seed=_apart(coords, "data_seed"),
        init_seed=_apart(coords, "init_seed"),
        conv=conv_plan(spec),
    )


def limit_problem(spec: ir.Spec) -> SpecError | None:
    """Why a concrete spec has no mean-field limit, or ``None`` when it has one.

    ``mean_field`` has one at every depth.  ``mup`` coincides with it at two layers
    (``hidden = 1``: μP's output weights ``v ~ law/n`` are the mean-field ``a = n·v``,
    and its per-layer learning rates give the same flow) — but not beyond, and not
    with weight decay or Langevin noise, which μP applies at its own per-layer rates.
    ``ntk`` and ``standard`` have a kernel (lazy) limit at any depth, not this one.
    Adam has none here: the limit's flow is SGD's (gradient flow), and Adam's per-entry
    normalisation of the particles' gradients is not implemented.  A limit backend raises the error this returns (it points at the spec's ``scaling``).
    """
    is_expr = ir.is_expr
    opt = spec.train.optimizer
    if isinstance(opt, ir.Adam):
        return SpecError(
            "the jax backend computes the mean-field limit of SGD (gradient flow); no mean-field "
            "limit of Adam is implemented, so it cannot compute this spec",
            opt.span or spec.train.where("optimizer"),
            hint="drop jax from 'backends' to train Adam at finite widths with torch, "
            "or use optimizer = sgd(...) for a spec with a limit",
        )
    scaling = spec.scaling
    where = spec.where("scaling")
    if is_expr(scaling):
        return None
    if isinstance(spec.network, ir.ConvNetwork):
        if scaling == "mean_field":
            return None
        return SpecError(
            f"the jax backend computes the infinite-channel mean-field limit of a cnn, and "
            f"'{scaling}' scaling has none it computes ("
            + (
                "its limit is a kernel (lazy-training) limit"
                if scaling in ("ntk", "standard")
                else "μP's limit is the mean-field one only for a two-layer mlp"
            )
            + ")",
            where,
            hint="use 'scaling mean_field', or drop jax from 'backends' for this spec",
        )
    hidden = spec.network.hidden
    if scaling in ("ntk", "standard"):
        return SpecError(
            f"the jax backend computes the mean-field limit, and '{scaling}' scaling has none: "
            "its infinite-width limit is a kernel (lazy-training) limit, at any depth",
            where,
            hint="use 'scaling mean_field' (or 'mup' for two layers), or drop jax from 'backends'",
        )
    if scaling == "mup" and not is_expr(hidden) and hidden > 1:
        return SpecError(
            "the jax backend computes the mean-field limit; 'mup' coincides with it only at two "
            f"layers (hidden = 1), and this network has {hidden} hidden layers",
            where,
            hint="use 'scaling mean_field' for the mean-field limit of a deeper network, "
            "or drop jax from 'backends' for this spec",
        )
    decay = getattr(opt, "weight_decay", 0.0)
    noisy = isinstance(opt, ir.Langevin)
    if scaling == "mup" and ((not is_expr(decay) and decay > 0) or noisy):
        return SpecError(
            "under 'mup' weight decay and Langevin noise act at μP's per-layer rates, which "
            "have no mean-field limit; the jax backend cannot compute this spec",
            where,
            hint="use 'scaling mean_field' (decay and noise at rate lr on every weight)",
        )
    return None


def _apart(coords: Mapping[str, Any], name: str) -> int | None:
    """The sweep variable ``data_seed`` or ``init_seed`` of a point, if it is swept."""
    return int(coords[name]) if name in coords else None
