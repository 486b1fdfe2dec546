"""The native step loop (``_native.c``): built with the system's C compiler on first use.

A batch-1 SGD step of a small network is a few microseconds of arithmetic but some 45
ATen calls of ~4 µs each; the C loop runs a whole chunk of steps of one network in one
call.  It covers SGD on the CPU, with momentum and weight decay, with every activation,
loss and output map the plans name; Langevin noise (drawn from torch generators) and
CUDA train on ATen ops, and ``EnsembleTrainer`` decides which.

The library is compiled once per source, compiler and CPU into the cache directory
(``$MFDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/mfdsl``, else ``~/.cache/mfdsl``), with
``-O3 -march=native``, and renamed into place atomically, so concurrent workers may
race to build it.  Without a working compiler :func:`library` returns ``None`` and
says why once (a warning); the ATen path then runs, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ACTIVATIONS",
    "COEFS",
    "LOSSES",
    "NCOEF",
    "OUTPUTS",
    "library",
    "run_member",
    "unavailable_reason",
]

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ("-O3", "-fPIC", "-std=c11")
#: tried in order: the host's vector units where the compiler knows the flag
_ARCH_FLAGS = (("-march=native",), ())

#: a step's coefficients per layer (the C_… fields of _native.c)
COEFS = ("c", "factor", "cb", "wd_b", "neg_eta", "wd", "mu")
NCOEF = 8

#: the losses and output maps of _native.c
LOSSES = {"mse": 0, "logistic": 1, "cross_entropy": 2}
OUTPUTS = ("identity", "tanh", "sigmoid")

#: activation codes of _native.c (the output maps take the same codes)
ACTIVATIONS = {
    "identity": 0,
    "relu": 1,
    "piecewise_linear": 2,
    "tanh": 3,
    "sigmoid": 4,
    "erf": 5,
    "gelu": 6,
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cache_dir() -> Path:
    if os.environ.get("MFDSL_CACHE_DIR"):
        return Path(os.environ["MFDSL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mfdsl"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(cc: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for arch in _ARCH_FLAGS:
            try:
                objs = []
                for real, sfx in (("double", "_f64"), ("float", "_f32")):
                    obj = Path(tmp) / f"native{sfx}.o"
                    _cc(
                        [
                            cc,
                            *_FLAGS,
                            *arch,
                            f"-DREAL={real}",
                            f"-DSFX={sfx}",
                            "-c",
                            str(_SOURCE),
                            "-o",
                            str(obj),
                        ]
                    )
                    objs.append(str(obj))
                lib = Path(tmp) / "native.so"
                _cc([cc, "-shared", *objs, "-o", str(lib), "-lm"])
            except subprocess.CalledProcessError:
                if arch == _ARCH_FLAGS[-1]:
                    raise
                continue
            os.replace(lib, out)
            return


def _cc(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), version, " ".join(_FLAGS), _cpu_id()]).encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"native-{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(cc, path)
        except OSError:
            # an unwritable cache directory: build for this process alone
            path = Path(tempfile.mkdtemp(prefix="mfdsl-native-")) / path.name
            _build(cc, path)
    lib = ctypes.CDLL(str(path))
    for sfx in ("_f64", "_f32"):
        fn = getattr(lib, "mf_sgd" + sfx)
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_int,  # nl
            ctypes.c_void_p,  # fin
            ctypes.c_void_p,  # fout
            ctypes.c_void_p,  # W
            ctypes.c_void_p,  # b
            ctypes.c_void_p,  # mult
            ctypes.c_void_p,  # trainable
            ctypes.c_int,  # lowest
            ctypes.c_int,  # act
            ctypes.c_int,  # out
            ctypes.c_int,  # loss_kind
            ctypes.c_void_p,  # pl
            ctypes.c_int64,  # B
            ctypes.c_int64,  # n
            ctypes.c_void_p,  # X
            ctypes.c_void_p,  # Y
            ctypes.c_void_p,  # coef
            ctypes.c_void_p,  # VW
            ctypes.c_void_p,  # VB
            ctypes.c_void_p,  # loss
        ]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled step loop, or ``None`` (with a warning, once) when it cannot be
    built here; ``MFDSL_NATIVE=0`` turns it off for the process."""
    global _lib, _reason, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("MFDSL_NATIVE", "1") == "0":
                _reason = "MFDSL_NATIVE=0"
            else:
                try:
                    _lib = _load()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", None) or str(exc)
                    _reason = f"the native step loop could not be built: {str(detail).strip()[:400]}"
                    warnings.warn(
                        f"mfdsl torch backend: {_reason}. Training falls back to ATen ops, which are "
                        "several times slower for small batches; install a C compiler (e.g. gcc) to "
                        "speed it up, or set torch { native = off } to silence this",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return _lib


def unavailable_reason() -> str | None:
    """Why :func:`library` is ``None`` (after it was called), else ``None``."""
    return _reason


class MemberArgs:
    """The fixed arguments of one member's calls: shapes and pointers into the
    ensemble's tensors (which stay put: the trainer allocates them once)."""

    __slots__ = (
        "B",
        "VB",
        "VW",
        "W",
        "act",
        "b",
        "fin",
        "fout",
        "keep",
        "loss",
        "lowest",
        "mult",
        "nl",
        "out",
        "pl",
        "trainable",
    )

    def __init__(
        self,
        W: list[torch.Tensor],
        b: list[torch.Tensor | None],
        mult: list[float],
        trainable: list[bool],
        lowest: int,
        act: str,
        out: str,
        loss: str,
        pl: tuple[float, float, float, float],
        batch: int,
        vW: list[torch.Tensor | None] | None = None,
        vb: list[torch.Tensor | None] | None = None,
    ) -> None:
        for w in W:
            if not w.is_contiguous():
                raise ValueError("the native step loop needs contiguous weight matrices")
        self.nl = len(W)
        self.fin = np.array([w.shape[0] for w in W], np.int64)
        self.fout = np.array([w.shape[1] for w in W], np.int64)
        self.W = np.array([w.data_ptr() for w in W], np.uintp)
        self.b = np.array([0 if x is None else x.data_ptr() for x in b], np.uintp)
        self.mult = np.array(mult, np.float64)
        self.trainable = np.array(trainable, np.int32)
        self.lowest = int(lowest)
        self.act = ACTIVATIONS[act]
        self.out = ACTIVATIONS[out]
        self.loss = LOSSES[loss]
        self.pl = np.array(pl, np.float64)
        self.B = int(batch)
        self.VW: np.ndarray | None = None
        self.VB: np.ndarray | None = None
        if vW is not None and vb is not None:
            for v in vW:
                if v is not None and not v.is_contiguous():
                    raise ValueError("the native step loop needs contiguous momentum buffers")
            self.VW = np.array([0 if v is None else v.data_ptr() for v in vW], np.uintp)
            self.VB = np.array([0 if v is None else v.data_ptr() for v in vb], np.uintp)
        self.keep = (W, b, vW, vb)  # the tensors must outlive the pointers


def run_member(
    lib: ctypes.CDLL,
    args: MemberArgs,
    x: torch.Tensor,
    y: torch.Tensor,
    coef: np.ndarray,
    loss: np.ndarray,
) -> None:
    """``n`` steps of one member on its chunk ``x`` ``(n, B, d)``, ``y`` ``(n, B, K)``
    (contiguous, the weights' dtype; int64 labels ``(n, B)`` for cross-entropy); ``c``,
    ``coef`` ``(n, nl, NCOEF)`` the steps' coefficients (:data:`COEFS`) in the weights'
    dtype; ``loss`` ``(n,)`` float64 takes each
    step's loss sum (``EnsembleTrainer._loss_scale`` makes it the batch mean)."""
    f64 = x.dtype == torch.float64
    fn = lib.mf_sgd_f64 if f64 else lib.mf_sgd_f32
    n = int(x.shape[0])
    if not (x.is_contiguous() and y.is_contiguous() and coef.flags.c_contiguous):
        raise ValueError("the native step loop needs contiguous chunks")
    rc = fn(
        args.nl,
        args.fin.ctypes.data,
        args.fout.ctypes.data,
        args.W.ctypes.data,
        args.b.ctypes.data,
        args.mult.ctypes.data,
        args.trainable.ctypes.data,
        args.lowest,
        args.act,
        args.out,
        args.loss,
        args.pl.ctypes.data,
        args.B,
        n,
        x.data_ptr(),
        y.data_ptr(),
        coef.ctypes.data,
        None if args.VW is None else args.VW.ctypes.data,
        None if args.VB is None else args.VB.ctypes.data,
        loss.ctypes.data,
    )
    if rc != 0:
        raise MemoryError("the native step loop could not allocate its scratch memory")
