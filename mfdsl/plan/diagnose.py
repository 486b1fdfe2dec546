"""``mfdsl check``'s science checks: specs whose limit cannot learn, and why.

Three traps of mean-field networks (``docs/mean-field.md`` §3) make a long run show
nothing, and each is visible before any training:

* **A limit that cannot move.**  The mean-field limit's velocity at ``t = 0`` is
  evaluated with a few hundred particles and data samples (numpy, R1: middle layers at
  their mean).  When it is zero up to the data's sampling noise, the limit sits on a
  stationary point — a saddle such as centred middle weights with an odd activation, a
  symmetric first layer with a sigmoid on symmetric data, or a centred frozen read-out
  — and the finite networks leave it only through their O(n^-1/2) fluctuations.
* **A homogeneous network on classes that differ only in norm.**  A bias-free ReLU (or
  identity) network satisfies f(cx) = c·f(x), so its sign depends only on x/‖x‖; the
  classes of ``isotropic_gaussian`` have the same law of directions, so accuracy stays
  at chance at every width.
* **Degenerate middle layers.**  With i.i.d. initial weights at L ≥ 3 hidden layers,
  every neuron of layers 2 … L−1 carries the same pre-activation in the limit
  (Pham & Nguyen 2020): their ``neuron_spread`` falls like n^-1/2 and their
  ``particles`` collapse onto one point.  Not where the weights into or out of the
  layer are drawn from a neuronal embedding (``embedded(...)`` whose mean depends on
  the coordinates): that is what the embedding is for.

With i.i.d. layers the velocity test's middle layers collapse (R1); a limit with an
embedded layer is evaluated on a plain particle system instead, a product quadrature of
its independent parts (:func:`velocity_z_embedded`).

The velocity test: the velocity ``v`` of each trained parameter group (per particle,
averaged over M data samples) is computed on K batches of the samples, and
``U = Σ_{k≠l} <v_k, v_l>`` — an unbiased estimate of ``K(K−1)‖v‖²`` — is divided by its
standard deviation under "no velocity"; this z is O(1) at a stationary point (its
largest value over 60 draws at a sigmoid saddle: 4.1) and near its ceiling
``√(K(K−1)/2) ≈ 22`` when the limit moves (a weak velocity in the biases alone: ≥ 14),
so ``z < 8`` is "cannot move".  A finite training set that fits in the M samples is the
limit's exact empirical measure: there the velocity has no sampling noise and is
compared with rounding.  Symmetric laws are sampled antithetically (each particle with
its mirror image), so the symmetric cancellations that make a saddle hold exactly among
the particles, and only the data's noise is left.  Image data is not read at ``check`` time, so its specs get the
homogeneity and depth checks only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mfdsl.core.activations import derivative, numpy_activation
from mfdsl.core.errors import Span, SpecWarning, did_you_mean, one_of
from mfdsl.core.streams import Stream
from mfdsl.core.streams import rng as stream_rng
from mfdsl.language import ir as ir
from mfdsl.language.latent import evaluate, varies
from mfdsl.plan.compile import limit_layer_plans
from mfdsl.plan.types import DistPlan, LayerPlan

#: particles per layer (before the antithetic mirror images) and data samples
PARTICLES = 128
SAMPLES = 4096
#: batches of the samples for the test (see velocity_ratio)
BATCHES = 32
#: z below this: the limit's velocity is zero up to sampling noise
STILL = 8.0
#: the most input entries (samples × dim) the test draws
_MAX_ENTRIES = 2**25
#: ‖v‖² below this times the mean ‖g_m‖²: zero up to rounding (exact mode)
_ROUNDING = 1e-20

_HOMOGENEOUS = ("relu", "identity")


#: the checks, by the name a spec's ``# mfdsl: allow NAME`` comment silences
CHECKS = ("saddle", "homogeneous", "degenerate")

_ALLOW = re.compile(r"#[ \t]*mfdsl:[ \t]*allow[ \t]+([\w, \t-]*)")


def allowed(source: str | None) -> tuple[set[str], list[SpecWarning]]:
    """The checks a spec silences with ``# mfdsl: allow NAME[, NAME …]`` comments, and a
    warning for each name that is not a check."""
    found: set[str] = set()
    unknown: list[SpecWarning] = []
    text = source or ""
    for match in _ALLOW.finditer(text):
        for word in re.finditer(r"[^\s,]+", match.group(1)):
            name = word.group(0)
            if name in CHECKS:
                found.add(name)
                continue
            start = match.start(1) + word.start()
            line = text.count("\n", 0, start) + 1
            column = start - (text.rfind("\n", 0, start) + 1) + 1
            span = Span(line, column, line, column + len(name), start, start + len(name))
            unknown.append(
                SpecWarning(
                    f"'{name}' is not a check that '# mfdsl: allow' can silence",
                    span,
                    hint=did_you_mean(name, CHECKS) or f"the checks are {one_of(CHECKS)}",
                )
            )
    return found, unknown


def diagnose(spec: ir.Spec, points: Iterable[Any]) -> list[SpecWarning]:
    """The science warnings of a checked spec (``points``: its expanded sweep points),
    each located at the rule or key that causes it, in source order, less those the
    spec silences with ``# mfdsl: allow NAME``."""
    skip, out = allowed(spec.source)
    checks: list[tuple[str, Callable[[Any], SpecWarning | None]]] = [
        ("homogeneous", lambda p: _homogeneous(p.spec)),
        ("degenerate", lambda p: _degenerate(p.spec)),
        ("saddle", lambda p: _still(p.spec, p.seed)),
    ]
    seen: set[Any] = set()
    for point in points:
        key = _key(point.spec)
        if key in seen:
            continue
        seen.add(key)
        for name, check in checks:
            if name in skip:
                continue
            warning = check(point)
            if warning is not None and warning.message not in {w.message for w in out}:
                warning.hint = f"{warning.hint}\n(silence with a comment: # mfdsl: allow {name})"
                out.append(warning)
    for warning in out:
        warning.located(spec.path, spec.source)
    return sorted(out, key=lambda w: w.span.start_pos if w.span else 0)


