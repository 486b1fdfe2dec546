"""``mfdsl run`` with units of several sweep points (``Backend.group``/``run_group``):
the torch backend trains the seeds (and learning rates) of a width as one ensemble, and
the store holds, bit for bit, what running every point alone gives; a diverged member
leaves the others alone; a failing unit fails only its failing points; ``--resume``
re-groups the points still pending."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_same_data, cell_files, open_store, run_sweep

import mfdsl
from mfdsl.core.plugins import Backend
from mfdsl.execution.worker import execute_group
from mfdsl.plan.layout import plan_tasks
from mfdsl.plan.types import RunPlan
from mfdsl.store.status import Status
from mfdsl.store.zarr import create_store, read_status, write_run

pytest.importorskip("torch")

from mfdsl_torch import TorchBackend

# Width 8 trains in the ensemble's batched mode, width 260 (260 × 260 weights) member by
# member; lr = 1e6 diverges.  Each width is one ensemble of 6 members (3 seeds × 2 lr).
GROUPED = """\
experiment grouped
data isotropic_gaussian { dim = 4, delta = 0.5, train = online, test = 64 }
network mlp { hidden = 2, activation = tanh }
train { optimizer = sgd(lr = lr), loss = mse, batch = 4, steps = 40 }
record every 10 {
  train_loss, test_loss, test_accuracy
  output(probes = 3)
  neuron_spread
  weight_change
  particles(sample = 5)
}
sweep { width = [8, 260], seed = 0..2, lr = [0.05, 1e6] }
backends torch
"""

Point = tuple[float, int, float]  # width, seed, lr


def point(plan: RunPlan) -> Point:
    return (float(plan.width), int(plan.seed), float(plan.optimizer.lr))


def spy_on_group(monkeypatch: pytest.MonkeyPatch, *, alone: bool = False) -> list[list[Point]]:
    """Record the units ``TorchBackend.group`` cuts (in the driver: ``run_cli`` runs
    ``mfdsl run`` in this process); with ``alone``, every point is its own unit."""
    units: list[list[Point]] = []
    original = Backend.group if alone else TorchBackend.group

    def group(self: Backend, plans: Sequence[RunPlan], workers: int) -> list[list[int]]:
        cut = original(self, plans, workers)
        units.extend([point(plans[i]) for i in unit] for unit in cut)
        return cut

    monkeypatch.setattr(TorchBackend, "group", group)
    return units


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The sweep run twice: grouped (as ``mfdsl run`` does) and every point alone."""
    folder = tmp_path_factory.mktemp("grouped")
    spec = folder / "grouped.mf"
    spec.write_text(GROUPED, encoding="utf-8")
    out: dict[str, Any] = {"spec": spec}
    for name, alone in (("grouped", False), ("alone", True)):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("COLUMNS", "1000")
            units = spy_on_group(monkeypatch, alone=alone)
            store = folder / f"{name}.zarr"
            result = run_sweep(spec, store)
        assert result.code == 0, result.out + result.err
        out[name] = store
        out[f"{name} units"] = units
    return out


def test_the_seeds_and_learning_rates_of_a_width_train_as_one_unit(stores: dict[str, Any]) -> None:
    units = stores["grouped units"]
    assert sorted(sorted(u) for u in units) == [
        [(w, s, lr) for s in range(3) for lr in (0.05, 1e6)] for w in (8.0, 260.0)
    ]
    assert all(len(u) == 1 for u in stores["alone units"]) and len(stores["alone units"]) == 12


def test_a_grouped_sweep_equals_every_point_run_alone(stores: dict[str, Any]) -> None:
    with open_store(stores["grouped"]) as grouped, open_store(stores["alone"]) as alone:
        assert_same_data(grouped, alone)  # bitwise, float64, every observable
        assert grouped["message"].values.tolist() == alone["message"].values.tolist()


