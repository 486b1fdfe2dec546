"""What a sweep will take, before it starts: memory per run and for the workers
together, the number of runs, the store's size on disk — checked against this machine.

``mfdsl check`` and ``mfdsl run`` (before anything is created) call :func:`estimate`
then :func:`check_machine`: a sweep that needs more memory than the machine has is a
``SpecError`` naming the largest part and the spec value that drives it, unless
``--force``.  The figures come from the spec alone, by arithmetic, whatever its size
(no array is allocated, no backend imported): ``width = 1e9`` or ``steps = 1e12`` are
refused in a millisecond, not found out by every worker at its first allocation.

The model, per run (what the backends allocate; within a factor ~2 of the measured
peak resident memory, ``tests/test_hostile.py`` checks it):

* **finite networks** (torch, and any other backend without ``limit``): the parameters
  ``P = d·n + (L-1)·n² + n·K`` (+ biases) in the run's dtype, the float64 initial draw,
  the initial copy ``weight_change`` compares with; the optimizer's state (momentum: a
  velocity; Langevin: a noise buffer); the activations of a step (``B × n`` per layer,
  six buffers); the data: a chunk of minibatches (at most ``2²³`` input entries, or one
  batch), the online generator's blocks (2 × 1024 examples) or the finite training set
  (float64), the test set (float64, and a copy unless the run is float64 on the CPU);
  the evaluation blocks (``2¹⁸`` entries per layer); the recorded trajectory (float64,
  in the worker and again in the driver).  The seeds of a width train as one ensemble
  (``mfdsl_torch``): up to 64 members and 8 MiB of weights, each member with its own
  data.
* **the mean-field limit** (jax, and any ``limit`` backend): the same with ``N``
  particles (the ``particles`` option) in each hidden layer that the solver's exact
  reductions do not collapse to one, the expectation of a step over ``data_samples``
  examples (online) or the whole training set (finite; three buffers of activations),
  at most ``2²²`` input entries per data chunk and ``2²²`` evaluation entries.
* **image data**: the dataset's raw files (uint8, once per worker process) and the
  standardised float64 subsets (twice: the standardisation's temporaries).
* **each worker process**: the Python runtime and the backend's library (~0.3 GiB);
  **the driver**: its runtime, the run plans (every run's recorded steps, twice while
  the store's step axis is formed), the compiler's log-spaced record-step grid and the
  time coordinate.

The workers together are the driver and the largest units of work that run at once.

The store on disk is bounded as ``mfdsl run`` bounds it before writing
(``mfdsl.execution.runner._check_space``): uncompressed float64 values, every file at least a
4 kB block.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mfdsl.core.errors import Span, SpecError, SpecWarning
from mfdsl.core.resources import MEMORY_ENV, format_bytes, machine_memory
from mfdsl.language import ir as ir
from mfdsl.plan.layout import LAYERED

#: ``mfdsl run`` asks before a sweep of more runs than this (``--yes`` answers for it)
CONFIRM_RUNS = 1000

# what a worker process holds before its first run: Python, numpy, the backend's library
_RUNTIME = {"torch": 300 << 20, "jax": 300 << 20}
_RUNTIME_OTHER = 300 << 20
# the driver: Python, numpy, zarr, the progress display
_DRIVER = 150 << 20
# a sweep point and its run plan in the driver, beside the recorded steps
_PER_POINT = 6 << 10
# torch: data chunks hold at most this many input entries (mfdsl_torch._engine); test
# evaluation works in blocks of this many entries per layer
_TORCH_CHUNK, _TORCH_EVAL = 1 << 23, 1 << 18
# torch ensembles: at most this many members and bytes of weights (mfdsl_torch._ensemble)
_ENSEMBLE_MEMBERS, _ENSEMBLE_BYTES = 64, 1 << 23
# jax: data chunks and evaluation blocks (mfdsl_jax._solver)
_JAX_CHUNK, _JAX_EVAL = 1 << 22, 1 << 22
# the generated datasets' blocks of examples (mfdsl.data.make.BLOCK), two kept
_BLOCK = 1024
# the store: a file is at least a block; a chunk at most this many bytes
_DISK_BLOCK, _DISK_CHUNK = 4096, 8 << 20
# float64 values recorded per record step
_F64 = 8


@dataclass(frozen=True)
class Part:
    """One consumer of memory: what it is (with its shape), its size in bytes, and
    the spec value that drives it (where an error points)."""

    what: str
    nbytes: int
    where: Span | None = None


@dataclass(frozen=True)
class Unit:
    """One unit of work a worker runs at a time: a run, or an ensemble of ``members``
    runs (torch trains the seeds of a width together), and what it holds."""

    backend: str
    coords: Mapping[str, Any]
    members: int
    #: per member (each member holds its own); ``shared`` once per unit
    parts: tuple[Part, ...]
    shared: tuple[Part, ...] = ()
    #: one member's weights in bytes (how many members an ensemble takes)
    weights: int = 0

    @property
    def run_bytes(self) -> int:
        """One run's share (its parts, the shared ones, the worker's runtime)."""
        return sum(p.nbytes for p in (*self.parts, *self.shared))

    @property
    def nbytes(self) -> int:
        return self.members * sum(p.nbytes for p in self.parts) + sum(p.nbytes for p in self.shared)

    def largest(self) -> Part:
        """The largest part of the unit (a per-member part counted for all members)."""
        scaled = [Part(p.what, p.nbytes * self.members, p.where) for p in self.parts]
        return max([*scaled, *self.shared], key=lambda p: p.nbytes)


@dataclass(frozen=True)
class Estimate:
    """What a sweep takes: its runs, the memory of its largest unit of work, of the
    workers together and of the driver, the store on disk, and this machine's memory."""

    runs: int
    runs_by_backend: Mapping[str, int]
    records: int  # the most recorded steps of a run
    largest: Unit | None  # the unit of work that needs the most memory
    workers: int  # units running at once
    together: int  # bytes: the driver and the `workers` largest units
    driver: tuple[Part, ...]
    store: int  # bytes on disk, an upper bound
    memory: int | None  # this machine's, in bytes (None: unknown)
    units: tuple[Unit, ...] = field(default=(), repr=False)  # the largest ones, `workers` of them
    groups: tuple[_Group, ...] = field(default=(), repr=False)  # runs sized alike, for other worker counts


