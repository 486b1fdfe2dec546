"""The benchmark of record: mfdsl's finite-width training against the loops a researcher
would write — a hand-written PyTorch loop and a jitted JAX loop (``bench/peers.py``) —
and the torch engine's step loops against each other and the machine's GEMM peak.

Workloads (float32 throughout: JAX's default, and torch's):

* ``fig5``: Nguyen (2019) Fig. 5 (``specs/nguyen2019_fig5.mf``: 5 layers, ReLU, dim 50,
  SGD lr 0.001), batch 1, widths 50–800, 5 seeds, 4 000 steps, train and test loss (2 000
  test points) every 500 steps;
* ``wide``: a wide batch workload — 4 hidden sigmoid layers, widths 400–3200, batch 64,
  SGD on teacher data (dim 50, mse), 200 steps, 1 000 test points every 100 steps, one seed;
* ``mmn``: Mei–Montanari–Nguyen's two-layer network (``specs/mmn2018_isotropic.mf``:
  dim 40, piecewise-linear σ, frozen output layer), batch 32, Langevin (temperature
  2·10⁻⁴, weight decay 20 × temperature), widths 100–1600, 2 seeds, 2 000 steps, records
  every 500.

Each is run by (a) mfdsl — the units of work ``mfdsl run --workers 1`` forms
(``mfdsl.execution.runner.group_tasks``: every seed of a width in one ensemble), each trained by
the torch backend's ``run_group``, torch on all cores; (b) the PyTorch loop, one network
at a time, torch on all cores; (c) the JAX loop, all seeds at once, XLA on all cores,
its compilation timed apart.  All in this one process, width by width, the three
alternated (their order rotating every round) for ``--rounds`` rounds; each run's wall
time and the process's CPU time are printed, the ratios per round (paired, so the
machine's drift between rounds cancels) with their spread.

Sections ``paths`` and ``langevin``, one thread: the step loops (``native`` = ``rows``,
``gemm``, ``off`` = ATen ops, and ``auto``, the default) at several widths and
batches, timed alternately by the thread's CPU time; the GFLOP/s of a training step
against the float32 GEMM peak measured in between; Langevin steps in the native loop
and the ATen path, with the counter-based noise and with torch's generator.

    python bench/bench_peers.py                      # everything (about an hour on 2 cores)
    python bench/bench_peers.py --only fig5 --rounds 3
    python bench/bench_peers.py --smoke              # tiny sizes, seconds (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS does none of the work

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

OBSERVED = ("train_loss", "test_loss")

WIDE_SPEC = """
experiment wide_batch
data teacher {{ dim = 50, teacher = mlp(hidden = 1, width = 16, activation = tanh), train = online, test = {test} }}
network mlp {{ hidden = 4, activation = sigmoid }}
scaling mean_field
init {{
  layer 1    ~ normal(0, 1 / sqrt(dim))
  layer 2..5 ~ normal(0, 1)
}}
train {{
  optimizer = sgd(lr = 0.05)
  loss      = mse
  batch     = {batch}
  steps     = {steps}
}}
record every {every} {{ train_loss, test_loss }}
sweep {{ width = {widths}, seed = 0..{last_seed} }}
backends torch
torch {{ dtype = float32 }}
"""


@dataclasses.dataclass
class Workload:
    name: str
    title: str
    plans: list[Any]

    @property
    def widths(self) -> list[int]:
        return sorted({int(p.width) for p in self.plans})

    def at(self, width: int) -> list[Any]:
        return [p for p in self.plans if int(p.width) == width]


def _plans(path: Path | str, overrides: list[str]) -> list[Any]:
    import mfdsl
    from mfdsl.plan.compile import compile_point

    spec = mfdsl.load(path, overrides=overrides)
    plans = []
    for point in mfdsl.expand(spec):
        if point.coords.get("width") == float("inf"):
            continue
        plan = compile_point(point.spec, dict(point.coords), "torch")
        keep = tuple(o for o in plan.observables if o.name in OBSERVED)
        plans.append(dataclasses.replace(plan, observables=keep))
    return plans


def _overrides(kind: str, args: argparse.Namespace, widths: list[int], batch: int | None = None) -> list[str]:
    s = args.scale
    if kind == "fig5":
        return [
            f"train.steps={max(2, int(4000 * s))}",
            f"record.every={max(1, int(500 * s))}",
            f"data.test={2000 if not args.smoke else 50}",
            f"sweep.width={widths}",
            f"sweep.seed=0..{4 if not args.smoke else 1}",
            "sweep.tau2=[0.1]",
            "torch.dtype=float32",
        ] + ([f"train.batch={batch}"] if batch else [])
    return [
        f"train.steps={max(2, int(2000 * s))}",
        f"record.every={max(1, int(500 * s))}",
        f"data.test={2000 if not args.smoke else 50}",
        f"sweep.width={widths}",
        "sweep.seed=0..1",
        "sweep.temp=[0.0002]",
        "torch.dtype=float32",
    ] + ([f"train.batch={batch}"] if batch else [])


def plans_of(kind: str, args: argparse.Namespace, widths: list[int], batch: int | None = None) -> list[Any]:
    """The plans of a workload (``fig5``, ``wide``, ``mmn``) at these widths (and batch)."""
    if kind == "wide":
        s = args.scale
        text = WIDE_SPEC.format(
            test=1000 if not args.smoke else 50,
            batch=batch or (64 if not args.smoke else 4),
            steps=max(2, int(200 * s)),
            every=max(1, int(100 * s)),
            widths=widths,
            last_seed=0,
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wide_batch.mf"
            path.write_text(text)
            return _plans(path, [])
    spec = "nguyen2019_fig5.mf" if kind == "fig5" else "mmn2018_isotropic.mf"
    return _plans(ROOT / "specs" / spec, _overrides(kind, args, widths, batch))


def workloads(args: argparse.Namespace) -> dict[str, Workload]:
    widths = {
        "fig5": [50, 100, 200, 400, 800],
        "wide": [400, 800, 1600, 3200],
        "mmn": [100, 200, 400, 800, 1600],
    }
    if args.smoke:
        widths = {k: [8, 16] for k in widths}
    return {
        "fig5": Workload("fig5", "Fig. 5 (batch 1, SGD)", plans_of("fig5", args, widths["fig5"])),
        "wide": Workload(
            "wide", "wide batch (batch 64, sigmoid, teacher)", plans_of("wide", args, widths["wide"])
        ),
        "mmn": Workload("mmn", "MMN two-layer (batch 32, Langevin)", plans_of("mmn", args, widths["mmn"])),
    }


# --------------------------------------------------------------------------- contenders


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_mfdsl(plans: list[Any]) -> list[dict[str, np.ndarray]]:
    """As ``mfdsl run --workers 1``'s worker: the units of ``group_tasks``, each by the
    torch backend's ``run_group`` (the store is not written)."""
    import mfdsl
    from mfdsl.execution.runner import group_tasks
    from mfdsl.plan.layout import Task

    backend = mfdsl.get_backend("torch")
    tasks = [Task(key=str(i), backend="torch", plan=p, index={}) for i, p in enumerate(plans)]
    out: list[Any] = [None] * len(plans)
    for unit in group_tasks(tasks, 1):
        idx = [int(t.key) for t in unit]
        for i, r in zip(idx, backend.run_group([plans[i] for i in idx]), strict=True):
            assert r["status"] == "done", r["message"]
            out[i] = {k: np.asarray(v) for k, v in r["records"].items()}
    return out


