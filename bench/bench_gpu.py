"""The GPU check, in one short run (under 10 minutes on one GPU): training steps per second
of the torch engine on CUDA against the CPU, with and without CUDA graphs, and the jax
limit on the GPU.

GPU time is scarce, so everything is in this one script, each measurement bounded by a
time budget (``--seconds``), and it prints as it goes.  What it measures, float32:

* **torch, CUDA, eager** — mfdsl's ensemble trainer (``EnsembleTrainer``, the ATen
  path: on CUDA the native loop does not apply), Fig. 5's net (``specs/nguyen2019_fig5.mf``:
  dim 50, 4 hidden ReLU layers), widths 800–6400, batch 1 and 64, 1 and 5 members
  (seeds) — member-steps per second.
* **torch, CUDA graphs** — the same trainer's step captured ``--graph-steps`` steps at a
  time into one ``torch.cuda.CUDAGraph`` and replayed (static input buffers, the chunk
  copied in before each replay): at batch 1 a step is ~45 small kernels, whose launch
  overhead a graph removes.  (The engine itself does not capture graphs yet; this
  measures what they would give.  Valid here because the benchmark's schedule is
  constant: a capture fixes the step's coefficients.)  Checked against eager: the same
  losses to float32 rounding.
* **torch, CPU** — the same networks on this machine's CPU (``native = auto``, torch's
  threads), for the ratio.
* **Langevin noise on the device** — the counter-based noise (``noise = philox``) in
  torch ops, 64 steps a draw as the engine draws it, against torch's ``normal_``:
  normals per second at 10⁴ … 10⁷ entries, and a bit-for-bit check against the numpy
  reference (``mfdsl.core.noise``; on CUDA this checks that division and ``√`` round as
  IEEE says).
* **jax limit, GPU** — ``mfdsl_jax._solver.solve`` on Fig. 5's limit (R1 + R2 + top
  collapse, O(N) state) at N = 10⁴ … 10⁶ particles, Euler dt = 0.01 with 10 samples a
  step: Euler steps per second, compilation timed apart (the first run) from the
  second run.

    python bench/bench_gpu.py                   # on a CUDA machine: the whole check
    python bench/bench_gpu.py --smoke           # tiny sizes; on the CPU when there is no GPU
    python bench/bench_gpu.py --widths 800,1600 --seconds 1
"""

from __future__ import annotations

import argparse
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