def _key(spec: ir.Spec) -> Any:
    """What the checks depend on (not the width, the seed or the learning rate)."""
    return repr((spec.data, spec.network, spec.scaling, spec.init, spec.train.freeze, spec.record))


def _homogeneous(spec: ir.Spec) -> SpecWarning | None:
    net = spec.network
    if net.activation not in _HOMOGENEOUS or net.bias or spec.data.kind != "isotropic_gaussian":
        return None
    return SpecWarning(
        f"a {net.activation} network without biases is positively homogeneous (f(cx) = c·f(x)), so its "
        "sign depends only on the direction of x; isotropic_gaussian's classes differ only in norm, "
        "so test accuracy stays at chance at every width and in the limit",
        net.where("activation"),
        hint="add biases (network { bias = true }) or use a non-homogeneous activation (tanh, sigmoid, gelu)",
    )


def _embedded_layers(spec: ir.Spec) -> set[int]:
    """The weight layers drawn from a neuronal embedding (``embedded(...)`` whose mean
    depends on the coordinates)."""
    depth = int(spec.network.hidden)
    out: set[int] = set()
    for rule in spec.init.rules if spec.init is not None else ():
        if isinstance(rule.dist, ir.Embedded) and varies(rule.dist.mean):
            out |= {depth + 1 if x == "last" else int(x) for x in rule.layers}
    return out


def _degenerate(spec: ir.Spec) -> SpecWarning | None:
    if isinstance(spec.network, ir.ConvNetwork):
        return None  # the collapse is derived for dense middle layers, not convolutions
    depth = int(spec.network.hidden)
    if depth < 3 or spec.record is None:
        return None
    # Hidden layer ℓ (2 … L−1) degenerates when the weights entering it (layer ℓ) and
    # leaving it (layer ℓ+1) are i.i.d.: then every neuron has the same pre-activation
    # and the same backward signal, for all time.  A weight function of the neurons'
    # coordinates on either side breaks that symmetry.
    embedded = _embedded_layers(spec)
    middle = {ell for ell in range(2, depth) if ell not in embedded and ell + 1 not in embedded}
    for obs in spec.record.observables:
        if obs.name not in ("neuron_spread", "particles"):
            continue
        chosen = _layers(obs, depth)
        hit = sorted(middle & chosen)
        if hit:
            which = ", ".join(str(h) for h in hit)
            return SpecWarning(
                f"with i.i.d. initial weights and {depth} hidden layers, the neurons of layer "
                f"{which} become identical as the width grows (Pham & Nguyen 2020): their "
                f"{obs.name} degenerates (spread ∝ n^-1/2)",
                obs.span,
                hint="expected if the degeneracy is what you measure; otherwise record other layers or use fewer hidden layers",
            )
    return None


