"""Finite-width training speed: mfdsl's torch engine against a hand-written loop.

The workload is Nguyen (2019) Fig. 5's (``specs/nguyen2019_fig5.mf``, without the biases
the spec has had since: ``network.bias = false``): five layers
(hidden = 4), ReLU, isotropic Gaussians in dim 50, mean-field scaling, SGD at batch 1;
widths 50 … 800, 5 seeds, ``tau2 = 0.1``; 20 000 steps recorded every 500
(``train_loss``, ``test_loss``, ``test_accuracy``: what the baseline records), with the
spec's 10 000 test points and with 1 000 (the evaluation of the test set, the same
matrix products for both, is most of the work at 10 000), in float64 (mfdsl's default)
and float32 (torch's, what a hand-written loop uses; both sides run in the same
precision).  Both sweeps run in 2 worker
processes (spawned, 1 BLAS/OpenMP thread each, the machine's 2 cores split evenly),
tasks handed out largest first: the baseline one run per task, mfdsl the units of work
``mfdsl run`` forms and trains (``mfdsl.execution.runner.group_tasks``, i.e. the torch backend's
``group``: every seed of a width in one ensemble while its weights fit 8 MiB; each unit
trained by the backend's ``run_group``, as in ``mfdsl run``'s workers).  Each task
reports its own user and system CPU time (``resource.getrusage``).

Then, in this process with one thread: the copy bandwidth (``dst.copy_(src)``, bytes =
2 × size, best of several) of a buffer as large as a width-800 member's weights and of
a 1 GiB one, against mfdsl's width-800 training (the least traffic of a batch-1 step:
4 passes over every weight matrix) in its native step loop (what this workload runs)
and in its ATen step loops (what runs where the native one does not apply); and what
recording costs.

    python bench/bench_torch.py --quick          # 2 000 steps (a few minutes)
    python bench/bench_torch.py --smoke          # tiny sizes, seconds (CI)
    python bench/bench_torch.py                  # the full workload (about 45 min on 2 cores)
    python bench/bench_torch.py --only sweep --tests 1000 --dtypes float32
    python bench/bench_torch.py --only sweep --tests 10000   # the sweep alone, the spec's test set
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPEC = os.path.join(ROOT, "specs", "nguyen2019_fig5.mf")
OBSERVED = ("train_loss", "test_loss", "test_accuracy")


def make_plans(
    steps: int, every: int, widths: list[int], seeds: int, test: int | None, dtype: str = "float64"
) -> list[Any]:
    import mfdsl
    from mfdsl.plan.compile import compile_point

    overrides = [
        f"train.steps={steps}",
        f"record.every={every}",
        f"sweep.width={widths}",
        f"sweep.seed=0..{seeds - 1}",
        "sweep.tau2=[0.1]",
        f"torch.dtype={dtype}",
        # the workload of the figures below: the spec without biases, as it was then
        # (the baseline loop has none)
        "network.bias=false",
    ]
    if test is not None:
        overrides.append(f"data.test={test}")
    spec = mfdsl.load(SPEC, overrides=overrides)
    plans = []
    for point in mfdsl.expand(spec):
        plan = compile_point(point.spec, dict(point.coords), "torch")
        plans.append(
            dataclasses.replace(plan, observables=tuple(o for o in plan.observables if o.name in OBSERVED))
        )
    return plans


# --------------------------------------------------------------------------- workers


def _init_worker(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    sys.path.insert(0, HERE)
    import torch

    torch.set_num_threads(threads)


def _usage() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def run_baseline(plan: Any) -> tuple[list[dict[str, np.ndarray]], float, float, float]:
    import torch
    from baseline_loop import train_baseline

    u0, s0 = _usage()
    t0 = time.perf_counter()
    rec = train_baseline(plan, dtype=getattr(torch, str(plan.options.get("dtype", "float64"))))
    wall = time.perf_counter() - t0
    u1, s1 = _usage()
    return [rec], u1 - u0, s1 - s0, wall


def run_mfdsl(plans: list[Any]) -> tuple[list[dict[str, np.ndarray]], float, float, float]:
    """One unit of work as ``mfdsl run``'s workers train it: the torch backend's
    ``run_group`` (one ensemble)."""
    import mfdsl

    u0, s0 = _usage()
    t0 = time.perf_counter()
    results = mfdsl.get_backend("torch").run_group(plans)
    wall = time.perf_counter() - t0
    u1, s1 = _usage()
    return [dict(r["records"]) for r in results], u1 - u0, s1 - s0, wall


def units(kind: str, plans: list[Any], workers: int) -> list[list[int]]:
    """The tasks, largest first: the baseline one run each; mfdsl the units of
    ``mfdsl run`` (``mfdsl.execution.runner.group_tasks``: the torch backend's ``group``)."""
    from mfdsl.execution.runner import group_tasks
    from mfdsl.plan.layout import Task

    if kind == "baseline":
        cost = [p.steps * sum(ly.fan_in * ly.fan_out for ly in p.layers) for p in plans]
        return [[i] for i in sorted(range(len(plans)), key=lambda i: -cost[i])]
    tasks = [Task(key=str(i), backend="torch", plan=p, index={}) for i, p in enumerate(plans)]
    return [[int(t.key) for t in unit] for unit in group_tasks(tasks, workers)]


def sweep(kind: str, plans: list[Any], workers: int) -> dict[str, Any]:
    """Run the whole sweep in ``workers`` processes; wall time and CPU times."""
    tasks = units(kind, plans, workers)
    ctx = mp.get_context("spawn")
    records: list[Any] = [None] * len(plans)
    user = system = 0.0
    per_width: dict[int, float] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(1,)) as pool:
        # warm the workers (imports) before the clock starts
        list(pool.map(_noop, range(workers)))
        t0 = time.perf_counter()
        if kind == "baseline":
            futures = {pool.submit(run_baseline, plans[t[0]]): t for t in tasks}
        else:
            futures = {pool.submit(run_mfdsl, [plans[i] for i in t]): t for t in tasks}
        for fut in cf.as_completed(futures):
            recs, u, s, _ = fut.result()
            user += u
            system += s
            width = int(plans[futures[fut][0]].width)
            per_width[width] = per_width.get(width, 0.0) + u + s
            for i, r in zip(futures[fut], recs, strict=True):
                records[i] = r
        wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "user": user,
        "sys": system,
        "records": records,
        "tasks": [len(t) for t in tasks],
        "per_width": dict(sorted(per_width.items())),
    }