def plans_at(width: int, batch: int, members: int, steps: int) -> list[Any]:
    import mfdsl
    from mfdsl.plan.compile import compile_point

    spec = mfdsl.load(
        SPEC,
        overrides=[
            f"train.steps={steps}",
            f"record.every={steps}",
            "data.test=64",
            f"sweep.width=[{width}]",
            f"sweep.seed=0..{members - 1}",
            "sweep.tau2=[0.1]",
            f"train.batch={batch}",
            "torch.dtype=float32",
        ],
    )
    out = []
    for point in mfdsl.expand(spec):
        if point.coords.get("width") != math.inf:
            out.append(compile_point(point.spec, dict(point.coords), "torch"))
    return out


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One ensemble on one device: chunks of ``n`` steps, eagerly or by a CUDA graph."""

    def __init__(self, plans: list[Any], device: str, n: int) -> None:
        import torch
        from mfdsl_torch._ensemble import Ensemble, EnsembleTrainer

        from mfdsl.data.make import make_dataset

        self.torch = torch
        self.device = device
        self.n = n
        ens = Ensemble(plans, device=device, dtype="float32")
        datas = [make_dataset(p.data, p.seed) for p in plans]
        self.trainer = EnsembleTrainer(ens, [str(d.task) for d in datas], 1, lazy=False)
        batch = int(plans[0].batch)
        self.xs, self.ys = self.trainer.prepare_chunk([d.train_chunk(0, n, batch) for d in datas])
        self.graph: Any = None

    def eager(self) -> Any:
        return self.trainer.run(self.xs, self.ys, 0)

    def capture(self) -> None:
        """Capture ``n`` steps (the trainer's own ``_step``) into one graph."""
        torch, t = self.torch, self.trainer
        ens = t.ens
        t._prepare_coefs(0, self.n)
        # the coefficients the graph reads (floats baked in, or device tensors kept alive)
        self.coefs = (t._c, t._factor, t._neg_eta, t._wd, t._cb, t._wd_b, t._mu)
        self.sx, self.sy = self.xs.clone(), self.ys.clone()
        res_shape = (self.n, ens.Ea, t.batch, t.outputs) if t.loss == "mse" else (self.n, ens.Ea)
        self.res = torch.empty(res_shape, device=self.device, dtype=ens.dtype)
        saved = self.save()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up: the allocator and cuBLAS's workspaces
                for k in range(self.n):
                    t._step(self.sx[:, k], self.sy[:, k], k, self.res[k])
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            for k in range(self.n):
                t._step(self.sx[:, k], self.sy[:, k], k, self.res[k])
        self.restore(saved)

    def save(self) -> list[Any]:
        return [w.clone() for w in self.trainer.ens.W]

    def restore(self, saved: list[Any]) -> None:
        with self.torch.no_grad():
            for w, s in zip(self.trainer.ens.W, saved, strict=True):
                w.copy_(s)

    def replay(self) -> Any:
        self.sx.copy_(self.xs)
        self.sy.copy_(self.ys)
        self.graph.replay()
        return self.res


def rate(fn: Any, steps: int, members: int, device: str, seconds: float) -> float:
    """Member-steps per second of ``fn`` (one call = ``steps`` steps of ``members``)."""
    fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        spent = time.perf_counter() - start
        if spent > seconds or (calls >= 3 and spent > seconds / 3 and calls * steps > 2000):
            break
    return calls * steps * members / spent


def torch_section(args: argparse.Namespace, device: str) -> None:
    import torch

    widths = [int(w) for w in args.widths.split(",")]
    print(
        f"\ntorch: Fig. 5's net, float32, member-steps per second (each a best-effort run of about "
        f"{args.seconds:g} s); CPU: native = auto, {torch.get_num_threads()} threads"
    )
    print("| width | batch | members | CPU | CUDA eager | CUDA graphs | graphs / eager | graphs / CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for width in widths:
        for batch in (1, 64) if not args.smoke else (1, 4):
            for members in (1, 5) if not args.smoke else (1, 2):
                n = args.graph_steps if batch == 1 else max(1, args.graph_steps // 8)
                plans = plans_at(width, batch, members, max(n, 2))
                cpu_steps = max(1, min(n, 8))
                cpu = Runner(plans, "cpu", cpu_steps)
                r_cpu = rate(cpu.eager, cpu_steps, members, "cpu", args.seconds)
                del cpu
                if device == "cpu":
                    print(f"| {width} | {batch} | {members} | {r_cpu:.0f} | — | — | — | — |", flush=True)
                    continue
                gpu = Runner(plans, device, n)
                gpu.capture()
                start = gpu.save()  # one chunk each way from the same weights: the same losses
                want = gpu.eager().to("cpu", torch.float64).numpy()
                gpu.restore(start)
                gpu.replay()
                got = _losses(gpu)
                agree = bool(np.allclose(got, want, rtol=1e-3, atol=1e-6))
                r_eager = rate(gpu.eager, n, members, device, args.seconds)
                r_graph = rate(gpu.replay, n, members, device, args.seconds)
                print(
                    f"| {width} | {batch} | {members} | {r_cpu:.0f} | {r_eager:.0f} | {r_graph:.0f} | "
                    f"{r_graph / r_eager:.2f}× | {r_graph / r_cpu:.2f}× |"
                    + ("" if agree else " (graph losses differ!)"),
                    flush=True,
                )
                del gpu
                torch.cuda.empty_cache()


def _losses(runner: Runner) -> np.ndarray:
    """The minibatch losses of the graph's last replay, scaled as ``EnsembleTrainer.run``
    scales them."""
    t = runner.trainer
    res = runner.res
    loss = (res * res).sum(dim=(2, 3)) if t.loss == "mse" else res
    return (loss * t._loss_scale())[:, : t.ens.E].to("cpu").double().numpy()


def noise_section(args: argparse.Namespace, device: str) -> None:
    import torch
    from mfdsl_torch._noise import torch_normal

    from mfdsl.core import noise

    key = noise.key(0)
    print(f"\nLangevin noise on {device}: normals per second (float32), the counter-based noise in torch ops")
    for np_dt, dt in ((np.float32, torch.float32), (np.float64, torch.float64)):
        got = torch_normal(key, 3, 7, 4, 10_001, dt, device).cpu().numpy()
        same = bool(np.array_equal(got, noise.normal(key, 3, 7, 4, 10_001, np_dt)))
        print(f"  {dt}: equal to the numpy reference bit for bit: {same}")
    sizes = (10_000, 100_000, 1_000_000, 10_000_000) if not args.smoke else (1000,)
    for n in sizes:
        steps = max(1, min(64, (1 << 20) // n))
        buf = torch.empty(n, device=device)

        def philox(n: int = n, steps: int = steps) -> None:
            torch_normal(key, 0, 0, steps, n, torch.float32, device)

        def normal(buf: torch.Tensor = buf, steps: int = steps) -> None:
            for _ in range(steps):
                buf.normal_()

        rates = {}
        for name, fn in (("philox", philox), ("torch normal_", normal)):
            fn()
            _sync(device)
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                fn()
                calls += 1
            _sync(device)
            rates[name] = calls * steps * n / (time.perf_counter() - start)
        print(
            f"  {n} entries ({steps} steps a draw): philox {rates['philox']:.3g}/s, "
            f"torch normal_ {rates['torch normal_']:.3g}/s",
            flush=True,
        )


def jax_section(args: argparse.Namespace) -> None:
    try:
        import jax
        from mfdsl_jax._solver import solve
    except ImportError as exc:
        print(f"\njax limit: skipped ({exc})")
        return
    import mfdsl
    from mfdsl.data.make import make_dataset
    from mfdsl.plan.compile import compile_point

    platform_name = jax.devices()[0].platform
    steps = args.jax_steps
    spec = mfdsl.load(
        SPEC, overrides=[f"train.steps={steps}", f"record.every={steps // 4}", "data.test=2000"]
    )
    point = next(p for p in mfdsl.expand(spec) if p.coords["seed"] == 0 and p.coords["tau2"] == 0.1)
    plan = compile_point(point.spec, {**point.coords, "width": math.inf}, "jax")
    data = make_dataset(plan.data, plan.seed)
    lr = plan.optimizer.lr
    dt, samples = 10 * lr, 10
    euler = round(steps * lr / dt)
    print(
        f"\njax limit on {platform_name} ({jax.devices()[0].device_kind}): Fig. 5, {steps} SGD steps' time "
        f"(t = {steps * lr:g}), Euler dt = {dt:g} with {samples} samples a step ({euler} Euler steps), float32"
    )
    print("| particles | first run (s, compile included) | second run (s) | Euler steps / s |")
    print("|---:|---:|---:|---:|")
    for n in [int(x) for x in args.particles.split(",")]:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            result = solve(plan, data, particles=n, data_samples=samples, dt=dt, dtype="float32")
            times.append(time.perf_counter() - start)
            assert result.status == "done", result.message
        print(f"| {n} | {times[0]:.2f} | {times[1]:.2f} | {euler / times[1]:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="800,1600,3200,6400")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per measurement")
    parser.add_argument("--graph-steps", type=int, default=32, help="steps per CUDA graph (batch 1)")
    parser.add_argument("--particles", default="10000,100000,1000000")
    parser.add_argument("--jax-steps", type=int, default=10000, help="SGD steps' worth of limit time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (on the CPU without a GPU)")
    parser.add_argument("--only", default="torch,noise,jax")
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.seconds, args.graph_steps = "8,16", 0.05, 4
        args.particles, args.jax_steps = "200", 40

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    print(
        f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), GPU: {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    if device == "cpu" and not args.smoke:
        print("no CUDA GPU here: the CUDA rows are left out (run with --smoke for a CPU-only smoke test)")
    sys.stdout.flush()
    only = set(args.only.split(","))
    if "torch" in only:
        torch_section(args, device)
    if "noise" in only:
        noise_section(args, device)
    if "jax" in only:
        jax_section(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
