"""The native step loop's interface (ABI), declared once: the codes of its enums and the
fields of the one struct its entry points take, from which both sides are made.

* C: :func:`header` writes ``_native_abi.h`` (the enums, ``struct mf_args``, the
  layout's fingerprint and its field offsets), which ``_native.c`` includes; the header
  is generated into the build directory and is part of the build's cache key.
* Python: :class:`MfArgs` is the ``ctypes.Structure`` of the same fields, and the
  dictionaries below are what the trainer passes.

A C type maps to its ctypes type by :func:`ctype` alone (pointers are ``c_void_p``:
every pointer of the struct is passed as an address), so the two declarations cannot
drift apart.  :data:`FINGERPRINT` hashes the whole declaration; a compiled library
exports it (``mf_abi_fingerprint_f64`` / ``_f32``) with the struct's size and its
fields' offsets as its compiler laid them out (``mf_abi_layout_…``), and
:func:`check` compares them with this module's before the library is used.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Any

__all__ = [
    "ACCURACY",
    "ACTIVATIONS",
    "COEFS",
    "ENUMS",
    "FIELDS",
    "FINGERPRINT",
    "LOSSES",
    "NCOEF",
    "AbiMismatch",
    "MfArgs",
    "check",
    "ctype",
    "fingerprint",
    "header",
]

#: activation codes (``ACT_…`` in C); the output maps take the same codes
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "piecewise_linear": 2,
    "tanh": 3,
    "sigmoid": 4,
    "erf": 5,
    "gelu": 6,
}

#: the losses (``LOSS_…``)
LOSSES = {"mse": 0, "logistic": 1, "cross_entropy": 2}

#: the accuracy kinds of ``mf_eval`` (``ACC_…``): keyed by the task, ``None`` for none
ACCURACY: dict[str | None, int] = {None: 0, "binary": 1, "multiclass": 2}

#: a step's coefficients per layer, in the order of a row of ``coef`` (``C_…``): c = −η m
#: and the decay factor 1 − η wd (without momentum), the bias's −η_b and decay wd_b, with
#: momentum −η, wd and μ, and the noise scales of the weights and the bias
COEFS = ("c", "factor", "cb", "wd_b", "neg_eta", "wd", "mu", "noise", "noise_b")
#: the length of a layer's row of coefficients (one spare slot, for alignment)
NCOEF = 10

#: the C enums: (prefix, {name: value}); the C name is PREFIX_NAME in upper case
ENUMS: tuple[tuple[str, dict[str, int]], ...] = (
    ("ACT", ACTIVATIONS),
    ("LOSS", LOSSES),
    ("ACC", {"none" if k is None else k: v for k, v in ACCURACY.items()}),
    ("C", {name: i for i, name in enumerate(COEFS)}),
    ("MF", {"ncoef": NCOEF}),
)

#: the fields of ``struct mf_args``, in order: (name, C type, what it holds).  Both
#: entry points take it: ``mf_sgd`` (n steps of one network) and ``mf_eval`` (the test
#: set's loss and correct predictions); each reads the fields it names in its comment.
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("nl", "int32_t", "the number of layers"),
    ("lowest", "int32_t", "sgd: the lowest trainable layer (nl if none)"),
    ("act", "int32_t", "the activation φ (ACT_…)"),
    ("out", "int32_t", "the output map ψ (ACT_IDENTITY, ACT_TANH or ACT_SIGMOID)"),
    ("loss_kind", "int32_t", "the loss (LOSS_…)"),
    ("acc_kind", "int32_t", "eval: the accuracy kind (ACC_…)"),
    ("fin", "const int64_t *", "fin[i]: layer i's fan-in"),
    ("fout", "const int64_t *", "fout[i]: layer i's fan-out"),
    ("W", "REAL **", "W[i]: layer i's weights (fin × fout, row-major)"),
    ("b", "REAL **", "b[i]: layer i's bias (fout) or NULL"),
    ("mult", "const double *", "mult[i]: layer i's forward multiplier"),
    ("trainable", "const int32_t *", "sgd: trainable[i]"),
    ("pl", "const double *", "the piecewise-linear activation's (t1, t2, s1, slope)"),
    ("B", "int64_t", "sgd: the minibatch size"),
    ("n", "int64_t", "sgd: the number of steps; eval: the number of examples"),
    ("rows", "int64_t", "eval: examples go in blocks of this many"),
    ("X", "const REAL *", "the inputs (sgd: n × B × fin[0]; eval: n × fin[0])"),
    ("Y", "const void *", "the targets (REAL) or, for cross-entropy, the labels (int64)"),
    ("coef", "const REAL *", "sgd: coef[(k·nl + i)·NCOEF + C_…] step k's coefficients of layer i"),
    ("VW", "REAL **", "sgd: the weights' momentum buffers, or NULL without momentum"),
    ("VB", "REAL **", "sgd: the biases' momentum buffers, or NULL without momentum"),
    ("gemm", "const int32_t *", "sgd: gemm[i]: layer i's products in the BLAS gemm"),
    ("blas", "void *", "the Fortran BLAS gemm (sgemm_ or dgemm_), or NULL"),
    ("Z", "const REAL *", "sgd: the noise (n × zstride), or NULL without noise"),
    (
        "zoff",
        "const int64_t *",
        "sgd: zoff[2i], zoff[2i+1]: layer i's weight and bias noise offsets (−1: none)",
    ),
    ("zstride", "int64_t", "sgd: the length of a step's row of Z"),
    ("loss", "double *", "sgd: loss[k] ← step k's loss sum, before its update"),
    ("labels", "const void *", "eval: the labels of the accuracy (REAL ±1 or int64)"),
    ("result", "double *", "eval: ← (loss sum, correct predictions)"),
)

_SCALARS: dict[str, Any] = {
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "double": ctypes.c_double,
}


def ctype(c_type: str) -> Any:
    """The ctypes type of a field's C type: its address (``c_void_p``) for a pointer, else
    the scalar's fixed-width type."""
    if "*" in c_type:
        return ctypes.c_void_p
    try:
        return _SCALARS[c_type]
    except KeyError:
        raise ValueError(f"the native ABI has no ctypes type for the C type {c_type!r}") from None