def _noop(_: int) -> None:
    import baseline_loop  # noqa: F401
    import mfdsl_torch._ensemble  # noqa: F401
    import torch  # noqa: F401

    import mfdsl.data.make  # noqa: F401


# --------------------------------------------------------------------------- bandwidth


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    import torch

    n = nbytes // 8
    src = torch.randn(n, dtype=torch.float64)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * n * 8 / best


def _timed(f: Any) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


#: the step loops of the torch engine: the native one (this workload's default) and
#: the ATen ones (the engine's path where the native loop does not apply)
PATHS = ("native", "aten lazy", "aten immediate")


def training_bandwidth(
    width: int, members: int, dtype: str, steps: int, threads: int, *, path: str = "native"
) -> tuple[float, float]:
    """Seconds per step (best of 5 chunks) of mfdsl's step loop at ``width``, and the
    achieved bandwidth counting 4 passes over every weight matrix per member.

    ``path``: ``native``, the compiled loop, reads each weight row once forward and
    reads and writes it once backward (3 passes; with ReLU it skips the rows of units
    that are off); ``aten immediate`` makes the 4 passes (the engine's path for large
    layers with momentum, weight decay or noise); ``aten lazy`` about 2 + 2/32."""
    import torch
    from mfdsl_torch import _ensemble
    from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer

    from mfdsl.data.make import make_dataset

    old = torch.get_num_threads()
    old_lazy = _ensemble._LAZY_MAX_BATCH
    torch.set_num_threads(threads)
    if path == "aten immediate":
        _ensemble._LAZY_MAX_BATCH = 0
    try:
        plans = make_plans(20000, 500, [width], members, 64)
        ens = Ensemble(plans, dtype=dtype)
        trainer = EnsembleTrainer(ens, ["binary"] * members, 1, native=path == "native")
        assert trainer.native == (path == "native"), "the native step loop is not available here"
        xs, ys = trainer.prepare_chunk([make_dataset(p.data, p.seed).train_chunk(0, steps, 1) for p in plans])
        trainer.run(xs, ys, 0)
        per = min(_timed(lambda: trainer.run(xs, ys, 0)) for _ in range(5)) / steps
    finally:
        torch.set_num_threads(old)
        _ensemble._LAZY_MAX_BATCH = old_lazy
    item = 8 if dtype == "float64" else 4
    params = sum(ly.fan_in * ly.fan_out for ly in plans[0].layers)
    return per, 4 * params * item * members / per


