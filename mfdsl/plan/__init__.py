"""Planning: one sweep point → a backend-neutral :class:`RunPlan`
(:mod:`~mfdsl.plan.compile`: each scaling's per-layer multipliers, side by side for the
finite network and the limit; :mod:`~mfdsl.plan.types`), the store layout of a sweep
(:mod:`~mfdsl.plan.layout`), the checks before a run (:mod:`~mfdsl.plan.check`, with the
science checks of :mod:`~mfdsl.plan.diagnose`) and its resource estimate
(:mod:`~mfdsl.plan.estimate`)."""

from mfdsl.plan.compile import compile_point, limit_problem
from mfdsl.plan.layout import Layout, Task, plan_tasks
from mfdsl.plan.types import RunPlan

__all__ = ["Layout", "RunPlan", "Task", "compile_point", "limit_problem", "plan_tasks"]
