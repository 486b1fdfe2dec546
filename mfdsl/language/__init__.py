"""The language: a ``.mf`` (or YAML) spec → a checked, frozen IR.

:mod:`~mfdsl.language.syntax` parses with the Lark grammar (``grammars/mfdsl.lark``),
:mod:`~mfdsl.language.build` checks the tree into the IR (:mod:`~mfdsl.language.ir`,
frozen keyword-only dataclasses that keep their source positions) against the declared
options (:mod:`~mfdsl.language.options`) and expressions (:mod:`~mfdsl.language.expr`);
:mod:`~mfdsl.language.load` reads files, YAML and ``--set`` overrides;
:mod:`~mfdsl.language.expand` expands the sweep into concrete points;
:mod:`~mfdsl.language.fmt` formats a spec.  Public: :func:`load`, :func:`parse`,
:func:`expand`.
"""

from mfdsl.language.expand import Point, expand
from mfdsl.language.load import load, parse

__all__ = ["Point", "expand", "load", "parse"]
