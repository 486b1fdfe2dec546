"""Execution: the runner (:mod:`~mfdsl.execution.runner`: workers, retries, divergence,
Ctrl-C, --resume) and where the runs go — the local process pool or a Dask cluster
(:mod:`~mfdsl.execution.cluster`) — and what a sweep shows while it runs
(:mod:`~mfdsl.execution.progress`).  The verb is :func:`mfdsl.run`."""
