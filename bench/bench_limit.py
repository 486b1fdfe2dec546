"""Benchmark: the jax mean-field limit against finite torch networks, on Nguyen (2019)
Fig. 5 (``specs/nguyen2019_fig5.mf``: five layers, ReLU, i.i.d. init), shortened.

One run measures, for one seed and τ₂ = 0.1, the wall time and the sup-distance over
the record steps of the test-loss trajectory to a reference limit, of

* the jax limit at N = 10⁴ and 10⁵ particles (timed cold, JIT compilation included,
  and warm);
* finite torch networks of width 400, 800 and 1600, trained as the spec says (SGD,
  lr = 0.001, batch 1);

and checks the target: the jax limit reaches the width-1600 network's distance in at
most 1/20 of its time.

Two references (``--mode``):

* ``stream`` (default): the limit driven by the torch runs' own examples — Euler step
  lr and ``data_samples`` = the batch, so jax step i takes exactly SGD step i's
  examples — at ``--ref-particles`` particles: the n → ∞ limit of those very SGD runs.
  The jax rows group ``--group`` SGD steps' examples into one Euler step (dt = group ×
  lr).  The distances then measure width (or particle) error: the SGD noise, which
  every run shares, cancels.
* ``population``: E_Z over many fresh samples per unit time (the ODE of
  ``docs/mean-field.md`` §2).  Against it each run's distance is dominated by its own
  sampling noise — for the torch networks the SGD noise of batch 1, the same at every
  width.

``--check-reference`` integrates the reference again with other particles (and, for
``population``, an independent training stream, same test set) and prints the distance
between the two: the reference's own error.  Figures and what was shortened:
``docs/performance.md``.

    python bench/bench_limit.py                        # the table of docs/performance.md
    python bench/bench_limit.py --check-reference
    python bench/bench_limit.py --mode population --check-reference
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "nguyen2019_fig5.mf"


def _point(steps: int, record: int, test: int, seed: int, tau2: float) -> Any:
    import mfdsl

    spec = mfdsl.load(SPEC, overrides=[f"train.steps={steps}", f"record.every={record}", f"data.test={test}"])
    for point in mfdsl.expand(spec):
        if point.coords["seed"] == seed and point.coords["tau2"] == tau2:
            return point
    raise SystemExit(f"no sweep point with seed {seed} and tau2 {tau2}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--mode", choices=("stream", "population"), default="stream", help="the reference (see above)")
    add("--steps", type=int, default=10_000, help="SGD steps (spec: 100000)")
    add("--record", type=int, default=500, help="record every N steps (spec: 1000)")
    add("--test", type=int, default=2000, help="test-set size (spec: 10000)")
    add("--seed", type=int, default=0)
    add("--tau2", type=float, default=0.1)
    add(
        "--ref-particles",
        type=int,
        default=None,
        help="reference particles (stream 2·10^5, population 2·10^4)",
    )
    add("--check-reference", action="store_true", help="integrate the reference again")
    add("--particles", type=int, nargs="+", default=[10_000, 100_000], help="jax rows")
    add("--group", type=int, default=10, help="stream: SGD steps per jax Euler step")
    add("--ref-dt", type=float, default=0.025, help="population: reference dt")
    add("--ref-data-samples", type=int, default=4096, help="population: reference samples per step")
    add("--dt", type=float, default=0.1, help="population: jax dt")
    add("--data-samples", type=int, default=512, help="population: jax samples per step")
    add("--widths", type=int, nargs="+", default=[400, 800, 1600], help="torch rows")
    add("--torch-dtype", default="float32", choices=("float32", "float64"))
    add("--jax-dtype", default="float32", choices=("float32", "float64"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    import jax
    import torch
    from mfdsl_jax._solver import solve
    from mfdsl_torch._single import train

    from mfdsl.data.make import make_dataset
    from mfdsl.plan.compile import compile_point

    point = _point(args.steps, args.record, args.test, args.seed, args.tau2)
    limit_plan = compile_point(point.spec, {**point.coords, "width": math.inf}, "jax")
    dataset = make_dataset(limit_plan.data, limit_plan.seed)
    lr = limit_plan.optimizer.lr
    batch = int(limit_plan.batch)
    print(
        f"# {SPEC.name}, shortened: steps = {args.steps} (t = {lr * args.steps:g}), record every "
        f"{args.record}, test = {args.test}; seed {args.seed}, tau2 = {args.tau2}"
    )
    print(
        f"# machine: {_cpu()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"jax {jax.__version__}, torch {torch.__version__}"
    )
    sys.stdout.flush()

    def run_jax(
        n: int, dt: float, samples: int, *, seed: int | None = None, data: Any = None
    ) -> tuple[np.ndarray, float, str]:
        plan = limit_plan if seed is None else dataclasses.replace(limit_plan, seed=seed)
        start = time.perf_counter()
        result = solve(plan, data or dataset, particles=n, data_samples=samples, dt=dt, dtype=args.jax_dtype)
        wall = time.perf_counter() - start
        assert result.status == "done", result.message
        return result.records["test_loss"], wall, result.attrs["limit_reductions"]

    if args.ref_particles is None:
        # population: the sampling noise of E_Z, not N, limits the reference (see the docs)
        args.ref_particles = 200_000 if args.mode == "stream" else 20_000
    if args.mode == "stream":
        ref_dt, ref_samples = lr, batch
        dt, samples = args.group * lr, args.group * batch
        how = f"Euler dt = {dt:g} ({args.group} SGD steps' examples per step)"
    else:
        ref_dt, ref_samples = args.ref_dt, args.ref_data_samples
        dt, samples = args.dt, args.data_samples
        how = f"Euler dt = {dt:g}, {samples} fresh samples/step"
    ref, ref_wall, reductions = run_jax(args.ref_particles, ref_dt, ref_samples)
    print(
        f"# reference ({args.mode}): jax, {reductions}, N = {args.ref_particles}, Euler dt = {ref_dt:g}, "
        f"{ref_samples} samples per step ({ref_samples / ref_dt:.3g} per unit time), {args.jax_dtype}: "
        f"{ref_wall:.1f} s"
    )
    sys.stdout.flush()
    if args.check_reference:
        data = dataset
        if args.mode == "population":
            data = make_dataset(limit_plan.data, limit_plan.seed + 1)
            data.test_x, data.test_y = dataset.test_x, dataset.test_y  # the same test set
        again, wall, _ = run_jax(args.ref_particles, ref_dt, ref_samples, seed=limit_plan.seed + 1, data=data)
        other = "other particles" + (", an independent training stream" if args.mode == "population" else "")
        print(
            f"# reference again ({other}): {wall:.1f} s, sup-distance to the first {np.max(np.abs(again - ref)):.2e}"
        )
        sys.stdout.flush()

    rows: list[tuple[str, str, np.ndarray, float, float | None]] = []
    for n in args.particles:
        curve, cold, _ = run_jax(n, dt, samples)
        _, warm, _ = run_jax(n, dt, samples)
        exponent = math.log10(n)
        name = f"jax limit, N = 10^{round(exponent)}" if exponent.is_integer() else f"jax limit, N = {n}"
        rows.append((name, f"{how}, {args.jax_dtype}", curve, cold, warm))
        print(f"#   done: {name}: {cold:.1f} s cold, {warm:.1f} s warm")
        sys.stdout.flush()
    for width in args.widths:
        plan = compile_point(point.spec, {**point.coords, "width": width}, "torch")
        start = time.perf_counter()
        result = train(plan, make_dataset(plan.data, plan.seed), dtype=args.torch_dtype)
        wall = time.perf_counter() - start
        settings = f"SGD lr = {lr:g}, batch {plan.batch}, {args.torch_dtype}"
        rows.append((f"torch, width {width}", settings, result.records["test_loss"], wall, None))
        print(f"#   done: torch, width {width}: {wall:.1f} s")
        sys.stdout.flush()

    print()
    print("| run | settings | wall time (s) | sup-distance to the reference |")
    print("|---|---|---:|---:|")
    for name, settings, curve, wall, warm in rows:
        shown = f"{wall:.2f}" + (f" ({warm:.2f} warm)" if warm is not None else "")
        print(f"| {name} | {settings} | {shown} | {np.max(np.abs(curve - ref)):.2e} |")
    widest = rows[-1]
    target = float(np.max(np.abs(widest[2] - ref)))
    print()
    for name, _, curve, wall, _ in rows[: len(args.particles)]:
        dist = float(np.max(np.abs(curve - ref)))
        met = dist <= target and wall <= widest[3] / 20
        print(
            f"{name}: distance {dist:.2e} vs {target:.2e} ({widest[0]}), in 1/{widest[3] / wall:.1f} of its "
            f"time (cold): target {'met' if met else 'NOT met'}"
        )
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