def run_torch(plans: list[Any]) -> list[dict[str, np.ndarray]]:
    import torch
    from peers import train_torch

    from mfdsl.data.make import make_dataset

    return [train_torch(p, make_dataset(p.data, p.seed), torch.float32) for p in plans]


def _datas(plans: list[Any]) -> list[Any]:
    from mfdsl.data.make import make_dataset

    return [make_dataset(p.data, p.seed) for p in plans]


def compare(w: Workload, rounds: int, jax_ok: bool) -> dict[str, Any]:
    """Every width of ``w`` by the contenders, alternated; per width and round: wall, cpu."""
    names = ["mfdsl", "torch loop"] + (["jax loop"] if jax_ok else [])
    times: dict[str, dict[int, list[tuple[float, float]]]] = {n: {x: [] for x in w.widths} for n in names}
    compile_s: dict[int, float] = {}
    check: dict[str, float] = {}
    loops: dict[int, Any] = {}
    finals: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names}
    # an untimed warm-up of each at the smallest width: first-call costs (loading the
    # native library, the BLAS's and XLA's set-up, the JAX compilation) out of round 1
    first = w.widths[0]
    run_mfdsl(w.at(first))
    run_torch(w.at(first)[:1])
    if jax_ok:
        from peers import JaxLoop

        loops[first] = JaxLoop(w.at(first), _datas(w.at(first)))
        compile_s[first] = loops[first].compile()
        loops[first].run()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for width in w.widths:
            plans = w.at(width)
            for name in order:
                if name == "mfdsl":
                    recs, wall, cpu = _timed(functools.partial(run_mfdsl, plans))
                elif name == "torch loop":
                    recs, wall, cpu = _timed(functools.partial(run_torch, plans))
                else:
                    from peers import JaxLoop

                    if width not in loops:
                        loops[width] = JaxLoop(plans, _datas(plans))
                        compile_s[width] = loops[width].compile()
                    recs, wall, cpu = _timed(loops[width].run)
                times[name][width].append((wall, cpu))
                if r == 0:
                    finals[name].extend(recs)
                    _cross_check(check, name, width, recs)
            print(
                f"    round {r + 1}, width {width}: "
                + ", ".join(f"{n} {times[n][width][-1][0]:.2f} s" for n in names),
                flush=True,
            )
    import torch

    return {
        "names": names,
        "times": times,
        "compile": compile_s,
        "check": check,
        "finals": finals,
        "threads": torch.get_num_threads(),
    }


