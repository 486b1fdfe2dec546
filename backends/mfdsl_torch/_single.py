"""One network: :func:`train`, :class:`Network` and :class:`Trainer` — an ensemble
(:mod:`._ensemble`) of one member, built from the engine's pieces (:mod:`._engine`).
Training a network alone and as a member of an ensemble gives the same numbers, bit for
bit on the CPU, because both are the one ensemble code path."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mfdsl.plugin import RunPlan, check_compatible

from ._engine import Dataset, MemberNet, Result
from ._ensemble import Ensemble, EnsembleTrainer, train_ensemble

__all__ = ["Network", "Trainer", "train"]


class Network(MemberNet):
    """A single network of ``plan``, initialised as :func:`train` initialises it (an
    ensemble of one, see :class:`~._ensemble.Ensemble`)."""

    def __init__(
        self, plan: RunPlan, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float64"
    ) -> None:
        self.ensemble = Ensemble([plan], device=device, dtype=dtype)
        member = self.ensemble.member(0)
        super().__init__(
            layers=member.layers,
            W=member.W,
            b=member.b,
            activation=member.activation,
            output=member.output,
            device=member.device,
            dtype=member.dtype,
        )


class Trainer:
    """The optimiser of one :class:`Network`: a one-member
    :class:`~._ensemble.EnsembleTrainer`."""

    def __init__(self, net: Network, plan: RunPlan, task: str, outputs: int) -> None:
        if net.ensemble.plans[0] is not plan:
            net.ensemble.plans[0] = plan
        check_compatible(plan.loss, task, outputs)
        self.net = net
        self.core = EnsembleTrainer(net.ensemble, [task], outputs)

    def prepare_chunk(self, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        """One chunk of minibatches on the device: ``(n, batch, dim)`` and the targets."""
        xs, ys = self.core.prepare_chunk([(x, y)])
        return xs[0], ys[0]

    def _members(self, t: Tensor) -> Tensor:
        """``t`` (one member's) in the ensemble's layout: a dummy's zero slot added."""
        full = t.new_zeros((self.net.ensemble.Ea, *t.shape))
        full[0].copy_(t)
        return full

    def minibatch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Batch-mean loss of one minibatch at the current weights (0-d tensor)."""
        return self.core.minibatch_loss(self._members(x), self._members(y))[0]

    def run(self, xs: Tensor, ys: Tensor, start: int) -> Tensor:
        """Do ``len(xs)`` updates from step ``start``; return their losses (device)."""
        return self.core.run(self._members(xs), self._members(ys), start)[:, 0]


def train(
    plan: RunPlan,
    dataset: Dataset,
    *,
    progress: Callable[[int, float], None] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float64",
    chunk_steps: int = 1024,
    lazy: bool = True,
    native: bool | str = True,
) -> Result:
    """Train the finite network of ``plan`` on ``dataset`` and record its observables.

    ``progress(step, train_loss)`` is called at each record step (in order) with the
    same value ``train_loss`` records.  ``chunk_steps`` caps the steps per
    ``train_chunk`` call (chunks also end at record steps).  Nothing global (threads,
    default dtype, RNG state) is changed.  See the module docstring for the semantics;
    this is :func:`~._ensemble.train_ensemble` with one member.
    """
    member_progress = None
    if progress is not None:
        report = progress

        def member_progress(member: int, step: int, loss: float) -> None:
            report(step, loss)

    return train_ensemble(
        [plan],
        [dataset],
        progress=member_progress,
        device=device,
        dtype=dtype,
        chunk_steps=chunk_steps,
        lazy=lazy,
        native=native,
    )[0]