def fingerprint(fields: tuple[tuple[str, str, str], ...] = FIELDS, enums: Any = ENUMS) -> int:
    """A 63-bit hash of the declaration: the fields' names and C types in order and every
    enum's names and values (the comments do not count)."""
    text = "\n".join(f"{name}:{c_type}" for name, c_type, _ in fields)
    text += "\n--\n" + "\n".join(f"{p}_{k}={v}" for p, members in enums for k, v in members.items())
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


#: the fingerprint of this module's declaration
FINGERPRINT = fingerprint()


def header(fields: tuple[tuple[str, str, str], ...] = FIELDS, enums: Any = ENUMS) -> str:
    """The C text of the declaration (``_native_abi.h``); ``REAL`` is the including
    file's precision, which no field's size or offset depends on."""
    lines = [
        "/* generated by mfdsl_torch/_native_abi.py: the native loop's interface; edit it there */",
        "#ifndef MF_NATIVE_ABI_H",
        "#define MF_NATIVE_ABI_H",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        f"#define MF_ABI_FINGERPRINT {fingerprint(fields, enums)}ULL",
        "",
    ]
    for prefix, members in enums:
        body = ", ".join(f"{prefix}_{k.upper()} = {v}" for k, v in members.items())
        lines.append(f"enum {{ {body} }};")
    lines += ["", "struct mf_args {"]
    for name, c_type, doc in fields:
        sep = "" if c_type.endswith("*") else " "
        lines.append(f"    {c_type}{sep}{name}; /* {doc} */")
    lines += ["};", ""]
    offsets = ", ".join(f"offsetof(struct mf_args, {name})" for name, _, _ in fields)
    lines += [
        f"#define MF_ABI_NFIELDS {len(fields)}",
        f"#define MF_ABI_OFFSETS {{{offsets}}}",
        "#endif",
        "",
    ]
    return "\n".join(lines)


class MfArgs(ctypes.Structure):
    """``struct mf_args``, from :data:`FIELDS`."""

    _fields_ = [(name, ctype(c_type)) for name, c_type, _ in FIELDS]


class AbiMismatch(RuntimeError):
    """A compiled native library whose interface is not this module's."""


def check(lib: ctypes.CDLL, path: object = None) -> None:
    """Raise :class:`AbiMismatch` unless both precisions of ``lib`` were compiled from this
    declaration and lay out ``struct mf_args`` as :class:`MfArgs` does."""
    where = f" ({path})" if path is not None else ""
    want = [ctypes.sizeof(MfArgs)] + [getattr(MfArgs, name).offset for name, _, _ in FIELDS]
    for sfx in ("_f64", "_f32"):
        try:
            fp = getattr(lib, "mf_abi_fingerprint" + sfx)
            layout = getattr(lib, "mf_abi_layout" + sfx)
        except AttributeError:
            raise AbiMismatch(
                f"the native library{where} is stale: it exports no ABI fingerprint (built from an "
                "older _native.c)"
            ) from None
        fp.restype, fp.argtypes = ctypes.c_uint64, []
        got = int(fp())
        if got != FINGERPRINT:
            raise AbiMismatch(
                f"the native library{where} is stale: its interface fingerprint {got:#x} is not this "
                f"mfdsl's {FINGERPRINT:#x} (it was built from another version of _native_abi.py)"
            )
        layout.restype, layout.argtypes = ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64]
        buf = (ctypes.c_int64 * len(want))()
        count = int(layout(ctypes.addressof(buf), len(want)))
        have = list(buf)
        if count != len(want) or have != want:
            raise AbiMismatch(
                f"the native library{where} lays out struct mf_args (size, offsets {have[:count]}) unlike "
                f"ctypes does ({want}): the C compiler and ctypes disagree on this platform"
            )