_FIRST: dict[int, list[dict[str, np.ndarray]]] = {}


def _cross_check(check: dict[str, float], name: str, width: int, recs: list[dict[str, np.ndarray]]) -> None:
    """The largest relative difference of the final test loss from mfdsl's."""
    if name == "mfdsl":
        _FIRST[width] = recs
        return
    mine = _FIRST.get(width)
    if mine is None:
        return
    rel = max(
        float(abs(a["test_loss"][-1] - b["test_loss"][-1]) / abs(a["test_loss"][-1]))
        for a, b in zip(mine, recs, strict=True)
    )
    key = f"{name} final test loss vs mfdsl"
    check[key] = max(check.get(key, 0.0), rel)


def report(w: Workload, res: dict[str, Any]) -> None:
    names, times = res["names"], res["times"]
    rounds = len(next(iter(times["mfdsl"].values())))
    p0 = w.plans[0]
    seeds = len(w.at(w.widths[0]))
    print(
        f"\n{w.title}: widths {w.widths}, {seeds} seed(s), batch {p0.batch}, {p0.steps} steps, "
        f"records at {list(map(int, p0.record_steps))}, {len(_datas([p0])[0].test_x)} test points, float32; "
        f"{rounds} round(s), {res['threads']} thread(s)"
    )
    for col, what in ((0, "wall time"), (1, "process CPU time")):
        _table(w, res, col, what)
    if p0.optimizer.kind == "langevin":
        finals = {n: np.mean([r["test_loss"][-1] for r in res["finals"][n]]) for n in names}
        print(
            "  final test loss, mean over the widths' seeds (each its own noise): "
            + ", ".join(f"{n} {v:.4f}" for n, v in finals.items())
        )
        return
    for key, val in res["check"].items():
        if "vs mfdsl" in key:
            print(f"  cross-check: {key}: {val:.1e} (relative)")


def _table(w: Workload, res: dict[str, Any], col: int, what: str) -> None:
    """Seconds per width (median and range over the rounds) and the ratios to mfdsl,
    per round (paired), by wall time (``col`` 0) or the process's CPU time (1)."""
    names, times = res["names"], res["times"]
    rounds = len(next(iter(times["mfdsl"].values())))
    jax = "jax loop" in names
    cols = ["width", *(f"{n} (s)" for n in names)]
    cols += ["JAX compile (s)"] if jax else []
    cols += [f"{n} / mfdsl" for n in names[1:]]
    print(f"  {what}:")
    print("  | " + " | ".join(cols) + " |")
    print("  |" + "---:|" * len(cols))

    def cell(vals: list[float]) -> str:
        v = sorted(vals)
        return f"{np.median(v):.2f} ({v[0]:.2f}–{v[-1]:.2f})" if len(v) > 1 else f"{v[0]:.2f}"

    def seconds(name: str, width: int | None, r: int) -> float:
        if width is None:
            return sum(times[name][x][r][col] for x in w.widths)
        return float(times[name][width][r][col])

    def ratio(name: str, width: int | None) -> str:
        rs = sorted(seconds(name, width, r) / seconds("mfdsl", width, r) for r in range(rounds))
        return f"{np.median(rs):.2f}× ({rs[0]:.2f}–{rs[-1]:.2f})" if len(rs) > 1 else f"{rs[0]:.2f}×"

    for width in [*w.widths, None]:
        row = [str(width) if width else "total"]
        row += [cell([seconds(n, width, r) for r in range(rounds)]) for n in names]
        if jax:
            row.append(f"{res['compile'][width] if width else sum(res['compile'].values()):.2f}")
        row += [ratio(n, width) for n in names[1:]]
        print("  | " + " | ".join(row) + " |")