def recording_cost(width: int, steps: int, every: int, tests: list[int], seconds: float = 30.0) -> list[str]:
    """What recording costs one run (``run_group`` of one plan, 1 thread), as lines.

    The mechanism (records kept on the device, chunks ending at record steps, lazy
    updates folded there): after a warm-up run of each, the best of as many runs as fit
    in about ``seconds`` (at least 3) recording ``train_loss`` only
    at the end and every ``every`` steps, alternated.  The evaluation of the test set
    (``test_loss``, ``test_accuracy``): the share of a run's time spent in the observer
    (measured inside the run, so it does not suffer from the machine's drift between
    runs), every ``every`` steps and at the compiler's default cadence (50 log-spaced
    records), for each test-set size."""
    import torch
    from mfdsl_torch import _engine

    import mfdsl
    from mfdsl.plan.types import ObservablePlan

    torch.set_num_threads(1)
    backend = mfdsl.get_backend("torch")
    default_steps = np.unique(
        np.concatenate([[0], np.round(np.geomspace(1, steps, 50)).astype(np.int64), [steps]])
    )
    loss_only = (ObservablePlan(name="train_loss"),)
    plan = make_plans(steps, every, [width], 1, None)[0]
    end = dataclasses.replace(plan, record_steps=np.array([steps]), observables=loss_only)
    cadence = dataclasses.replace(plan, observables=loss_only)
    times: dict[str, list[float]] = {"end": [], "every": []}
    warm = _timed(lambda: backend.run_group([end])) + _timed(lambda: backend.run_group([cadence]))
    repeats = max(3, min(25, int(seconds / max(warm, 1e-3))))
    for _ in range(repeats):
        times["end"].append(_timed(lambda: backend.run_group([end])))
        times["every"].append(_timed(lambda: backend.run_group([cadence])))
    bare, rec = min(times["end"]), min(times["every"])
    lines = [
        f"train_loss only: recorded at the end {bare:.3f} s, every {every} steps {rec:.3f} s "
        f"({100 * (rec - bare) / rec:+.1f}%; best of {repeats})"
    ]
    spent = [0.0]
    observe = _engine._Observer.observe

    def timed_observe(self: Any) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        try:
            return observe(self)
        finally:
            spent[0] += time.perf_counter() - t

    _engine._Observer.observe = timed_observe
    try:
        for test in tests:
            plan = make_plans(steps, every, [width], 1, test)[0]
            for name, p in ((f"every {every}", plan), ("log 50", replace_steps(plan, default_steps))):
                spent[0] = 0.0
                total = _timed(lambda p=p: backend.run_group([p]))
                lines.append(
                    f"test set {test}, {name}: {total:.2f} s, of which evaluation {spent[0]:.2f} s "
                    f"({100 * spent[0] / total:.1f}%)"
                )
    finally:
        _engine._Observer.observe = observe
    return lines


def replace_steps(plan: Any, steps: np.ndarray) -> Any:
    return dataclasses.replace(plan, record_steps=steps)


