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

Langevin noise acts on the parameters indexed by neurons only: every weight and the
hidden layers' biases.  The output bias ``b_{L+1}`` is one coordinate shared by all
neurons at every width; noise on it would never average out, so it gets none, under
every scaling (``bias_noise_mult = 0``; weight decay still acts on it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _ir as ir
from ._conv import ConvLayerPlan, ConvPlan
from ._plan import DEFAULT_PROBES, DistPlan, LayerPlan, ObservablePlan, OptimizerPlan, RunPlan, SchedulePlan
from ._plugins import available_backends

DEFAULT_SAMPLE = 100


def steps_for_epochs(epochs: int, n_train: int, batch: int) -> int:
    """The fewest steps that show every training example ``epochs`` times (batches run
    on through the concatenated epoch permutations, as ``mfdsl._data`` draws them)."""
    return max(1, math.ceil(epochs * n_train / batch))


def train_size(data: ir.Data) -> int | None:
    """The training-set size, or ``None`` for online data.  Image data with ``train =
    all`` holds every training image of its classes: the label files are read to count
    them (:func:`mfdsl._data.image_sizes`, which raises ``DataError`` without them)."""
    if data.train == "online":
        return None
    if data.train == "all":
        from ._data import image_sizes

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


def _cnn_layer_plans(spec: ir.Spec, width: int) -> tuple[LayerPlan, ...]:
    """:func:`layer_plans` for a cnn: the mlp's table with channels as the width.
    Conv layer ℓ ≥ 2 averages over input channels (``m = 1/n`` under mean_field, sums
    over the k² offsets); the first layer after the head averages over channels too
    (``1/n``; with ``flatten`` it sums over the S positions); ``ntk``, ``standard`` and
    ``mup`` use the conv fan-in ``C k²`` (``n S`` after a flatten head) where the mlp
    uses its fan-in."""
    conv = conv_plan(spec)
    assert conv is not None
    depth = int(spec.network.hidden)
    k = outputs(spec)
    n = width
    scaling = spec.scaling
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    fans = cnn_fans(conv, depth, n, k)
    laws = _init_laws(spec, depth, fans[0][0])
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
                decay_mult=1.0 if scaling == "mean_field" else None,
                bias_decay_mult=1.0 if scaling == "mean_field" else None,
                bias_noise_mult=0.0 if is_last else None,
                frozen=layer in frozen,
            )
        )
    return tuple(plans)


def _cnn_limit_layer_plans(spec: ir.Spec) -> tuple[LayerPlan, ...]:
    """:func:`limit_layer_plans` for a cnn (mean_field only: the jax backend rejects
    the other scalings for cnns).  Fans are per particle (:func:`cnn_fans`)."""
    conv = conv_plan(spec)
    assert conv is not None
    depth = int(spec.network.hidden)
    k = outputs(spec)
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    fans = cnn_fans(conv, depth, None, k)
    laws = _init_laws(spec, depth, fans[0][0])
    return tuple(
        LayerPlan(
            index=layer,
            fan_in=fans[layer - 1][0],
            fan_out=fans[layer - 1][1],
            forward_mult=1.0,
            lr_mult=1.0,
            init=_dist(laws[layer]),
            bias=bool(spec.network.bias),
            bias_lr_mult=1.0,
            decay_mult=1.0,
            bias_decay_mult=1.0,
            bias_noise_mult=0.0 if layer == depth + 1 else None,
            frozen=layer in frozen,
        )
        for layer in range(1, depth + 2)
    )


def layer_plans(spec: ir.Spec, width: int) -> tuple[LayerPlan, ...]:
    """Shapes, multipliers and initial laws of every weight layer."""
    if isinstance(spec.network, ir.ConvNetwork):
        return _cnn_layer_plans(spec, width)
    depth = int(spec.network.hidden)
    dim = int(ir.data_dim(spec.data))
    k = outputs(spec)
    n = width
    scaling = spec.scaling
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    laws = _init_laws(spec, depth, dim)
    plans = []
    for layer in range(1, depth + 2):
        fan_in = dim if layer == 1 else n
        fan_out = k if layer == depth + 1 else n
        is_first, is_last = layer == 1, layer == depth + 1
        init_scale = 1.0
        if scaling == "mean_field":
            mult = 1.0 if is_first else 1.0 / fan_in
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
                # mean-field decay and noise act on each weight at rate lr (see LayerPlan)
                decay_mult=1.0 if scaling == "mean_field" else None,
                bias_decay_mult=1.0 if scaling == "mean_field" else None,
                # the output bias is shared by all neurons: no Langevin noise (see LayerPlan)
                bias_noise_mult=0.0 if is_last else None,
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
    if isinstance(spec.network, ir.ConvNetwork):
        return _cnn_limit_layer_plans(spec)
    depth = int(spec.network.hidden)
    dim = int(ir.data_dim(spec.data))
    k = outputs(spec)
    frozen = {depth + 1 if f == "last" else int(f) for f in spec.train.freeze}
    laws = _init_laws(spec, depth, dim)
    plans = []
    for layer in range(1, depth + 2):
        scale = 1.0 / math.sqrt(dim) if (spec.scaling == "mup" and layer == 1) else 1.0
        plans.append(
            LayerPlan(
                index=layer,
                fan_in=dim if layer == 1 else 1,
                fan_out=k if layer == depth + 1 else 1,
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
        if obs.layer is not None:
            layers = tuple(depth + 1 if s == "last" else int(s) for s in obs.layer)
        elif obs.name == "weight_change":
            layers = tuple(range(1, depth + 2))
        elif obs.name == "neuron_spread":
            layers = tuple(range(1, depth + 1))
        elif obs.name == "particles":
            layers = (1,)
        else:
            layers = ()
        probes = int(obs.probes) if obs.probes is not None else default_probes
        sample = int(obs.sample) if obs.sample is not None else DEFAULT_SAMPLE
        out.append(
            ObservablePlan(
                name=obs.name,  # type: ignore[arg-type]
                layers=layers,
                probes=probes if obs.name in ("output", "neuron_spread") else 0,
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
        conv=conv_plan(spec),
    )