def _layers(obs: ir.Observable, depth: int) -> set[int]:
    layers = getattr(obs, "layer", None)
    if not layers:
        return set(range(1, depth + 1))
    if isinstance(layers, (int, str)):
        layers = (layers,)
    return {depth + 1 if x == "last" else int(x) for x in layers}


# -- the limit's velocity at t = 0 ------------------------------------------------------


def _still(spec: ir.Spec, seed: int) -> SpecWarning | None:
    if isinstance(spec.network, ir.ConvNetwork):
        return None  # the velocity test evaluates an mlp's limit
    scaling = spec.scaling
    depth = int(spec.network.hidden)
    if not (scaling == "mean_field" or (scaling == "mup" and depth == 1)):
        return None  # no mean-field limit to evaluate
    if isinstance(spec.data, ir.ImageData):
        return None  # the files are not read at check time
    if int(ir.data_dim(spec.data)) * SAMPLES > _MAX_ENTRIES:
        return None  # inputs too wide to sample cheaply (the memory estimate judges them)
    layers = limit_layer_plans(spec)
    if all(layer.frozen for layer in layers):
        return None
    embedded = any(layer.init.varies for layer in layers)
    layers = tuple(dataclasses.replace(layer, init=layer.init.iid()) for layer in layers)
    x, y, task, whole = _samples(spec.data, seed)
    act = spec.network.activation
    z = (velocity_z_embedded if embedded else velocity_z)(
        layers,
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
    if z >= STILL or math.isnan(z):
        return None  # it moves, or its numbers overflowed and the test says nothing
    why = (
        "zero on the whole training set (to rounding)"
        if whole
        else f"zero up to sampling noise (z = {z:.1f} on {x.shape[0]} samples; a moving limit gives z ≫ {STILL:g})"
    )
    return SpecWarning(
        f"the mean-field limit of this spec cannot move: its velocity at t = 0 is {why}, so the limit "
        "sits on a stationary point (a saddle) and learns nothing; finite networks leave it only "
        "through fluctuations that vanish with the width",
        _culprit(spec, layers),
        hint=_hint(spec, layers),
    )


def _samples(data: ir.Data, seed: int) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """Data samples for the limit's E_Z, and whether they are the whole (finite)
    training set — the exact empirical measure the limit averages over."""
    from mfdsl.data.make import make_dataset

    small = dataclasses.replace(data, test=1)  # the test set is not used here
    ds = make_dataset(small, seed)
    n = SAMPLES if ds.n_train is None else min(SAMPLES, ds.n_train)
    x, y = ds.train_chunk(0, 1, n)  # one step of n examples
    whole = ds.n_train is not None and n == ds.n_train
    return np.asarray(x, np.float64).reshape(n, -1), np.asarray(y).reshape(n), ds.task, whole


def _particles(dist: DistPlan, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """``PARTICLES`` draws, followed by their mirror images when the law is symmetric."""
    w = dist.sample(rng, (PARTICLES, *shape))
    return np.concatenate([w, -w]) if _symmetric(dist) else w


def _symmetric(dist: DistPlan) -> bool:
    if dist.kind == "uniform":
        return dist.a == -dist.b
    return dist.a == 0.0


def velocity_z(
    layers: tuple[LayerPlan, ...],
    phi: Callable[[np.ndarray], np.ndarray],
    dphi: Callable[[np.ndarray], np.ndarray],
    output: str,
    loss: str,
    x: np.ndarray,
    y: np.ndarray,
    task: str,
    *,
    exact: bool = False,
    seed: int = 0,
) -> float:
    """How clearly the mean-field limit moves at ``t = 0``: a z-score, about N(0, 1) at a
    stationary point, large when it moves (see the module notes).

    ``layers`` are limit layer plans; ``x`` (M, d) and ``y`` are data samples.  With
    ``exact`` they are the whole training set, so the velocity has no sampling noise:
    the result is ``inf`` if it is nonzero beyond rounding, else 0.
    """
    gen = stream_rng(seed, Stream.DIAGNOSE)
    depth = len(layers) - 1
    k = layers[-1].fan_out
    m = x.shape[0]
    first, last = layers[0], layers[-1]
    w1 = _particles(first.init, gen, (x.shape[1],))  # (N1, d)
    if depth == 1:
        # one population: the particle is (w_1, w_2); mirror each half independently
        w2 = last.init.sample(gen, (w1.shape[0], k))
        if _symmetric(last.init):
            w1, w2 = np.concatenate([w1, w1]), np.concatenate([w2, -w2])
    else:
        w2 = _particles(last.init, gen, (k,))  # (N_L, K) read-out particles
    mu = [layer.init.mean for layer in layers]  # R1: middle layers at their mean

    h1 = x @ w1.T  # (M, N1)
    a1 = phi(h1)
    hs: list[np.ndarray] = []  # H_2 … H_L: one number per sample (all neurons alike)
    if depth >= 2:
        h = mu[1] * a1.mean(axis=1)
        hs.append(h)
        for ell in range(3, depth + 1):
            h = mu[ell - 1] * phi(h)
            hs.append(h)
        pre = phi(hs[-1])[:, None] * w2.mean(axis=0)[None, :]  # (M, K)
    else:
        pre = a1 @ w2 / w1.shape[0]
    d_out = _output_delta(pre, y, output, loss, task, k)  # (M, K)

    terms: list[tuple[np.ndarray, np.ndarray]] = []  # (A, B): per-sample gradient A_m ⊗ B_m

    def add(a: np.ndarray, b: np.ndarray) -> None:
        terms.append((a, b))

    ones = np.ones((m, 1))
    if depth == 1:
        if not last.frozen:
            add(a1, d_out)  # v(c) = -E[Δ φ(H_1(c))] for each output unit: A_m (N), B_m (K)
        if last.bias and not last.frozen:
            add(ones, d_out)
        delta1 = (d_out @ w2.T) * dphi(h1)  # (M, N1)
    else:
        if not last.frozen:
            add(phi(hs[-1])[:, None], d_out)
        if last.bias and not last.frozen:
            add(ones, d_out)
        # Δ_L(z, c_L) = (Δ_{L+1} · w_{L+1}(c_L)) φ'(H_L)
        delta = (d_out @ w2.T) * dphi(hs[-1])[:, None]  # (M, N_L)
        for ell in range(depth, 1, -1):  # layers L … 2, with Δ_ℓ and φ(H_{ℓ-1})
            layer = layers[ell - 1]
            below = a1 if ell == 2 else phi(hs[ell - 3])[:, None]
            if not layer.frozen:
                add(below, delta)
            if layer.bias and not layer.frozen:
                add(ones, delta)
            # Δ_{ℓ-1} = μ_ℓ E_{c_ℓ}[Δ_ℓ] φ'(H_{ℓ-1})
            back = mu[ell - 1] * delta.mean(axis=1)
            delta = back[:, None] * (dphi(h1) if ell == 2 else dphi(hs[ell - 3])[:, None])
        delta1 = delta
    if not first.frozen:
        add(x, delta1)
    if first.bias and not first.frozen:
        add(ones, delta1)

    return _z(terms, m, exact)


def _z(terms: list[tuple[np.ndarray, np.ndarray]], m: int, exact: bool) -> float:
    """The z-score of the velocity whose per-sample gradients are ``A_m ⊗ B_m`` for each
    ``(A, B)`` of ``terms`` (M rows each); see :func:`velocity_z`."""
    if exact:
        for a, b in terms:
            v = a.T @ b / m
            scale = float(np.sum(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))) / m
            if float(np.sum(v * v)) > _ROUNDING * scale:
                return math.inf
        return 0.0
    # The samples are cut into K batches; v_k is the velocity on batch k.  With no
    # true velocity the v_k are independent with mean 0, so U = Σ_{k≠l} <v_k, v_l> (an
    # unbiased estimate of K(K−1)‖v‖²) has mean 0 and variance 2 Σ_{k≠l} <v_k, v_l>²;
    # z = U / √that is about N(0, 1) at a stationary point and grows with M when the
    # limit moves (up to √(K(K−1)/2)).  Each parameter group is tested alone (a weak
    # signal in the biases is not drowned by the noise of a large weight matrix); the
    # limit moves if any group does.
    k = max(2, min(BATCHES, m // 8))
    cut = m - m % k
    best = 0.0
    for a, b in terms:
        va = a[:cut].reshape(k, cut // k, -1)
        vb = b[:cut].reshape(k, cut // k, -1)
        v = np.einsum("kmi,kmj->kij", va, vb).reshape(k, -1)  # (K, params): batch sums
        c = v @ v.T
        off = c - np.diag(np.diag(c))
        u = float(off.sum())
        var = 2.0 * float(np.sum(off * off))
        if var > 0.0:
            best = max(best, u / math.sqrt(var))
        elif u > 0.0:
            return math.inf
    return best


#: the embedded test's quadrature: coordinates per layer (a midpoint grid) and i.i.d.
#: draws per neuron (each with its mirror image)
GRID_POINTS = 16
NOISE_DRAWS = 8


def velocity_z_embedded(
    layers: tuple[LayerPlan, ...],
    phi: Callable[[np.ndarray], np.ndarray],
    dphi: Callable[[np.ndarray], np.ndarray],
    output: str,
    loss: str,
    x: np.ndarray,
    y: np.ndarray,
    task: str,
    *,
    exact: bool = False,
    seed: int = 0,
) -> float:
    """:func:`velocity_z` for a limit with ``embedded`` layers, on a plain particle system.

    The limit's expectations over a layer's neurons are over independent latent
    coordinates ``U ~ uniform(0, 1)`` and the i.i.d. parts each neuron carries (its
    first-layer weights, its read-out weights).  The particles are their product: the
    midpoint grid ``u_i = (i + ½)/G`` of the coordinates times draws of the i.i.d. parts,
    each with its mirror image about its mean.  So the cancellations that make a
    stationary point hold exactly among the particles as in the limit: the midpoint rule
    averages ``cos(2π(u − c))`` (any trigonometric polynomial of degree < G) to 0, the
    mirrors cancel what a symmetric law cancels, and a product of independent parts
    averages as the product of their averages.  Middle layers are at their R1 law: the
    mean function on the pairs of coordinates, without the i.i.d. part."""
    gen = stream_rng(seed, Stream.DIAGNOSE)
    depth = len(layers) - 1
    d, k, m = x.shape[1], layers[-1].fan_out, x.shape[0]
    draws = NOISE_DRAWS if depth >= 2 else NOISE_DRAWS // 2  # L = 1: both ends on one layer
    grid = (np.arange(GRID_POINTS) + 0.5) / GRID_POINTS

    def per_neuron(law: DistPlan, u: np.ndarray, shape: int, coordinate: str) -> np.ndarray:
        """(len(u), 2·draws, shape): the weights of neurons at coordinates u, each with
        every draw of the law's i.i.d. part and its mirror."""
        if law.embedded:
            column = u[:, None]
            values = evaluate(law.fn, *((column, None) if coordinate == "u_in" else (None, column)))
            mean = law.a * np.broadcast_to(values, (u.size, 1))
            noise = gen.standard_normal((draws, shape)) * law.b
        else:
            mean = np.full((u.size, 1), law.mean)
            noise = law.sample(gen, (draws, shape)) - law.mean
        noise = np.concatenate([noise, -noise])  # (2·draws, shape)
        return mean[:, None, :] + noise[None, :, :]

    first, last = layers[0].init, layers[-1].init
    if depth == 1:
        w1 = per_neuron(first, grid, d, "u_out")  # (G, D1, d)
        w2 = per_neuron(last, grid, k, "u_in")  # (G, D2, K)
        g, d1, d2 = grid.size, w1.shape[1], w2.shape[1]
        coords = [np.repeat(grid, d1 * d2)]
        w_in = np.broadcast_to(w1[:, :, None, :], (g, d1, d2, d)).reshape(-1, d)
        w_out = np.broadcast_to(w2[:, None, :, :], (g, d1, d2, k)).reshape(-1, k)
    else:
        w1 = per_neuron(first, grid, d, "u_out")
        w2 = per_neuron(last, grid, k, "u_in")
        coords = [np.repeat(grid, w1.shape[1])]
        coords += [grid] * (depth - 2)
        coords.append(np.repeat(grid, w2.shape[1]))
        w_in, w_out = w1.reshape(-1, d), w2.reshape(-1, k)
    middle = []  # W_ℓ, 2 ≤ ℓ ≤ L: (P_{ℓ-1}, P_ℓ)
    for ell in range(2, depth + 1):
        law = layers[ell - 1].init
        u_in, u_out = coords[ell - 2][:, None], coords[ell - 1][None, :]
        w = law.a * evaluate(law.fn, u_in, u_out) if law.varies else np.array(law.iid().mean)
        middle.append(np.broadcast_to(w, (u_in.shape[0], u_out.shape[1])))

    hs = [x @ w_in.T]  # H_1 … H_L: (M, P_ℓ)
    for w in middle:
        hs.append(_average(phi(hs[-1]), w))
    a_last = phi(hs[-1])
    d_out = _output_delta(_average(a_last, w_out), y, output, loss, task, k)
    terms: list[tuple[np.ndarray, np.ndarray]] = []
    ones = np.ones((m, 1))
    top = layers[-1]
    if not top.frozen:
        terms.append((a_last, d_out))
    if top.bias and not top.frozen:
        terms.append((ones, d_out))
    delta = (d_out @ w_out.T) * dphi(hs[-1])
    for ell in range(depth, 1, -1):
        layer, w = layers[ell - 1], middle[ell - 2]
        if not layer.frozen:
            terms.append((phi(hs[ell - 2]), delta))
        if layer.bias and not layer.frozen:
            terms.append((ones, delta))
        delta = _average(delta, w.T) * dphi(hs[ell - 2])
    if not layers[0].frozen:
        terms.append((x, delta))
    if layers[0].bias and not layers[0].frozen:
        terms.append((ones, delta))
    return _z(terms, m, exact)


#: an average below this fraction of the average of its terms' magnitudes is a cancellation
_CANCELLED = 1e-12


def _average(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w / len(w)``, with the entries where the terms cancel (to within rounding of
    their magnitudes) set to exactly 0: the z-score is blind to scale, and would read the
    pattern of rounding errors of an exact cancellation as a signal."""
    mean = a @ w / w.shape[0]
    size = np.abs(a) @ np.abs(w) / w.shape[0]
    return np.where(np.abs(mean) <= _CANCELLED * size, 0.0, mean)


def _output_delta(pre: np.ndarray, y: np.ndarray, output: str, loss: str, task: str, k: int) -> np.ndarray:
    """∂loss/∂(pre-output), per sample: (M, K)."""
    if output == "tanh":
        out, dout = np.tanh(pre), 1.0 - np.tanh(pre) ** 2
    elif output == "sigmoid":
        s = 0.5 * (1.0 + np.tanh(0.5 * pre))
        out, dout = s, s * (1.0 - s)
    else:
        out, dout = pre, np.ones_like(pre)
    target = np.eye(k)[y.astype(np.int64)] if task == "multiclass" else y.astype(np.float64).reshape(-1, 1)
    if loss == "logistic":
        margin = target * out
        grad = -target * 0.5 * (1.0 - np.tanh(0.5 * margin))  # -y σ(-y ŷ)
    elif loss == "cross_entropy":
        z = out - out.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        grad = p - target
    else:
        grad = out - target
    return grad * dout


def _culprit(spec: ir.Spec, layers: tuple[LayerPlan, ...]) -> Any:
    """The init rule most likely responsible: a centred middle or read-out layer, else
    the first layer's, else the init block or the network."""
    depth = len(layers) - 1
    centred = [layer.index for layer in layers[1:] if not layer.init.varies and layer.init.mean == 0.0]
    embedded = [layer.index for layer in layers[1:-1] if layer.init.varies]
    target = embedded[0] if embedded and not layers[0].init.varies else (centred[0] if centred else 1)
    if spec.init is not None:
        for rule in spec.init.rules:
            chosen = {depth + 1 if x == "last" else int(x) for x in rule.layers}
            if target in chosen:
                return rule.span
        return spec.init.span
    return spec.network.where("activation")


def _hint(spec: ir.Spec, layers: tuple[LayerPlan, ...]) -> str:
    depth = len(layers) - 1
    tips = []
    if any(layer.init.varies for layer in layers[1:-1]) and not layers[0].init.varies:
        tips.append(
            "a first layer whose mean depends on u_out (e.g. layer 1 ~ embedded(mean = cos(2 * pi * "
            "u_out) / sqrt(dim), std = 1 / sqrt(dim))): without it layer 1's neurons ignore their "
            "coordinate and the middle layers' weight functions average out"
        )
    if depth >= 2 and any(not layer.init.varies and layer.init.mean == 0.0 for layer in layers[1:-1]):
        tips.append("non-centred middle weights (e.g. normal(1, 1))")
    if not layers[-1].init.varies and layers[-1].init.mean == 0.0:
        tips.append("a non-centred read-out (e.g. layer last ~ normal(1, 1))")
    if not spec.network.bias:
        tips.append("biases (network { bias = true })")
    tips.append("an activation that is not odd or sigmoid-shaped around 0 (relu, gelu)")
    return "try " + "; or ".join(tips)