def test_a_diverged_member_leaves_the_others_alone(stores: dict[str, Any]) -> None:
    with open_store(stores["grouped"]) as ds:
        assert (ds["status"].sel(lr=1e6) == Status.DIVERGED).all()
        assert (ds["status"].sel(lr=0.05) == Status.DONE).all()
        done = ds.sel(lr=0.05)
        for name in ("train_loss", "test_loss", "output", "weight_change"):
            assert np.isfinite(done[name].values).all(), name
        assert np.isnan(ds["test_loss"].sel(lr=1e6).isel(step=-1).values).all()


def test_resume_regroups_the_pending_points(
    stores: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    store = tmp_path / "partial.zarr"
    shutil.copytree(stores["grouped"], store)
    # Width 8: seeds 1 and 2 at lr 0.05 pending; width 260: seed 0 at lr 1e6 (diverged).
    pending = [(0, 1, 0), (0, 2, 0), (1, 0, 1)]
    steps = np.arange(0, 41, 10)
    for w, s, lr in pending:
        index = {"width": w, "seed": s, "lr": lr}
        write_run(store, index=index, records={}, steps=steps, status=Status.PENDING)
    status = read_status(store)
    finished = [tuple(int(i) for i in idx) for idx in np.argwhere(status != Status.PENDING)]
    before = {cell: cell_files(store, cell) for cell in finished}

    units = spy_on_group(monkeypatch)
    result = run_sweep(stores["spec"], store, "--resume")
    assert result.code == 0, result.out + result.err
    assert "9 runs already finished, 3 to go" in " ".join(result.out.split())
    # the pending points only, as two ensembles: the two seeds of width 8 together
    assert sorted(sorted(u) for u in units) == [[(8.0, 1, 0.05), (8.0, 2, 0.05)], [(260.0, 0, 1e6)]]
    assert {cell: cell_files(store, cell) for cell in finished} == before  # not written again
    with open_store(store) as resumed, open_store(stores["grouped"]) as whole:
        assert_same_data(resumed, whole)  # a 2-member ensemble gives what the 6-member one gave


# ---- a unit that raises ------------------------------------------------------------------


def tasks_and_store(tmp_path: Path) -> tuple[list[Any], str]:
    spec = mfdsl.parse(
        GROUPED.replace("width = [8, 260]", "width = [8]").replace("lr = [0.05, 1e6]", "lr = [0.05]")
    )
    layout, tasks = plan_tasks(spec, mfdsl.check_all(spec), [mfdsl.get_backend("torch")])
    store = str(tmp_path / "unit.zarr")
    create_store(
        store,
        sweep=layout.sweep,
        steps=layout.steps,
        time=layout.time,
        variables=layout.variables,
        extra_coords=layout.extra,
    )
    return tasks, store


def failing_seed(seed: int) -> Callable[..., list[Any]]:
    """``run_group`` that raises when the unit holds ``seed``."""
    original = TorchBackend.run_group

    def run_group(self: Backend, plans: Sequence[RunPlan], **kw: Any) -> list[Any]:
        if any(p.seed == seed for p in plans):
            raise RuntimeError(f"seed {seed} cannot train")
        return original(self, plans, **kw)  # type: ignore[arg-type]

    return run_group


def test_a_failing_unit_fails_only_its_failing_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks, store = tasks_and_store(tmp_path)
    assert len(tasks) == 3
    monkeypatch.setattr(TorchBackend, "run_group", failing_seed(1))
    layer_coord = [1, 2, 3]
    outcomes = execute_group(tasks, store, layer_coord, {"output": (3,), "particles": (5, 4)})
    assert [(key, status) for key, status, _ in outcomes] == [
        (tasks[0].key, "done"),
        (tasks[1].key, "failed"),
        (tasks[2].key, "done"),
    ]
    assert "seed 1 cannot train" in outcomes[1][2]
    assert read_status(store).ravel().tolist() == [Status.DONE, Status.FAILED, Status.DONE]
    # the points retried alone hold their own results
    monkeypatch.undo()
    alone = mfdsl.get_backend("torch").run(tasks[0].plan)
    with open_store(Path(store)) as ds:
        np.testing.assert_array_equal(
            ds["test_loss"].isel(width=0, seed=0, lr=0).values, alone["records"]["test_loss"]
        )
        assert "Traceback" in str(ds["message"].isel(width=0, seed=1, lr=0).values)
