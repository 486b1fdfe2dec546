"""mfdsl's PyTorch backend: trains finite-width networks at every width of a sweep.

The seeds of a width (and any sweep variable that leaves the network's shapes alone)
train together as one batched ensemble (:mod:`._ensemble`), each with the results it
gets alone: :meth:`TorchBackend.group` forms the ensembles, :meth:`TorchBackend.run_group`
trains one.

This module imports no torch: the engine (``_engine``) is imported when a run starts,
so specs naming this backend check without torch installed.  ``mfdsl check`` imports
torch only for a spec that asks for ``device = cuda``, to ask it for a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, final

from mfdsl.plugin import WORKER_ENV, Backend, BackendUnavailable, Option, RunPlan, SpecError

from ._options import OPTIONS, option

if TYPE_CHECKING:
    from mfdsl.plugin import Spec


def assign_device(device: str, worker: int | None, count: int) -> str:
    """The device a worker trains on: ``cuda`` is GPU ``worker mod count`` for worker
    number ``worker`` (of ``mfdsl run``'s local pool) when there are several GPUs;
    anything else, and ``cuda`` outside a pool or with one GPU, is itself."""
    if device != "cuda" or worker is None or count < 2:
        return device
    return f"cuda:{worker % count}"


def _worker_device(device: str) -> str:
    """:func:`assign_device` in this process: its number in ``mfdsl run``'s local pool
    (:data:`mfdsl.plugin.WORKER_ENV`), torch's GPUs."""
    text = os.environ.get(WORKER_ENV, "")
    if device != "cuda" or not text.isdigit():
        return device
    import torch

    return assign_device(device, int(text), torch.cuda.device_count())


_NEEDS_TORCH = "the torch backend needs PyTorch: pip install 'mfdsl[torch]' (or pip install torch)"


@final
class TorchBackend(Backend):
    """Finite networks trained by SGD with the spec's scaling (PyTorch)."""

    name: ClassVar[str] = "torch"
    description: ClassVar[str] = "finite-width networks trained with PyTorch"
    options: ClassVar[tuple[Option, ...]] = OPTIONS

    def __init__(self) -> None:
        # What preflight found: "torch" whether it is installed, and for each cuda
        # device asked for, why torch cannot use it (None: it can).
        self._preflight: dict[str, Any] = {}

    def require(self) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendUnavailable(_NEEDS_TORCH) from None

    def preflight(self, spec: Spec) -> None:
        """torch is installed (found, not imported: ``mfdsl check`` stays fast), and,
        where the point asks for ``device = cuda``, torch sees a GPU — a CPU-only build,
        or a machine without one, would fail every run.  What was found is kept on the
        instance: a sweep asks once per device, not once per point."""
        found = self._preflight
        if "torch" not in found:
            found["torch"] = importlib.util.find_spec("torch") is not None
        if not found["torch"]:
            raise BackendUnavailable(_NEEDS_TORCH)
        block = spec.options_for(self.name)
        device = str(block.get("device", "cpu")) if block is not None else "cpu"
        if block is None or device.partition(":")[0] != "cuda":
            return
        if device not in found:
            self.require()  # torch is there: import it, to ask it for a GPU
            found[device] = _cuda_problem(device)
        problem = found[device]
        if problem is not None:
            raise SpecError(
                f"device = {device}, but {problem}: every run would fail",
                block.where("device"),
                hint="install a CUDA build of torch (https://pytorch.org/get-started/locally/), "
                "or set torch.device = cpu (on the command line: --set torch.device=cpu)",
            )

    def check(self, spec: Spec) -> None:
        """Reject a ``native`` mode that forces the compiled loop on an optimizer it does
        not run (Adam: ATen ops only)."""
        from mfdsl.plugin import Adam, ConvNetwork, is_expr

        if isinstance(spec.network, ConvNetwork) and isinstance(spec.train.optimizer, Adam):
            raise SpecError(
                "the torch backend trains a cnn with SGD or Langevin steps; Adam is implemented for "
                "mlp networks only",
                spec.train.optimizer.span or spec.train.where("optimizer"),
                hint="use optimizer = sgd(...) for a cnn, or network mlp for Adam",
            )

        block = spec.options_for(self.name)
        native = block.get("native", "auto") if block is not None else "auto"
        forced = not is_expr(native) and native in ("rows", "gemm")
        if block is not None and isinstance(spec.train.optimizer, Adam) and forced:
            raise SpecError(
                f"native = {native} forces the compiled step loop, which runs SGD and Langevin steps "
                "but not Adam: Adam trains on ATen ops",
                block.where("native"),
                hint="drop 'native' (auto picks ATen ops for Adam) or set native = off",
            )

    def run(
        self,
        plan: RunPlan,
        *,
        progress: Callable[[int, float], None] | None = None,
    ) -> Mapping[str, Any]:
        member_progress = None
        if progress is not None:
            report = progress

            def member_progress(member: int, step: int, loss: float) -> None:
                report(step, loss)

        return self.run_group([plan], progress=member_progress)[0]

    def group(self, plans: Sequence[RunPlan], workers: int) -> list[list[int]]:
        """Ensembles: the points that differ only in what leaves the shapes alone (seed,
        initial laws, learning rate, …) train as one batched network, as many as fit
        in cache and a worker's share of the sweep (``_ensemble.group_plans``)."""
        self.require()
        if any(p.conv is not None for p in plans):
            # cnns: the seeds of one network train together (mfdsl_torch._cnn); mlps
            # group among themselves as always
            mlp = [i for i, p in enumerate(plans) if p.conv is None]
            out = _cnn_groups(plans, [i for i, p in enumerate(plans) if p.conv is not None], workers)
            if mlp:
                from ._ensemble import group_plans

                sub = group_plans([plans[i] for i in mlp], workers=workers)
                out = [[mlp[j] for j in g] for g in sub] + out
            return out
        from ._ensemble import group_plans

        return group_plans(plans, workers=workers)

    def run_group(
        self,
        plans: Sequence[RunPlan],
        *,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> list[Mapping[str, Any]]:
        """One ensemble (``_ensemble.train_ensemble``): each plan's result is, bit for
        bit on CPU, what training it alone gives."""
        self.require()
        if not plans:
            return []
        if any(p.conv is not None for p in plans):
            # cnns (mfdsl_torch._cnn): an ensemble of seeds, never by the native loop
            return [
                {"records": r.records, "status": r.status, "message": r.message}
                for r in _cnn_results(plans, progress)
            ]
        options = {
            tuple(option(p, name) for name in ("device", "dtype", "lazy_updates", "native", "noise"))
            for p in plans
        }
        if len(options) > 1:  # not one ensemble: train each alone
            return super().run_group(plans, progress=progress)
        from mfdsl.plugin import make_dataset

        from ._ensemble import train_ensemble

        device, dtype, lazy, native, _ = options.pop()  # the noise: each plan's own
        results = train_ensemble(
            plans,
            [make_dataset(plan.data, plan.seed_of_data) for plan in plans],
            progress=progress,
            device=_worker_device(str(device)),
            dtype=str(dtype),
            lazy=lazy != "off",
            native=str(native),
        )
        return [{"records": r.records, "status": r.status, "message": r.message} for r in results]


#: the most seeds of one cnn trained together
_CNN_MEMBERS = 16


def _cnn_groups(plans: Sequence[RunPlan], indices: list[int], workers: int) -> list[list[int]]:
    """The cnn plans ``indices`` as ensembles: those that differ in the seed only, at
    most ``_CNN_MEMBERS`` together and no more than a worker's share of them."""
    from ._cnn import ensemble_key

    by_key: dict[Any, list[int]] = {}
    for i in indices:
        by_key.setdefault(ensemble_key(plans[i]), []).append(i)
    out = []
    for group in by_key.values():
        size = max(1, min(_CNN_MEMBERS, -(-len(group) // max(1, workers))))
        out += [group[s : s + size] for s in range(0, len(group), size)]
    return out


def _renumber(
    progress: Callable[[int, int, float], None], index: int, _: int, step: int, loss: float
) -> None:
    progress(index, step, loss)


def _cnn_results(plans: Sequence[RunPlan], progress: Callable[[int, int, float], None] | None) -> list[Any]:
    from mfdsl.plugin import make_dataset

    from ._cnn import ensemble_key, train_cnn_ensemble

    options = plans[0].options
    device, dtype = str(options.get("device", "cpu")), str(options.get("dtype", "float64"))
    if len({ensemble_key(p) for p in plans}) > 1:  # not one ensemble: train each alone
        out = []
        for i, p in enumerate(plans):
            member = None if progress is None else functools.partial(_renumber, progress, i)
            out += train_cnn_ensemble(
                [p], [make_dataset(p.data, p.seed_of_data)], progress=member, device=device, dtype=dtype
            )
        return out
    datasets = [make_dataset(p.data, p.seed_of_data) for p in plans]
    return train_cnn_ensemble(plans, datasets, progress=progress, device=device, dtype=dtype)


def _cuda_problem(device: str) -> str | None:
    """Why torch cannot train on ``device`` (``cuda`` or ``cuda:N``) here, or ``None``."""
    import torch

    version = f"torch {torch.__version__}"
    if not torch.cuda.is_available():
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"the installed {version} is a CPU-only build (torch.version.cuda is None)"
        return (
            f"{version} (CUDA {torch.version.cuda}) sees no GPU: torch.cuda.is_available() is False "
            "(no GPU on this machine, no driver, or CUDA_VISIBLE_DEVICES hides them)"
        )
    index = device.partition(":")[2]
    if index:
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            return f"torch sees {count} GPU{'s' * (count != 1)} (cuda:0 … cuda:{count - 1})"
    return None