# --------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="--steps 2000")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every part (a smoke test)")
    parser.add_argument("--widths", default="50,100,200,400,800")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--tests",
        default="10000,1000",
        help="test-set sizes to run the sweep with (the spec's is 10000), comma-separated",
    )
    parser.add_argument(
        "--dtypes",
        default="float64,float32",
        help="precisions to run the sweep in, comma-separated (float64: mfdsl's default; "
        "float32: torch's, what a hand-written loop uses)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("sweep", "bandwidth", "recording"), help="run one part only")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2000
    if args.smoke:
        args.steps, args.every, args.widths, args.seeds = 20, 10, "8,16", 2
        args.tests, args.dtypes, args.workers = "50", "float32", 1
    widths = [int(w) for w in args.widths.split(",")]
    tests = [int(t) for t in args.tests.split(",")]
    sys.path.insert(0, HERE)

    import torch

    print(
        f"machine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"workload: widths {widths}, {args.seeds} seeds, batch 1, {args.steps} steps, "
        f"records every {args.every}; {args.workers} worker processes × 1 thread"
    )
    if args.only in (None, "sweep"):
        for dtype in args.dtypes.split(","):
            for test in tests:
                plans = make_plans(args.steps, args.every, widths, args.seeds, test, dtype)
                compare_sweeps(plans, args.workers, test, dtype)

    w = max(widths)
    if args.only in (None, "bandwidth"):
        bandwidth_report(w, big=(16 << 20) if args.smoke else (1 << 30))
    if args.only in (None, "recording"):
        print(f"\nrecording cost (run_group of one plan, 1 thread, {args.steps} steps):")
        for rw in sorted({min(widths), w}):
            for line in recording_cost(rw, args.steps, args.every, tests, 1.0 if args.smoke else 30.0):
                print(f"  width {rw}: {line}")


def compare_sweeps(plans: list[Any], workers: int, test: int, dtype: str) -> None:
    print(
        f"\n{dtype}, test set {test}{' (the spec)' if test == 10000 else ''}, "
        f"load average {os.getloadavg()[0]:.2f}:"
    )
    base = sweep("baseline", plans, workers)
    mine = sweep("mfdsl", plans, workers)
    for name, r in (("baseline", base), ("mfdsl", mine)):
        print(
            f"  {name:9s} sweep: wall {r['wall']:8.1f} s   cpu user {r['user']:8.1f} s  "
            f"sys {r['sys']:6.2f} s   tasks {r['tasks']}"
        )
    print(
        "  cpu (user + sys) per width, baseline / mfdsl: "
        + ", ".join(
            f"{w}: {base['per_width'][w]:.1f} / {mine['per_width'][w]:.1f} s" for w in base["per_width"]
        )
    )
    print(
        f"  speed-up (wall): {base['wall'] / mine['wall']:.2f}×   "
        f"(cpu: {(base['user'] + base['sys']) / (mine['user'] + mine['sys']):.2f}×)"
    )
    rel = max(
        float(np.max(np.abs(b["test_loss"] - m["test_loss"]) / np.abs(b["test_loss"])))
        for b, m in zip(base["records"], mine["records"], strict=True)
    )
    print(f"  cross-check: max relative test-loss difference baseline vs mfdsl {rel:.1e}")


def bandwidth_report(w: int, big: int = 1 << 30) -> None:
    import torch

    print(f"\nbandwidth at width {w}, batch 1, one process (4 passes over the weights per step):")
    member = 8 * (3 * w * w + 50 * w + w)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ws = copy_bandwidth(2 * member)
        big_bw = copy_bandwidth(big, repeats=4)
        print(
            f"  {threads} thread(s): copy({2 * member / 2**20:.0f} MiB) {ws / 1e9:.1f} GB/s, "
            f"copy({big / 2**30:g} GiB) {big_bw / 1e9:.1f} GB/s"
        )
        for dtype in ("float64", "float32"):
            for path in PATHS:
                per, bw = training_bandwidth(w, 1, dtype, 256, threads, path=path)
                print(
                    f"    {dtype} {path:15s}: "
                    f"{per * 1e3:.3f} ms/step, {bw / 1e9:.1f} GB/s = {100 * bw / ws:.0f}% of "
                    f"copy({2 * member / 2**20:.0f} MiB), {100 * bw / big_bw:.0f}% of copy({big / 2**30:g} GiB)"
                )
    torch.set_num_threads(1)
    for members in (5,):
        per, bw = training_bandwidth(w, members, "float64", 128, 1)
        print(
            f"  1 thread float64 native, ensemble of {members}: {per / members * 1e3:.3f} ms per "
            f"member-step, {bw / 1e9:.1f} GB/s"
        )


if __name__ == "__main__":
    main()