# ---- the machine ---------------------------------------------------------------------------


# ---- the sweep ------------------------------------------------------------------------------


def estimate(
    spec: ir.Spec, points: Sequence[Any], backends: Sequence[str], *, workers: int | None = None
) -> Estimate:
    """The resources a sweep of ``points`` (:func:`mfdsl.language.expand.expand`) on
    ``backends`` takes, with ``workers`` worker processes (default: the usable cores;
    0: none on this machine, a remote cluster's).  Arithmetic only: instant for any
    spec whose points are expanded."""
    from mfdsl.core.plugins import available_backends

    installed = available_backends()
    names = [b for b in dict.fromkeys(backends) if b in installed]
    runs_by_backend: dict[str, int] = {}
    groups: list[_Group] = []
    records = 0
    driver_records = 0
    grid = 0
    stored: dict[str, int] = {}  # the store's variables: values a record step
    schedules: dict[tuple[str, int, int], int] = {}  # record steps: their number
    lrs: set[float] = set()
    outputs = 1
    for name in names:
        limit = bool(installed[name].limit)
        mine = [p for p in points if not limit or p.index[0] == 0]
        runs_by_backend[name] = len(mine)
        first: dict[tuple[Any, ...], Unit] = {}
        counts: dict[tuple[Any, ...], int] = {}
        for point in mine:
            facts = _facts(point, name, limit)
            records = max(records, facts.records)
            driver_records += facts.records
            grid = max(grid, facts.grid)
            counts[facts.key] = counts.get(facts.key, 0) + 1
            schedules[facts.schedule] = facts.records
            lrs.add(float(point.spec.train.optimizer.lr))
            if facts.key not in first:
                if isinstance(point.spec.network, ir.ConvNetwork):
                    first[facts.key] = _cnn_unit(point, facts, name, limit)
                else:
                    first[facts.key] = (_limit_unit if limit else _finite_unit)(point, facts, name)
                outputs = max(outputs, facts.outputs)
                for variable, values in facts.stored.items():
                    stored[variable] = max(stored.get(variable, 0), values)
        for key, count in counts.items():
            groups.append(_Group(unit=first[key], runs=count, backend_runs=len(mine)))
    runs = sum(runs_by_backend.values())
    store = 0
    steps = min(sum(schedules.values()), 1 + max(s for _, _, s in schedules)) if schedules else 0
    # the time coordinate: lr × step, over the sweep's points when the learning rate varies
    time = 8 * steps * (len(points) if len(lrs) > 1 else 1)
    if groups:
        # every cell has the union of the runs' record steps, and every variable's axes
        store = runs * run_store_bytes(steps, list(stored.values())) + time
        extra = {
            "probe": "output" in stored,
            "unit": "output" in stored and outputs > 1,
            "layer": any(n in stored for n in LAYERED),
            "particle": "particles" in stored,
            "component": "particles" in stored,
        }
        arrays = len(stored) + len(spec.sweep.variables) + sum(extra.values()) + 4
        store += 2 * _DISK_BLOCK * arrays  # the skeleton: coordinates, status, message, time
    driver = (
        Part("the driver process (Python, numpy, zarr)", _DRIVER),
        Part(
            f"run plans: {_n(runs)} runs, {_n(driver_records)} recorded steps in all (int64, twice)",
            2 * 8 * driver_records + _PER_POINT * runs,
            _records_where(spec),
        ),
        Part(
            "the record-step grid of one run (float64, three temporaries)", 3 * 8 * grid, _records_where(spec)
        ),
        Part(
            f"the time coordinate: {_n(steps)} record steps"
            + (f" × {_n(len(points))} points (the learning rate varies)" if len(lrs) > 1 else "")
            + " (float64, twice)",
            2 * time,
            _records_where(spec),
        ),
    )
    cores = workers if workers is not None else _cores()
    concurrent, top, largest = _at_once(groups, cores)
    return Estimate(
        runs=runs,
        runs_by_backend=runs_by_backend,
        records=records,
        largest=largest,
        workers=concurrent,
        together=sum(p.nbytes for p in driver) + sum(u.nbytes for u in top),
        driver=driver,
        store=store,
        memory=machine_memory(),
        units=tuple(top),
        groups=tuple(groups),
    )