# --------------------------------------------------------------------------- paths


def gemm_peak(dtype: str, seconds: float = 0.3) -> float:
    """The best GFLOP/s of torch.mm on this thread over a few shapes (MKL's gemm)."""
    import torch

    dt = getattr(torch, dtype)
    best = 0.0
    for m, k, n in ((64, 1600, 1600), (1600, 64, 1600), (1024, 1024, 1024)):
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        c = torch.empty(m, n, dtype=dt)
        torch.mm(a, b, out=c)
        reps = 0
        t0 = time.thread_time()
        while True:
            s = time.thread_time()
            torch.mm(a, b, out=c)
            best = max(best, 2 * m * k * n / max(time.thread_time() - s, 1e-9) / 1e9)
            reps += 1
            if time.thread_time() - t0 > seconds and reps >= 3:
                break
    return best


def step_flops(plan: Any) -> float:
    """Multiply-adds × 2 of one training step: forward, backward products, updates."""
    layers = plan.layers
    trainable = [i for i, ly in enumerate(layers) if not ly.frozen]
    lowest = min(trainable) if trainable else len(layers)
    sizes = [ly.fan_in * ly.fan_out for ly in layers]
    fwd = sum(sizes)
    bwd = sum(sizes[i] for i in range(lowest + 1, len(layers)))
    upd = sum(sizes[i] for i in trainable)
    return 2.0 * plan.batch * (fwd + bwd + upd)


def _trainer(plan: Any, mode: str, dtype: str = "float32", noise: str | None = None) -> Any:
    from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer

    from mfdsl.data.make import make_dataset

    if noise is not None:
        plan = dataclasses.replace(plan, options={**plan.options, "noise": noise})
    task = str(make_dataset(plan.data, plan.seed).task)
    return EnsembleTrainer(Ensemble([plan], dtype=dtype), [task], 1, native=mode)


#: the most steps of one timed chunk (``--smoke`` lowers it: the ATen path's ~50 µs a step
#: on a tiny net would otherwise make a chunk of 10⁵ steps)
MAX_CHUNK_STEPS = 1 << 40


def time_modes(plan: Any, modes: tuple[str, ...], rounds: int, dtype: str = "float32") -> dict[str, float]:
    """Seconds per step (the thread's CPU time, best of ``rounds`` alternated chunks) of
    one network in each ``native`` mode."""
    return time_configs(plan, {m: (m, None) for m in modes}, rounds, dtype)


def time_configs(
    plan: Any, configs: dict[str, tuple[str, str | None]], rounds: int, dtype: str = "float32"
) -> dict[str, float]:
    """:func:`time_modes` for named ``(native mode, noise)`` configurations (``None``: the
    plan's noise)."""
    from mfdsl.data.make import make_dataset

    budget = 0.08  # seconds of work per chunk (at ~40 GFLOP/s), at most 2^22 input entries
    cap = (1 << 22) // (int(plan.batch) * plan.layers[0].fan_in)
    n = int(max(3, min(cap, MAX_CHUNK_STEPS, budget * 40e9 / max(step_flops(plan), 1.0))))
    data = make_dataset(plan.data, plan.seed)
    chunk = data.train_chunk(0, n, int(plan.batch))
    trainers = {name: _trainer(plan, mode, dtype, noise) for name, (mode, noise) in configs.items()}
    prepared = {m: t.prepare_chunk([chunk]) for m, t in trainers.items()}
    for m, t in trainers.items():
        t.run(*prepared[m], 0)  # warm-up: the library, the pages, the caches
    best = {m: float("inf") for m in configs}
    order = list(configs)
    for r in range(rounds):
        for m in order[r % len(order) :] + order[: r % len(order)]:  # the order rotates
            s = time.thread_time()
            trainers[m].run(*prepared[m], 0)
            best[m] = min(best[m], (time.thread_time() - s) / n)
    return best


