"""The geometry of a convolutional network (``network cnn``), shared by the compiler
and both backends: plain numbers, no torch or jax.

A ``cnn`` network is a stack of convolution layers, each with ``width`` output
channels, then a head (global average pooling, or flattening) and ``dense`` mean-field
dense layers of ``width`` neurons, then the output layer.  Weight layer ℓ is held, in
every backend, as one matrix ``(fan_in, fan_out)``:

* conv layer ℓ: ``(C_{ℓ-1} · k · k, C_ℓ)``, rows ordered ``(input channel, kernel row,
  kernel column)`` — the layout of ``torch.nn.functional.unfold`` and of a torch conv
  weight ``W.T.reshape(C_ℓ, C_{ℓ-1}, k, k)``;
* the first layer after a ``flatten`` head: ``(C · S, n)`` with rows ``(channel,
  position)``, ``S`` the positions of the last feature map (row-major);
* the other dense layers and the output layer as in an mlp.

so :func:`mfdsl.plan.types.initial_weights` draws a width-N network and an N-particle
system alike.  A conv layer computes, at each output position ``p``,
``H_ℓ[c, p] = m_ℓ Σ_{i, δ} a_{ℓ-1}[i, s·p + δ − pad] W_ℓ[(i, δ), c] (+ b_ℓ[c])`` over
input channels ``i`` and kernel offsets ``δ`` (zero padding), then
``a_ℓ = pool(φ(H_ℓ))`` with ``pool`` an average over non-overlapping ``pool × pool``
windows (a remainder is dropped, as ``avg_pool2d`` does).  The head maps the last
``a`` to the vector ``g``: ``avg`` — ``g[c] = mean_p a[c, p]``; ``flatten`` —
``g[(c, p)] = a[c, p]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfdsl.core import streams as _streams
from mfdsl.core.geometry import ConvLayerPlan, conv_size, shape_problem
from mfdsl.core.streams import Stream


@dataclass(frozen=True, kw_only=True)
class ConvPlan:
    """The convolutional part of a network: the input image ``(channels, height,
    width)``, the conv layers, and the head (``avg`` or ``flatten``)."""

    channels: int
    height: int
    width: int
    layers: tuple[ConvLayerPlan, ...]
    head: str = "avg"

    def sizes(self) -> list[tuple[int, int, int, int]]:
        """Per conv layer ``(H_conv, W_conv, H_pooled, W_pooled)``: the spatial size
        of its pre-activation and of its output after pooling."""
        out = []
        h, w = self.height, self.width
        for i, layer in enumerate(self.layers, start=1):
            problem = shape_problem(layer, h, w)
            if problem:
                raise ValueError(f"conv layer {i}: {problem}")
            hc, wc = conv_size(h, layer), conv_size(w, layer)
            h, w = hc // layer.pool, wc // layer.pool
            out.append((hc, wc, h, w))
        return out

    def positions(self) -> int:
        """``S``: the positions of the last feature map (what ``flatten`` multiplies the
        channels by)."""
        _, _, h, w = self.sizes()[-1]
        return h * w

    def head_features(self, channels: int) -> int:
        """The length of the head's vector ``g`` for ``channels`` channels."""
        return channels * self.positions() if self.head == "flatten" else channels


def particle_sample(seed: int, width: int, sample: int) -> np.ndarray:
    """The channels (neurons) ``particles(sample = S)`` follows: ``S`` of ``width``
    chosen without replacement from the stream ``PARTICLES``, sorted, padded with −1
    where the layer has fewer (``S = 0``: every one) — as the mlp engines choose them."""
    size = int(sample) or width
    rng = _streams.rng(seed, Stream.PARTICLES)
    take = np.sort(rng.choice(width, size=min(size, width), replace=False))
    idx = np.full(size, -1, dtype=np.int64)
    idx[: take.size] = take
    return idx


def outgoing_row(conv: ConvPlan, depth: int, layer: int, channel: int) -> int:
    """The row of weight layer ``layer + 1`` that carries channel (neuron) ``channel`` of
    hidden layer ``layer`` at its first kernel offset or position: ``channel · k²`` into
    a conv layer, ``channel · S`` into the first layer after a ``flatten`` head, else
    ``channel``."""
    n_conv = len(conv.layers)
    if layer < n_conv:
        return channel * conv.layers[layer].kernel ** 2
    if layer == n_conv and conv.head == "flatten" and layer <= depth:
        return channel * conv.positions()
    return channel


def particle_table(
    conv: ConvPlan, depth: int, layer: int, w_in: np.ndarray, w_out: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """``particles`` of a cnn: per chosen channel ``j`` of hidden layer ``layer``,
    ``(W_ℓ[0, j], W_ℓ[1, j], ‖W_ℓ[:, j]‖₂, W_{ℓ+1}[r_j, 0])`` with ``r_j`` its
    :func:`outgoing_row`; rows of −1 (padding) are NaN."""
    out = np.full((len(idx), 4), np.nan)
    for row, j in enumerate(idx):
        if j < 0:
            continue
        column = w_in[:, j]
        out[row, 0] = column[0]
        if column.shape[0] > 1:
            out[row, 1] = column[1]
        out[row, 2] = float(np.linalg.norm(column))
        out[row, 3] = w_out[outgoing_row(conv, depth, layer, int(j)), 0]
    return out
