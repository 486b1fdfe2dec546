"""Analysis: reading a store back — the summary ``mfdsl report`` prints (final values,
spreads, fitted rates to the limit), and the figures ``mfdsl plot`` draws.

Public names: :func:`summarize`, :func:`fit_rate` and :class:`Rate`, :func:`open_results`,
:data:`STATUS`; :func:`plot_store`, :func:`figure` and :func:`width_colours` (the house
style of mfdsl's figures, for figures of one's own, as ``validation/run.py`` draws).
"""

from mfdsl.analysis.plot import PlotError, figure, plot_store, width_colours
from mfdsl.analysis.report import STATUS, Rate, StoreError, fit_rate, open_results, summarize

__all__ = [
    "STATUS",
    "PlotError",
    "Rate",
    "StoreError",
    "figure",
    "fit_rate",
    "open_results",
    "plot_store",
    "summarize",
    "width_colours",
]