@dataclass(frozen=True)
class _Group:
    """Runs of one backend sized alike (the seeds of a width, say): one run's unit
    (``members = 1``), how many such runs, and the backend's runs in all."""

    unit: Unit
    runs: int
    backend_runs: int


def _at_once(groups: Sequence[_Group], cores: int) -> tuple[int, list[Unit], Unit | None]:
    """With ``cores`` workers: how many units run at once, the largest units (as
    many), and the largest of all.  The torch backend trains the runs of a group as
    ensembles, as large as fit its limits and a worker's share of the sweep."""
    units: list[Unit] = []
    for group in groups:
        unit, members = group.unit, 1
        if unit.backend == "torch":
            members = max(1, min(_ENSEMBLE_MEMBERS, _ENSEMBLE_BYTES // max(1, unit.weights), group.runs))
            if cores > 1:
                members = min(members, max(1, group.backend_runs // cores))
        grouped = Unit(unit.backend, unit.coords, members, unit.parts, unit.shared, unit.weights)
        units.extend([grouped] * min(-(-group.runs // members), max(1, cores)))
    concurrent = max(0, min(cores, len(units)))
    top = heapq.nlargest(concurrent, units, key=lambda u: u.nbytes)
    largest = max(units, key=lambda u: u.nbytes) if units else None
    return concurrent, top, largest


def _fitting_workers(est: Estimate, memory: int) -> int | None:
    """The most workers (fewer than the estimate's) whose units fit in ``memory``."""
    driver = sum(p.nbytes for p in est.driver)
    for cores in range(est.workers - 1, 0, -1):
        _, top, _ = _at_once(est.groups, cores)
        if driver + sum(u.nbytes for u in top) <= memory:
            return cores
    return None


def run_store_bytes(records: int, values: Sequence[int]) -> int:
    """An upper bound of one run's bytes on disk in a store: ``records`` record steps
    of each variable holding ``values[i]`` float64 values a step, uncompressed, every
    file (chunk) at least a 4 kB block, plus its status and message.  The bound
    ``mfdsl run`` checks the disk against (``mfdsl.execution.runner._check_space``)."""
    disk = 2 * _DISK_BLOCK  # status, message
    for n in values:
        nbytes = _F64 * records * n
        chunks = max(1, -(-nbytes // _DISK_CHUNK))
        disk += max(-(-nbytes // _DISK_BLOCK) * _DISK_BLOCK, chunks * _DISK_BLOCK)
    return disk


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Facts:
    """The numbers of one sweep point that size its runs."""

    key: tuple[Any, ...]
    dim: int
    outputs: int
    hidden: int
    batch: int
    steps: int
    n_train: int | None
    n_test: int
    records: int
    grid: int  # entries of the record-step grid the compiler builds
    values: int  # float64 values recorded per record step
    stored: Mapping[str, int]  # float64 values a record step of each variable in the store
    schedule: tuple[str, int, int]  # the record steps: (every or log, count, steps)
    options: Mapping[str, Any]
    image: tuple[int, int] | None  # raw image dataset: (examples, dim)


def _facts(point: Any, backend: str, limit: bool) -> _Facts:
    from mfdsl.plan import compile as cp

    spec: ir.Spec = point.spec
    data, net, train = spec.data, spec.network, spec.train
    dim = int(ir.data_dim(data))
    outputs = cp.outputs(spec)
    n_train, n_test = _data_sizes(data)
    if train.steps is not None:
        steps = int(train.steps)
    else:
        assert train.epochs is not None and n_train is not None
        steps = cp.steps_for_epochs(int(train.epochs), n_train, int(train.batch))
    record = spec.record
    mode, count = (record.mode, int(record.count)) if record is not None else ("log", 50)
    if mode == "every":
        records = steps // count + 1 + (1 if steps % count else 0)
        grid = 0
    else:
        records = min(count, steps) + 1
        grid = count  # np.geomspace(1, steps, count) (mfdsl.plan.compile.record_steps)
    observables = record.observables if record is not None else cp.default_observables(spec)
    depth = int(net.hidden)
    shapes: list[int] = []  # values a record step of each observable, in memory
    stored: dict[str, int] = {}  # and in the store, whose layer axis is every layer's
    for obs in observables:
        if obs.name in ("train_loss", "test_loss", "test_accuracy"):
            shapes.append(1)
        elif obs.name == "output":
            probes = int(obs.probes) if obs.probes is not None else min(16, n_test)
            shapes.append(probes * outputs)
        elif obs.name in LAYERED:
            layers = (
                len(obs.layer) if obs.layer is not None else len(ir.OBSERVABLE_KINDS[obs.name].layers(depth))
            )
            shapes.append(layers)
            stored[obs.name] = depth + 1
        elif obs.name == "particles":
            shapes.append(4 * (int(obs.sample) if obs.sample is not None else cp.DEFAULT_SAMPLE))
        stored.setdefault(obs.name, shapes[-1])
    options = cp.backend_options(spec, backend)
    image = None
    if isinstance(data, ir.ImageData):
        full = ir.IMAGE_SIZES[data.kind]
        image = (full[0] + full[1], dim)
    width = math.inf if limit else point.width
    key = (
        width,
        dim,
        outputs,
        depth,
        int(train.batch),
        steps,
        n_train,
        n_test,
        records,
        sum(shapes),
        _optimizer_kind(spec),
        tuple(sorted((k, repr(v)) for k, v in options.items())),
        _teacher_key(data),
        bool(net.bias),
        tuple(sorted(o.name for o in observables)),
    )
    return _Facts(
        key=key,
        dim=dim,
        outputs=outputs,
        hidden=depth,
        batch=int(train.batch),
        steps=steps,
        n_train=n_train,
        n_test=n_test,
        records=records,
        grid=grid,
        values=sum(shapes),
        stored=stored,
        schedule=(mode, count, steps),
        options=options,
        image=image,
    )


def _data_sizes(data: ir.Data) -> tuple[int | None, int]:
    """``(n_train, n_test)``: ``None`` for online data; image data's ``all`` counted
    from its label files when they are there, else the whole split (an upper bound)."""
    n_train = None if data.train == "online" else data.train
    n_test = data.test
    if isinstance(data, ir.ImageData) and "all" in (n_train, n_test):
        from mfdsl.core.errors import DataError
        from mfdsl.data.make import image_sizes

        try:
            n_train, n_test = image_sizes(data)
        except DataError:
            full = ir.IMAGE_SIZES[data.kind]
            n_train = full[0] if n_train == "all" else n_train
            n_test = full[1] if n_test == "all" else n_test
    return (None if n_train is None else int(n_train)), int(n_test)


def _optimizer_kind(spec: ir.Spec) -> str:
    opt = spec.train.optimizer
    if isinstance(opt, ir.Langevin):
        return "langevin"
    if isinstance(opt, ir.Adam):
        return "adam"
    return "momentum" if float(opt.momentum) != 0.0 else "sgd"


def _teacher_key(data: ir.Data) -> tuple[int, int]:
    if isinstance(data, ir.Teacher):
        return int(data.teacher.hidden), int(data.teacher.width)
    return (0, 0)


def _records_where(spec: ir.Spec) -> Span | None:
    if spec.record is not None:
        return spec.record.where("count")
    return spec.train.where("steps" if spec.train.steps is not None else "epochs")


def _width_where(spec: ir.Spec, width: int) -> Span | None:
    for var in spec.sweep.variables:
        if var.name == "width":
            for i, value in enumerate(var.values):
                if value == width:
                    return var.spans.get(f"values[{i}]") or var.where("values")
            return var.where("values")
    return spec.sweep.span


def _limit_widths(spec: ir.Spec, particles: int, reduce: str) -> tuple[int, ...]:
    """The particle system's widths ``(d, n_1 … n_L, K)`` as the jax backend builds it
    (``mfdsl_jax._solver.build_system``): ``particles`` per hidden layer, except the
    layers its exact reductions collapse to one particle (R1 makes the middle layers'
    laws constant; a layer between two constant laws collapses) — not with
    ``reduce = none`` nor Langevin noise."""
    from mfdsl.plan.compile import limit_layer_plans

    plans = limit_layer_plans(spec)
    depth = len(plans) - 1
    hidden = [particles] * depth
    opt = spec.train.optimizer
    noisy = isinstance(opt, ir.Langevin) and float(opt.temperature) > 0
    if reduce != "none" and not noisy:
        const = [
            not plan.init.varies and (plan.init.std == 0.0 or 2 <= plan.index <= depth) for plan in plans
        ]
        for ell in range(1, depth + 1):
            if const[ell - 1] and const[ell]:
                hidden[ell - 1] = 1
    return (plans[0].fan_in, *hidden, plans[-1].fan_out)


def _dominant(*factors: tuple[int, Span | None]) -> Span | None:
    """The place of the largest of several factors of a size (the one to make smaller)."""
    placed = [f for f in factors if f[1] is not None]
    return max(placed, key=lambda f: f[0])[1] if placed else None


def _itemsize(options: Mapping[str, Any], default: str) -> int:
    return 4 if str(options.get("dtype", default)) == "float32" else 8


def _data_parts(spec: ir.Spec, facts: _Facts, item: int, rows: int, chunk_cap: int) -> list[Part]:
    """The data a run holds: a chunk of training inputs, the generator's blocks or
    the training set, the test set, a teacher network.  ``item``: the bytes of the
    device copy beside the float64 arrays (0: the float64 array is used as it is)."""
    data, train = spec.data, spec.train
    d = facts.dim
    dtypes = f"float64 and a float{8 * item} copy" if item else "float64"
    parts: list[Part] = []
    chunk = max(rows * d, min(chunk_cap, 1024 * rows * d))
    parts.append(
        Part(
            f"training inputs per data chunk: {_n(chunk // max(1, d))} examples × {_n(d)} inputs ({dtypes})",
            chunk * (8 + item) + chunk // max(1, d) * 16,
            train.where("batch") if rows == facts.batch else data.where("dim"),
        )
    )
    if facts.n_train is None:
        parts.append(
            Part(
                f"the data generator's blocks: 2 × {_BLOCK} examples × {_n(d)} inputs (float64)",
                2 * _BLOCK * (d + 1) * 8,
                data.where("dim"),
            )
        )
    if facts.n_train is not None:
        copies = 2 if facts.image is not None else 1
        parts.append(
            Part(
                f"the training set: {_n(facts.n_train)} examples × {_n(d)} inputs (float64"
                + (", twice while standardised)" if copies == 2 else ")"),
                copies * facts.n_train * (d + 1) * 8,
                data.where("train"),
            )
        )
    copies = 2 if facts.image is not None else 1
    parts.append(
        Part(
            f"the test set: {_n(facts.n_test)} examples × {_n(d)} inputs ({dtypes})",
            facts.n_test * (d + 1) * (8 * copies + item),
            data.where("test"),
        )
    )
    if isinstance(data, ir.Teacher):
        tw, th = int(data.teacher.width), int(data.teacher.hidden)
        params = d * tw + (th - 1) * tw * tw + tw
        parts.append(
            Part(
                f"the teacher network: {_n(params)} weights and a block's activations (float64)",
                8 * (params + _BLOCK * tw * 2),
                data.where("teacher"),
            )
        )
    return parts


def _shared_parts(spec: ir.Spec, facts: _Facts, backend: str) -> list[Part]:
    """What a worker holds once, whatever its runs: the runtime (Python, numpy, the
    backend's library) and, for image data, the files' pixels."""
    shared = [Part(f"the worker's runtime (Python, numpy, {backend})", _RUNTIME.get(backend, _RUNTIME_OTHER))]
    if facts.image is not None:
        count, dim = facts.image
        shared.append(
            Part(
                f"the {spec.data.kind} files: {_n(count)} images × {_n(dim)} pixels (uint8)",
                count * dim,
                spec.data.span,
            )
        )
    return shared


def _trajectory(spec: ir.Spec, facts: _Facts) -> Part:
    return Part(
        f"the recorded trajectory: {_n(facts.records)} records × {_n(facts.values)} values "
        "(float64, in the worker and in the driver)",
        2 * _F64 * facts.records * facts.values,
        _records_where(spec),
    )


def _finite_unit(point: Any, facts: _Facts, backend: str) -> Unit:
    spec: ir.Spec = point.spec
    n, d, k, depth, b = point.width, facts.dim, facts.outputs, facts.hidden, facts.batch
    item = _itemsize(facts.options, "float64")
    params = d * n + (depth - 1) * n * n + n * k + ((depth * n + k) if spec.network.bias else 0)
    records = spec.record.observables if spec.record is not None else ()
    change = any(o.name == "weight_change" for o in records)
    copies = item * (2 if change else 1) + 8  # training copy (+ initial copy), float64 draw
    dim_at, width_at = spec.data.where("dim"), _width_where(spec, n)
    where = _dominant((d * n, dim_at), (n * n * (depth - 1) + n * k, width_at)) if d > n else width_at
    parts = [
        Part(
            f"the parameters: {_n(params)} (width {_n(n)}, {depth} hidden layer{'s' * (depth != 1)}, "
            f"dim {_n(d)}) in float{8 * item}, with the float64 initial draw"
            + (" and the initial copy weight_change compares with" if change else ""),
            params * copies,
            where,
        )
    ]
    kind = _optimizer_kind(spec)
    if kind != "sgd":
        what = {
            "momentum": "the optimizer state (momentum: a velocity per parameter)",
            "adam": "the optimizer state (Adam: two running means, the gradient and a scratch per parameter)",
        }.get(kind, "Langevin noise")
        copies = 4 if kind == "adam" else 1
        parts.append(Part(f"{what}: {_n(params)} parameters", copies * params * item, where))
    units = depth * n + k
    parts.append(
        Part(
            f"the activations of a step: batch {_n(b)} × {_n(units)} units (six buffers)",
            b * (6 * units + d) * item,
            _dominant((b, spec.train.where("batch")), (6 * units, width_at), (d, dim_at)),
        )
    )
    # torch uses a float64 array on the CPU as it is; another dtype or device is a copy
    cpu64 = item == 8 and str(facts.options.get("device", "cpu")) == "cpu"
    parts += _data_parts(spec, facts, 0 if cpu64 else item, b, _TORCH_CHUNK)
    widest = max(n, k)
    parts.append(
        Part(
            "the test evaluation's blocks",
            min(facts.n_test, max(1, _TORCH_EVAL // widest)) * widest * (depth + 1) * item,
            spec.data.where("test"),
        )
    )
    parts.append(_trajectory(spec, facts))
    shared = _shared_parts(spec, facts, backend)
    return Unit(backend, dict(point.coords), 1, tuple(parts), tuple(shared), params * item)


def _limit_unit(point: Any, facts: _Facts, backend: str) -> Unit:
    spec: ir.Spec = point.spec
    m = int(facts.options.get("particles", 4096))
    samples = int(facts.options.get("data_samples", 1024))
    d, k, depth = facts.dim, facts.outputs, facts.hidden
    item = _itemsize(facts.options, "float32")
    block = spec.options_for(backend)
    given = dict(block.values) if block is not None else {}
    m_at = block.where("particles") if block is not None and "particles" in given else None
    samples_at = block.where("data_samples") if block is not None and "data_samples" in given else None
    dim_at, hidden_at = spec.data.where("dim"), spec.network.where("hidden")
    widths = _limit_widths(spec, m, str(facts.options.get("reduce", "auto")))
    hidden = widths[1:-1]
    pairs = [a * b for a, b in itertools.pairwise(widths)]
    params = sum(pairs) + ((sum(hidden) + k) if spec.network.bias else 0)
    kind = _optimizer_kind(spec)
    state = 3 + (1 if kind == "momentum" else 0) + (1 if kind == "langevin" else 0)
    held = ", ".join(_n(n) for n in hidden)
    parts = [
        Part(
            f"the particles: {_n(params)} weights (particles per hidden layer {held}; dim {_n(d)}) in "
            f"float{8 * item}, their initial copy, gradient and velocity, with the float64 initial draw",
            params * (state * item + 8),
            _dominant((pairs[0], dim_at), (sum(pairs[1:-1]), m_at or hidden_at), (pairs[-1], m_at)),
        )
    ]
    rows = facts.n_train if facts.n_train is not None else samples
    rows_at = spec.data.where("train") if facts.n_train is not None else samples_at
    units = sum(hidden) + k
    parts.append(
        Part(
            f"the activations of a step: {_n(rows)} examples × {_n(units)} units (three buffers)",
            rows * (3 * units + d) * item,
            _dominant((rows, rows_at), (3 * units, m_at or hidden_at), (d, dim_at)),
        )
    )
    parts += _data_parts(spec, facts, item, samples, _JAX_CHUNK)
    widest = max(m, k)
    parts.append(
        Part(
            "the test evaluation's blocks",
            min(facts.n_test, max(1, _JAX_EVAL // widest)) * widest * (depth + 1) * item,
            spec.data.where("test"),
        )
    )
    parts.append(_trajectory(spec, facts))
    shared = _shared_parts(spec, facts, backend)
    return Unit(backend, {**point.coords, "width": math.inf}, 1, tuple(parts), tuple(shared))


def _cnn_unit(point: Any, facts: _Facts, backend: str, limit: bool) -> Unit:
    """A ``network cnn`` run: its weight matrices (``mfdsl.plan.compile.cnn_fans``) and its
    feature maps — per example and conv layer, the pre-activation, the activation and
    its pooled copy (``n h w`` each) and the unfolded input (``C_in k² h w``), kept
    for the backward pass; with ``n`` the width, or the particles of a limit (whose
    ``E_Z`` batch is the training set or ``data_samples``).  Every member of a torch
    ensemble holds its own."""
    from mfdsl.plan.compile import cnn_fans, conv_plan

    spec: ir.Spec = point.spec
    conv = conv_plan(spec)
    assert conv is not None
    k, depth = facts.outputs, facts.hidden
    if limit:
        n = int(facts.options.get("particles", 4096))
        item = _itemsize(facts.options, "float32")
        rows = facts.n_train if facts.n_train is not None else int(facts.options.get("data_samples", 1024))
        rows_at = spec.data.where("train")
    else:
        n = int(point.width)
        item = _itemsize(facts.options, "float64")
        rows, rows_at = facts.batch, spec.train.where("batch")
    fans = cnn_fans(conv, depth, n, k)
    params = sum(a * b for a, b in fans) + ((depth * n + k) if spec.network.bias else 0)
    change = spec.record is not None and any(o.name == "weight_change" for o in spec.record.observables)
    copies = item * (3 + (1 if change else 0)) + 8  # weights, gradient, velocity (+ initial), f64 draw
    block = spec.options_for(backend)
    width_at = block.where("particles") if limit and block is not None else None
    width_at = width_at or _width_where(spec, n)
    per_example = 0
    c_in = conv.channels
    for layer, (hc, wc, _, _) in zip(conv.layers, conv.sizes(), strict=True):
        per_example += 3 * n * hc * wc + c_in * layer.kernel**2 * hc * wc
        c_in = n
    per_example += 3 * (n * (depth - len(conv.layers)) + k) + conv.head_features(n)
    what = f"{_n(n)} particles a layer" if limit else f"width {_n(n)}"
    parts = [
        Part(
            f"the cnn's weights: {_n(params)} ({what}, {len(conv.layers)} conv layers) in float{8 * item}, "
            "with gradient, velocity and the float64 initial draw",
            params * copies,
            width_at,
        ),
        Part(
            f"the feature maps of a step: {_n(rows)} examples × {_n(per_example)} numbers "
            "(conv pre-activations, activations, pooled maps and unfolded inputs)",
            rows * per_example * item,
            _dominant((rows, rows_at), (per_example, width_at)),
        ),
        Part(
            "the test evaluation's blocks",
            min(facts.n_test, 512) * per_example * item,
            spec.data.where("test"),
        ),
        _trajectory(spec, facts),
    ]
    parts += _data_parts(spec, facts, item, rows, _TORCH_CHUNK)
    shared = _shared_parts(spec, facts, backend)
    coords = {**point.coords, "width": math.inf} if limit else dict(point.coords)
    # torch trains up to 16 seeds of a cnn together (mfdsl_torch._cnn_groups): "weights"
    # of at least 1/16 of the ensemble limit cap the members at 16
    return Unit(
        backend, coords, 1, tuple(parts), tuple(shared), max(params * item, -(-_ENSEMBLE_BYTES // 16))
    )


# ---- against the machine -------------------------------------------------------------------


def check_machine(est: Estimate, spec: ir.Spec, *, force: bool = False) -> list[SpecWarning]:
    """Refuse a sweep that needs more memory than this machine has (a ``SpecError``
    at the spec value behind the largest part, naming it and its size), or with
    ``force`` return that as a warning.  Nothing when the memory is unknown."""
    memory = est.memory
    if memory is None or est.together <= memory:
        return []
    error = _over(est, spec, memory)
    if not force:
        raise error.located(spec.path, spec.source)
    warning = SpecWarning(f"{error.message}; running anyway (--force)", error.span)
    warning.located(spec.path, spec.source)
    return [warning]


def _over(est: Estimate, spec: ir.Spec, memory: int) -> SpecError:
    unit = est.largest
    driver = sum(p.nbytes for p in est.driver)
    planning = max(est.driver[1:], key=lambda p: p.nbytes)
    machine = f"this machine's {format_bytes(memory)}"
    force = "or pass --force to run anyway"
    if unit is None or planning.nbytes >= unit.nbytes:
        return SpecError(
            f"planning the sweep needs about {format_bytes(driver)} of memory, more than {machine}; "
            f"the largest part is {planning.what}, {format_bytes(planning.nbytes)}",
            planning.where or spec.sweep.span,
            hint=f"record fewer steps (a larger 'record every', a smaller 'record log'), {force}",
        )
    part = unit.largest()
    coords = [(k, v) for k, v in unit.coords.items() if unit.members == 1 or k != "seed"]
    at = " at " + ", ".join(f"{k} = {_shown(v)}" for k, v in coords) if est.runs > 1 else ""
    what = f"a run{at}"
    if unit.members > 1:
        what = f"an ensemble of {unit.members} runs{at} (torch trains the seeds of a width together)"
    if driver + unit.nbytes > memory:
        return SpecError(
            f"{what} needs about {format_bytes(unit.nbytes)} of memory, more than {machine}; "
            f"the largest part is {part.what}, {format_bytes(part.nbytes)}",
            part.where or spec.sweep.span,
            hint=f"make the value this points at smaller, {force}"
            if part.where is not None
            else f"this machine has less memory than one worker needs ({MEMORY_ENV} sets what mfdsl assumes), "
            f"{force}",
        )
    fit = _fitting_workers(est, memory) or 1
    return SpecError(
        f"{est.workers} workers together need about {format_bytes(est.together)} of memory, more than "
        f"{machine}; {what} needs {format_bytes(unit.nbytes)}, and its largest part is {part.what}, "
        f"{format_bytes(part.nbytes)}",
        part.where or spec.sweep.span,
        hint=f"run with fewer workers ('mfdsl run --workers {fit}'), {force}",
    )


def _shown(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return _n(value)
    return str(value)


def _n(count: int) -> str:
    """A count with thousands separators; beyond 10¹⁵ as a power of ten."""
    return f"{count:,}" if abs(count) < 10**15 else f"~10^{len(str(abs(count))) - 1}"


def check_disk(est: Estimate, location: str) -> SpecWarning | None:
    """A warning when the store would not fit where it would be written (the free
    space of the file system holding ``location``; ``mfdsl run`` stops on it)."""
    from mfdsl.core import location as loc

    free = loc.free_bytes(location)
    if free is None or est.store <= free:
        return None
    return SpecWarning(
        f"the store needs up to {format_bytes(est.store)} on disk (uncompressed), and "
        f"{format_bytes(free)} are free where 'mfdsl run' writes it by default ({location}); "
        "it stops on this unless -o points elsewhere"
    )


def summary(est: Estimate) -> list[tuple[str, str]]:
    """Rows for ``mfdsl check``'s table: memory and store size."""
    rows = []
    unit = est.largest
    if unit is not None:
        text = f"≈ {format_bytes(unit.run_bytes)} a run"
        if unit.members > 1:
            text += f", {format_bytes(unit.nbytes)} an ensemble of {unit.members}"
        text += f", {format_bytes(est.together)} with {est.workers} worker{'s' * (est.workers != 1)}"
        if est.memory is not None:
            text += f" (this machine: {format_bytes(est.memory)})"
        rows.append(("memory", text))
    rows.append(("store", f"≤ {format_bytes(est.store)} on disk ({_n(est.records)} records a run)"))
    return rows


#: the arithmetic a worker is assumed to do per second for :func:`rough_seconds`
#: (multiply-adds of small dense layers on one core, float64 or float32)
ROUGH_FLOPS = 2e9
#: the fixed cost of a training step assumed by :func:`rough_seconds` (seconds)
ROUGH_STEP_S = 5e-6
#: the fixed cost of a run assumed by :func:`rough_seconds` (seconds): its data, test
#: evaluations and records, writing its cell
ROUGH_RUN_S = 0.3
#: at most this many points are planned for :func:`rough_seconds`
_ROUGH_SAMPLE = 2000


def rough_seconds(points: Sequence[Any], backends: Sequence[str], workers: int) -> float | None:
    """A rough wall time of the sweep on ``workers`` workers: per run 6 × steps × batch
    × weights floating-point operations (forward and backward) at :data:`ROUGH_FLOPS`
    a second, plus :data:`ROUGH_STEP_S` a step and :data:`ROUGH_RUN_S`; a limit backend's run counted as the
    widest network's.  An order of magnitude, for the question before a large sweep
    (``mfdsl run`` measures the real one as it goes); ``None`` if a point cannot be
    planned here (epochs over data files that are missing)."""
    from mfdsl.core.plugins import available_backends
    from mfdsl.plan.compile import compile_point

    installed = available_backends()
    finite = [b for b in dict.fromkeys(backends) if b in installed and not installed[b].limit]
    limits = [b for b in dict.fromkeys(backends) if b in installed and installed[b].limit]
    # a sweep of many points is judged by an even sample of them: planning each of a
    # million points would take a minute, for an order of magnitude
    stride = max(1, math.ceil(len(points) / _ROUGH_SAMPLE))
    sample = points[::stride]
    total, widest = 0.0, 0.0
    try:
        for point in sample:
            plan = compile_point(point.spec, dict(point.coords), (finite or limits or ["torch"])[0])
            weights = sum(layer.fan_in * layer.fan_out for layer in plan.layers)
            seconds = ROUGH_RUN_S + plan.steps * (6.0 * plan.batch * weights / ROUGH_FLOPS + ROUGH_STEP_S)
            total += seconds * len(finite)
            widest = max(widest, seconds)
    except Exception:  # noqa: BLE001 - an estimate is never worth an error of its own
        return None
    total *= len(points) / max(1, len(sample))
    if limits and points:
        per_limit = len(points) // max(1, len(points[0].spec.sweep["width"]))
        total += widest * per_limit * len(limits)
    return total / max(1, workers)


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``3.5 h``, ``2.1 days``: an order of magnitude in words."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def sweep_size(spec: ir.Spec) -> str:
    """The sweep's size as a product: ``width: 961 × seed: 2``."""
    return (
        " × ".join(f"{v.name}: {len(v.values)}" for v in spec.sweep.variables if len(v.values) > 1)
        or "1 point"
    )


def confirm_runs(
    runs: int, spec: ir.Spec, *, yes: bool, ask: Any = None, seconds: float | None = None, workers: int = 1
) -> bool:
    """Whether to run a sweep of ``runs`` runs: yes below :data:`CONFIRM_RUNS` or with
    ``yes``; else ``ask(question)`` answers (a terminal's prompt), and without one (no
    terminal) a ``SpecError`` says to pass ``--yes``.  Both say the sweep's size and,
    given ``seconds`` (:func:`rough_seconds`), how long it may take on ``workers``."""
    if runs <= CONFIRM_RUNS or yes:
        return True
    where = max(spec.sweep.variables, key=lambda v: len(v.values)).where("values")
    size = f"{runs:,} runs ({sweep_size(spec)})"
    if seconds is not None:
        size += f", roughly {duration(seconds)} on {workers} worker{'s' * (workers != 1)}"
    if ask is None:
        raise SpecError(
            f"this sweep is {size}, more than {CONFIRM_RUNS:,} runs: 'mfdsl run' asks before starting it, "
            "and there is no terminal to ask",
            where,
            hint="pass --yes to run it, or sweep fewer values",
        ).located(spec.path, spec.source)
    return bool(ask(f"This sweep is {size}. Start it? [y/N] "))
