"""The shape arithmetic of a convolution layer: what the language checks a ``network
cnn`` against (a kernel larger than its feature map, pooling that leaves nothing) and
what the compiler and the backends lay out (:mod:`mfdsl.plan.conv`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ConvLayerPlan:
    """One convolution layer: square ``kernel``, ``stride``, zero ``padding``, then
    average pooling over ``pool × pool`` windows (``pool = 1``: none)."""

    kernel: int
    stride: int = 1
    padding: int = 0
    pool: int = 1


def conv_size(size: int, layer: ConvLayerPlan) -> int:
    """The output size of a convolution along one axis (before pooling)."""
    return (size + 2 * layer.padding - layer.kernel) // layer.stride + 1


def shape_problem(layer: ConvLayerPlan, height: int, width: int) -> str | None:
    """Why ``layer`` cannot run on a ``height × width`` feature map, or ``None``."""
    padded = (height + 2 * layer.padding, width + 2 * layer.padding)
    where = f"the {height}×{width} feature map" + (
        f" (padded by {layer.padding}: {padded[0]}×{padded[1]})" if layer.padding else ""
    )
    if layer.kernel > min(padded):
        return f"the {layer.kernel}×{layer.kernel} kernel is larger than {where}"
    hc, wc = conv_size(height, layer), conv_size(width, layer)
    if layer.pool > min(hc, wc):
        return (
            f"the convolution (kernel {layer.kernel}, stride {layer.stride}) leaves a {hc}×{wc} map, "
            f"smaller than the {layer.pool}×{layer.pool} pooling window"
        )
    return None
