"""Finite-width training speed: mfdsl's torch engine against a hand-written loop.

The workload is Nguyen (2019) Fig. 5's (``specs/nguyen2019_fig5.mf``): five layers
(hidden = 4), ReLU, isotropic Gaussians in dim 50 with the spec's 10 000 test points,
mean-field scaling, SGD at batch 1; widths 50 … 800, 5 seeds, ``tau2 = 0.1``; 20 000
steps recorded every 500 (``train_loss``, ``test_loss``, ``test_accuracy``: what the
baseline records).  Both sweeps run in 2 worker processes (spawned, 1 BLAS/OpenMP
thread each, the machine's 2 cores split evenly), tasks handed out largest first:
the baseline one run per task, mfdsl one ensemble per task (``group_plans(plans,
workers=2)``: every seed of a width in one ensemble while its weights fit 8 MiB, so
widths 50–200 batch 5 seeds and 400/800 train member by member).  Each task reports
its own user and system CPU time (``resource.getrusage``).

Then, in this process with one thread: the copy bandwidth (``dst.copy_(src)``, bytes =
2 × size, best of several) of a buffer as large as a width-800 member's weights and of
a 1 GiB one, against mfdsl's width-800 training (the least traffic of a batch-1 step:
4 passes over every weight matrix); and what recording costs.

    python bench/bench_torch.py --quick          # 2 000 steps (a few minutes)
    python bench/bench_torch.py                  # the full workload
    python bench/bench_torch.py --only sweep --test 1000   # a smaller test set
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


def make_plans(steps: int, every: int, widths: list[int], seeds: int, test: int | None) -> list[Any]:
    import mfdsl
    from mfdsl._compile import compile_point

    overrides = [
        f"train.steps={steps}",
        f"record.every={every}",
        f"sweep.width={widths}",
        f"sweep.seed=0..{seeds - 1}",
        "sweep.tau2=[0.1]",
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
    from baseline_loop import train_baseline

    u0, s0 = _usage()
    t0 = time.perf_counter()
    rec = train_baseline(plan)
    wall = time.perf_counter() - t0
    u1, s1 = _usage()
    return [rec], u1 - u0, s1 - s0, wall


def run_mfdsl(
    plans: list[Any], dtype: str = "float64"
) -> tuple[list[dict[str, np.ndarray]], float, float, float]:
    from mfdsl_torch._ensemble import train_ensemble

    from mfdsl._data import make_dataset

    u0, s0 = _usage()
    t0 = time.perf_counter()
    results = train_ensemble(plans, [make_dataset(p.data, p.seed) for p in plans], dtype=dtype)
    wall = time.perf_counter() - t0
    u1, s1 = _usage()
    return [r.records for r in results], u1 - u0, s1 - s0, wall


def sweep(kind: str, plans: list[Any], workers: int) -> dict[str, Any]:
    """Run the whole sweep in ``workers`` processes; wall time and CPU times."""
    from mfdsl_torch._ensemble import group_plans

    if kind == "baseline":
        cost = [p.steps * sum(ly.fan_in * ly.fan_out for ly in p.layers) for p in plans]
        order = sorted(range(len(plans)), key=lambda i: -cost[i])
        tasks = [[i] for i in order]
    else:
        tasks = group_plans(plans, workers=workers)
    ctx = mp.get_context("spawn")
    records: list[Any] = [None] * len(plans)
    user = system = 0.0
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
            for i, r in zip(futures[fut], recs, strict=True):
                records[i] = r
        wall = time.perf_counter() - t0
    return {"wall": wall, "user": user, "sys": system, "records": records, "tasks": [len(t) for t in tasks]}


def _noop(_: int) -> None:
    import torch  # noqa: F401

    import mfdsl  # noqa: F401


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


def training_bandwidth(width: int, members: int, dtype: str, steps: int, threads: int) -> tuple[float, float]:
    """Seconds per step (best of 5 chunks) of mfdsl's step loop at ``width``, and the
    achieved bandwidth counting 4 passes over every weight matrix per member."""
    import torch
    from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer

    from mfdsl._data import make_dataset

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plans = make_plans(20000, 500, [width], members, 16)
        ens = Ensemble(plans, dtype=dtype)
        trainer = EnsembleTrainer(ens, ["binary"] * members, 1)
        xs, ys = trainer.prepare_chunk([make_dataset(p.data, p.seed).train_chunk(0, steps, 1) for p in plans])
        trainer.run(xs, ys, 0)
        per = min(_timed(lambda: trainer.run(xs, ys, 0)) for _ in range(5)) / steps
    finally:
        torch.set_num_threads(old)
    item = 8 if dtype == "float64" else 4
    params = sum(ly.fan_in * ly.fan_out for ly in plans[0].layers)
    return per, 4 * params * item * members / per


def recording_cost(width: int, steps: int, every: int, test: int | None) -> dict[str, float]:
    """Seconds of ``train`` for one plan: records only at the end (``train_loss``), at
    every ``every`` steps with ``train_loss`` only, and with all three observables; and
    the compiler's default cadence (50 log-spaced records)."""
    import torch
    from mfdsl_torch._engine import train

    from mfdsl._data import make_dataset
    from mfdsl._plan import ObservablePlan

    torch.set_num_threads(1)
    plan = make_plans(steps, every, [width], 1, test)[0]
    loss_only = (ObservablePlan(name="train_loss"),)
    default_steps = np.unique(
        np.concatenate([[0], np.round(np.geomspace(1, steps, 50)).astype(np.int64), [steps]])
    )
    variants = {
        "end only": dataclasses.replace(plan, record_steps=np.array([steps]), observables=loss_only),
        f"every {every}, train_loss": dataclasses.replace(plan, observables=loss_only),
        f"every {every}, all three": plan,
        "default (log 50), all three": dataclasses.replace(plan, record_steps=default_steps),
    }
    out = {}
    for name, p in variants.items():
        data = make_dataset(p.data, p.seed)
        out[name] = _timed(lambda p=p, d=data: train(p, d))
    return out


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
    parser.add_argument("--widths", default="50,100,200,400,800")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--test", type=int, default=None, help="test-set size (default: the spec's 10000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("sweep", "bandwidth", "recording"), help="run one part only")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2000
    widths = [int(w) for w in args.widths.split(",")]
    sys.path.insert(0, HERE)

    import torch

    print(
        f"machine: {os.cpu_count()} cores, {cpu_model()}; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"workload: widths {widths}, {args.seeds} seeds, batch 1, {args.steps} steps, "
        f"records every {args.every}, test set {args.test or 'spec (10000)'}; "
        f"{args.workers} worker processes × 1 thread"
    )
    if args.only in (None, "sweep"):
        plans = make_plans(args.steps, args.every, widths, args.seeds, args.test)
        base = sweep("baseline", plans, args.workers)
        mine = sweep("mfdsl", plans, args.workers)
        for name, r in (("baseline", base), ("mfdsl", mine)):
            print(
                f"{name:9s} sweep: wall {r['wall']:8.1f} s   cpu user {r['user']:8.1f} s  "
                f"sys {r['sys']:6.2f} s   tasks {r['tasks']}"
            )
        print(
            f"speed-up (wall): {base['wall'] / mine['wall']:.2f}×   "
            f"(cpu: {(base['user'] + base['sys']) / (mine['user'] + mine['sys']):.2f}×)"
        )
        rel = max(
            float(np.max(np.abs(b["test_loss"] - m["test_loss"]) / np.abs(b["test_loss"])))
            for b, m in zip(base["records"], mine["records"], strict=True)
        )
        print(f"cross-check: max relative test-loss difference baseline vs mfdsl {rel:.1e}")

    w = max(widths)
    if args.only in (None, "bandwidth"):
        bandwidth_report(w)
    if args.only in (None, "recording"):
        print(f"\nrecording cost (train(), one run, 1 thread, {args.steps} steps):")
        for rw in sorted({min(widths), w}):
            costs = recording_cost(rw, args.steps, args.every, args.test)
            bare = costs["end only"]
            print(
                f"  width {rw}: "
                + ", ".join(f"{k} {v:.2f} s ({100 * (v - bare) / v:+.1f}%)" for k, v in costs.items())
            )


def bandwidth_report(w: int) -> None:
    import torch

    print(f"\nbandwidth at width {w}, batch 1, one process:")
    member = 8 * (3 * w * w + 50 * w + w)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ws = copy_bandwidth(2 * member)
        big = copy_bandwidth(1 << 30, repeats=4)
        for dtype in ("float64", "float32"):
            per, bw = training_bandwidth(w, 1, dtype, 200, threads)
            print(
                f"  {threads} thread(s) {dtype}: {per * 1e3:.3f} ms/step, {bw / 1e9:.1f} GB/s"
                f" = {100 * bw / ws:.0f}% of copy({2 * member / 2**20:.0f} MiB) "
                f"{ws / 1e9:.1f} GB/s, {100 * bw / big:.0f}% of copy(1 GiB) "
                f"{big / 1e9:.1f} GB/s"
            )
    torch.set_num_threads(1)
    for members in (5,):
        per, bw = training_bandwidth(w, members, "float64", 100, 1)
        print(
            f"  1 thread float64, ensemble of {members}: {per / members * 1e3:.3f} ms per "
            f"member-step, {bw / 1e9:.1f} GB/s"
        )


if __name__ == "__main__":
    main()