def paths(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    modes = ("rows", "gemm", "off", "auto")
    widths = [50, 200, 400, 800, 1600, 3200] if not args.smoke else [8, 24]
    batches = [1, 2, 4, 8, 16, 32, 64] if not args.smoke else [1, 4]
    peak = gemm_peak("float32")
    print(
        f"\nstep loops, 1 thread, float32 (seconds per step: the thread's CPU time, best of {args.path_rounds} "
        f"alternated chunks); GEMM peak (torch.mm, this thread) {peak:.0f} GFLOP/s"
    )
    for net, kind in (
        ("4 hidden sigmoid layers, dim 50 (the wide workload's net)", "wide"),
        ("Fig. 5's net", "fig5"),
    ):
        print(f"  {net}:")
        print(
            "  | width | batch | rows (ms) | gemm (ms) | off = ATen (ms) | auto (ms) | auto / best | auto GFLOP/s |"
        )
        print("  |---:|---:|---:|---:|---:|---:|---:|---:|")
        worst = 0.0
        for width in widths:
            for batch in batches if kind == "wide" else [1]:
                plan = plans_of(kind, args, [width], batch)[0]
                t = time_modes(plan, modes, args.path_rounds)
                best = min(t.values())
                worst = max(worst, t["auto"] / best)
                print(
                    f"  | {width} | {batch} | "
                    + " | ".join(f"{t[m] * 1e3:.3f}" for m in modes)
                    + f" | {t['auto'] / best:.2f} | {step_flops(plan) / t['auto'] / 1e9:.1f} |",
                    flush=True,
                )
        print(f"  largest auto / best: {worst:.2f}")
    # the 60 % target: width 1600, batch 64, the step against the peak measured around it
    plan = plans_of("wide", args, [1600 if not args.smoke else 24], 64 if not args.smoke else 4)[0]
    for threads in (1, os.cpu_count() or 1):
        torch.set_num_threads(threads)
        ratios = []
        for _ in range(args.path_rounds):
            p1 = gemm_peak("float32") if threads == 1 else _wall_peak()
            s = _step_seconds(plan, threads)
            p2 = gemm_peak("float32") if threads == 1 else _wall_peak()
            ratios.append((step_flops(plan) / s / 1e9, max(p1, p2)))
        got = [g / p for g, p in ratios]
        print(
            f"  width {int(plan.width)}, batch {plan.batch}, {threads} thread(s), auto: "
            + ", ".join(f"{g:.0f} GFLOP/s of {p:.0f}" for g, p in ratios)
            + f" = {100 * min(got):.0f}–{100 * max(got):.0f} % of the GEMM peak measured around it"
        )
    torch.set_num_threads(os.cpu_count() or 1)


def _wall_peak() -> float:
    """GFLOP/s of torch.mm on torch's threads (wall time), best of a few."""
    import torch

    best = 0.0
    for m, k, n in ((64, 1600, 1600), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        c = torch.empty(m, n)
        for _ in range(8):
            s = time.perf_counter()
            torch.mm(a, b, out=c)
            best = max(best, 2 * m * k * n / (time.perf_counter() - s) / 1e9)
    return best


def _step_seconds(plan: Any, threads: int) -> float:
    if threads == 1:
        return time_modes(plan, ("auto",), 2)["auto"]
    from mfdsl.data.make import make_dataset

    t = _trainer(plan, "auto")
    n = 20
    xs, ys = t.prepare_chunk([make_dataset(plan.data, plan.seed).train_chunk(0, n, int(plan.batch))])
    t.run(xs, ys, 0)
    best = float("inf")
    for _ in range(3):
        s = time.perf_counter()
        t.run(xs, ys, 0)
        best = min(best, (time.perf_counter() - s) / n)
    return best


# --------------------------------------------------------------------------- langevin


#: the Langevin configurations timed: (native mode, noise generator)
LANGEVIN_CONFIGS: dict[str, tuple[str, str | None]] = {
    "before": ("off", "torch"),  # before issue 15: ATen ops, torch's generator
    "native, torch noise": ("auto", "torch"),
    "ATen, philox": ("off", "philox"),
    "native, philox": ("auto", "philox"),  # the default
}


def langevin(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    width = 400 if not args.smoke else 16
    print(
        f"\nLangevin steps at width {width}, batch 1, 1 thread (µs per step, the thread's CPU time, best of "
        f"{args.path_rounds} alternated chunks): the step loop (native = auto, or off = ATen ops) and the noise "
        "(noise = philox, the counter-based default, or torch's generator); 'before' is ATen ops with torch's "
        "generator, Langevin's only path before issue 15; the draw alone per step (torch's normal_, philox)"
    )
    mmn = plans_of("mmn", args, [width], 1)[0]
    fig5 = plans_of("fig5", args, [width], 1)[0]
    # Fig. 5's net under the MMN spec's Langevin optimiser (at Fig. 5's learning rate)
    fig5 = dataclasses.replace(fig5, optimizer=dataclasses.replace(mmn.optimizer, lr=fig5.optimizer.lr))
    print(
        "  | network | dtype | "
        + " | ".join(LANGEVIN_CONFIGS)
        + " | before / default | draw: torch | draw: philox |"
    )
    print("  |---|---|" + "---:|" * (len(LANGEVIN_CONFIGS) + 3))
    for name, plan in (("MMN two-layer net", mmn), ("Fig. 5's 5-layer net", fig5)):
        for dtype in ("float32", "float64"):
            t = time_configs(plan, LANGEVIN_CONFIGS, args.path_rounds, dtype)
            draws = _draw_seconds(plan, dtype)
            print(
                f"  | {name} | {dtype} | "
                + " | ".join(f"{t[c] * 1e6:.1f}" for c in LANGEVIN_CONFIGS)
                + f" | **{t['before'] / t['native, philox']:.2f}×** | {draws['torch'] * 1e6:.1f}"
                f" | {draws['philox'] * 1e6:.1f} |",
                flush=True,
            )


def _draw_seconds(plan: Any, dtype: str) -> dict[str, float]:
    """Seconds per step of drawing a step's noise alone: torch's ``normal_`` and the
    counter-based noise (the C loop where it is built), on the trainable weights."""
    import torch
    from mfdsl_torch._noise import NoiseSource

    sizes = [ly.fan_in * ly.fan_out for ly in plan.layers if not ly.frozen]
    bufs = [torch.empty(n, dtype=getattr(torch, dtype)) for n in sizes]
    out = {}
    for kind in ("torch", "philox"):
        src = NoiseSource(kind, 0, "cpu", getattr(torch, dtype))
        best = float("inf")
        for r in range(5):
            s = time.thread_time()
            for k in range(20):
                for j, b in enumerate(bufs):
                    src.fill(b, j, 20 * r + k)
            best = min(best, (time.thread_time() - s) / 20)
        out[kind] = best
    return out


# --------------------------------------------------------------------------- main


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="fig5,wide,mmn,paths,langevin", help="sections, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of the workloads")
    parser.add_argument("--path-rounds", type=int, default=3, help="alternated chunks per step-loop timing")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the workloads' steps")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round (a smoke test)")
    parser.add_argument("--no-jax", action="store_true", help="leave the JAX loop out")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads of every contender for the workloads (torch's, and XLA's: with 1, XLA's "
        "CPU backend runs single-threaded); default all cores, as mfdsl run --workers 1",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        global MAX_CHUNK_STEPS
        args.rounds, args.path_rounds, args.scale = 1, 1, 0.005
        MAX_CHUNK_STEPS = 50
    only = set(args.only.split(","))
    if args.threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()

    import torch

    import mfdsl

    jax_ok = not args.no_jax
    jax_version = "not installed"
    if jax_ok:
        try:
            import jax

            jax_version = f"{jax.__version__} ({jax.devices()[0].platform})"
        except ImportError:
            jax_ok = False
    torch.set_num_threads(args.threads)
    print(
        f"machine: {os.cpu_count()} cores, {cpu_model()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, jax {jax_version}, mfdsl {getattr(mfdsl, '__version__', '?')}; "
        f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    sys.stdout.flush()
    ws = workloads(args) if only & {"fig5", "wide", "mmn"} else {}
    for name in ("fig5", "wide", "mmn"):
        if name in only:
            torch.set_num_threads(args.threads)
            print(f"\n{ws[name].title}: running (load average {os.getloadavg()[0]:.2f})", flush=True)
            report(ws[name], compare(ws[name], args.rounds, jax_ok))
    if "paths" in only:
        paths(args)
    if "langevin" in only:
        langevin(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
