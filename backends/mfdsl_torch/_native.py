"""The native step loop (``_native.c``): built with the system's C compiler on first use.

A batch-1 SGD step of a small network is a few microseconds of arithmetic but some 45
ATen calls of ~4 µs each; the C loop runs a whole chunk of steps of one network in one
call.  It covers SGD and Langevin steps on the CPU, with momentum and weight decay, with
every activation, loss and output map the plans name (the Langevin noise is drawn by
the caller, exactly as the ATen path draws it — by this library's counter-based
generator, ``_noise.c``, or from torch's — and passed in); CUDA trains on ATen ops, and
``EnsembleTrainer`` decides which.

Each layer runs in one of two ways (:func:`choose_gemm`, a cost model measured on this
machine class, ``docs/performance.md``): *rows*, where a step is memory-bound (small
minibatches: each weight row read once forward and read and written once backward), or
*gemm*, where it is bound by its matrix products (larger minibatches: three calls of
the BLAS gemm that ATen itself uses, MKL's ``sgemm_``/``dgemm_``, found in torch's own
library by :func:`blas`).

The library is compiled once per source, compiler and CPU into the cache directory
(``$MFDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/mfdsl``, else ``~/.cache/mfdsl``), with
``-O3 -march=native``, and renamed into place atomically, so concurrent workers may
race to build it.  Its interface is declared once, in :mod:`._native_abi` (the C header
is generated from it at build time and is part of the cache key); a loaded library must
report that declaration's fingerprint and struct layout (:func:`._native_abi.check`).  A
cached build that does not (a stale or damaged file under the right key) is rebuilt
transparently, once; a fresh build that still disagrees is refused with the reason.  Without a working compiler :func:`library` returns ``None`` and
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
from typing import Any

import numpy as np
import torch

from mfdsl.plugin import PL_S1, PL_SLOPE, PL_T1, PL_T2, noise

from . import _native_abi as abi
from ._native_abi import ACCURACY, ACTIVATIONS, COEFS, LOSSES, NCOEF, MfArgs

__all__ = [
    "ACCURACY",
    "ACTIVATIONS",
    "COEFS",
    "LOSSES",
    "MODES",
    "NCOEF",
    "OUTPUTS",
    "blas",
    "choose_gemm",
    "evaluate",
    "library",
    "member_blas_threads",
    "run_member",
    "set_blas_threads",
    "unavailable_reason",
]

_SOURCE = Path(__file__).with_name("_native.c")
#: the counter-based noise (:mod:`mfdsl.plugin.noise`'s definition), compiled apart
_NOISE_SOURCE = Path(__file__).with_name("_noise.c")
_FLAGS = ("-O3", "-fPIC", "-std=c11")
#: the noise rounds every operation alone, as numpy and torch do (no contraction to FMAs);
#: √ sets no errno, so that it vectorises
_NOISE_FLAGS = ("-ffp-contract=off", "-fno-fast-math", "-fno-math-errno")
#: tried in order: the host's vector units where the compiler knows the flag
_ARCH_FLAGS = (("-march=native",), ())

#: the values of the ``native`` option: ``auto`` (rows or gemm per layer, by
#: :func:`choose_gemm`), ``rows``, ``gemm`` (every layer one way), ``off`` (ATen ops)
MODES = ("auto", "rows", "gemm", "off")

#: the piecewise-linear activation's (t1, t2, s1, slope)
_PL = (PL_T1, PL_T2, PL_S1, PL_SLOPE)

#: the output maps of _native.c (they take the activations' codes)
OUTPUTS = ("identity", "tanh", "sigmoid")

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


def _build(cc: str, out: Path, header: str | None = None, flags: tuple[str, ...] | None = None) -> None:
    """Compile ``_native.c`` with the interface ``header`` (:func:`._native_abi.header`'s
    by default) and ``flags`` (:data:`_FLAGS`) into ``out``, atomically."""
    flags = _FLAGS if flags is None else flags
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        Path(tmp, "_native_abi.h").write_text(abi.header() if header is None else header)
        Path(tmp, "_noise_consts.h").write_text(noise.c_header())
        for arch in _ARCH_FLAGS:
            try:
                objs = []
                for real, sfx in (("double", "_f64"), ("float", "_f32")):
                    obj = Path(tmp) / f"native{sfx}.o"
                    _cc(
                        [
                            cc,
                            *flags,
                            *arch,
                            f"-I{tmp}",
                            f"-DREAL={real}",
                            f"-DSFX={sfx}",
                            "-c",
                            str(_SOURCE),
                            "-o",
                            str(obj),
                        ]
                    )
                    objs.append(str(obj))
                obj = Path(tmp) / "noise.o"
                _cc([cc, *flags, *arch, *_NOISE_FLAGS, f"-I{tmp}", "-c", str(_NOISE_SOURCE), "-o", str(obj)])
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


def _key(cc: str) -> str:
    """The cache key of a build: everything the library's code depends on."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    parts = [
        _SOURCE.read_text(),
        abi.header(),
        _NOISE_SOURCE.read_text(),
        noise.c_header(),
        version,
        " ".join(_FLAGS + _NOISE_FLAGS),
        _cpu_id(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _open(path: Path) -> ctypes.CDLL:
    """Load a build and check its interface (:class:`._native_abi.AbiMismatch` if stale)."""
    lib = ctypes.CDLL(str(path))
    abi.check(lib, path)
    for sfx in ("_f64", "_f32"):
        for name in ("mf_sgd", "mf_eval"):
            fn = getattr(lib, name + sfx)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(MfArgs)]
    try:
        for sfx in ("_f64", "_f32"):
            fn = getattr(lib, "mf_normal" + sfx)
            fn.restype = None
            fn.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint64]
            fn.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
        lib.mf_philox4x32.restype = None
        lib.mf_philox4x32.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p]
    except AttributeError:
        raise abi.AbiMismatch(
            f"the native library ({path}) is stale: it has no counter-based noise"
        ) from None
    return lib


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    path = _cache_dir() / f"native-{_key(cc)}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(cc, path)
        except OSError:
            # an unwritable cache directory: build for this process alone
            path = Path(tempfile.mkdtemp(prefix="mfdsl-native-")) / path.name
            _build(cc, path)
    try:
        return _open(path)
    except abi.AbiMismatch:
        pass
    # A stale build under this key: rebuild it.  The fresh one is loaded from a name of
    # its own (the loader would hand back the stale library for the old path), then
    # replaces the stale file for later processes where the cache is writable.
    fresh = Path(tempfile.mkdtemp(prefix="mfdsl-native-")) / path.name
    _build(cc, fresh)
    try:
        lib = _open(fresh)
    except abi.AbiMismatch as exc:
        raise RuntimeError(f"{exc}; a fresh build disagrees too, so it is not used") from None
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        shutil.copyfile(fresh, tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    shutil.rmtree(fresh.parent, ignore_errors=True)
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


_blas: dict[bool, int | None] = {}


def blas(f64: bool) -> int | None:
    """The address of the Fortran BLAS gemm (``dgemm_`` or ``sgemm_``, 32-bit integers)
    that ATen's CPU matrix products call — MKL's, exported by torch's own library — or
    ``None`` where torch has none (then :func:`choose_gemm`'s gemm layers run on ATen
    ops instead).  ``MFDSL_NATIVE_BLAS=0`` hides it (for tests)."""
    with _lock:
        if f64 not in _blas:
            _blas[f64] = None if os.environ.get("MFDSL_NATIVE_BLAS", "1") == "0" else _find_blas(f64)
        return _blas[f64]


def _torch_cpu() -> ctypes.CDLL | None:
    """torch's CPU library (loaded already), where it exports MKL's functions."""
    if not torch.backends.mkl.is_available():
        return None
    libdir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = libdir / name
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def _find_blas(f64: bool) -> int | None:
    lib = _torch_cpu()
    if lib is None:
        return None
    try:
        fn = getattr(lib, "dgemm_" if f64 else "sgemm_")
        _ = lib.MKL_Set_Num_Threads_Local  # the BLAS's threads must be settable too
    except AttributeError:
        return None
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    return int(addr) if addr else None


def set_blas_threads(n: int) -> int:
    """Set the calling thread's BLAS thread count (``0``: torch's), returning the one
    set before; the gemm layers' results depend on it, so a member's calls always run
    with the count :func:`member_blas_threads` gives.  A no-op (returning 0) where
    :func:`blas` is ``None``."""
    global _set_local
    if _set_local is None:
        lib = _torch_cpu() if (blas(True) or blas(False)) else None
        if lib is None:
            return 0
        fn = lib.MKL_Set_Num_Threads_Local
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int]
        _set_local = fn
    return int(_set_local(int(n)))


_set_local: Any = None


#: a member's gemm calls use torch's threads where its largest layer's product takes at
#: least this many flops a step (2 · batch · fan_in · fan_out), else one thread, and
#: members then run side by side on torch's threads
GEMM_THREADED_FLOPS = 1 << 24


def member_blas_threads(shapes: list[tuple[int, int]], gemm: list[bool], batch: int, threads: int) -> int:
    """The BLAS threads of one member's gemm calls: a function of its shapes, so that a
    member computes the same numbers whatever the ensemble (1: members in parallel)."""
    flops = max((2 * batch * fi * fo for (fi, fo), g in zip(shapes, gemm, strict=True) if g), default=0)
    return threads if flops >= GEMM_THREADED_FLOPS else 1


#: at batch 1 a layer runs in gemm mode when its rows are long (at least this many
#: bytes) and it is small (at most GEMM_MAX_BYTES: in cache, where the BLAS's kernels
#: beat the row loops' per-row costs), in rows mode otherwise (short rows: the BLAS's
#: per-call cost dominates; large layers: the rows' three passes beat the BLAS's four,
#: or its three in row blocks), and always with ReLU (the rows of units that are off
#: are skipped); at larger batches every layer runs in gemm mode (the BLAS does the
#: batch's multiply-adds several times faster).  Measured, docs/performance.md.
GEMM_MIN_ROW_BYTES = 512
GEMM_MAX_BYTES = 1 << 20
#: at batch 1, plain SGD and an activation other than ReLU, a network with a layer of more
#: than this many bytes trains on ATen's ops instead, whose lazy updates read its weights
#: twice a step where the rows read them twice and write them once (measured: 6–16 %
#: faster at 41 MB layers, float32; the rows faster at 10 MB)
ATEN_LAZY_MIN_BYTES = 32 << 20


def choose_gemm(shapes: list[tuple[int, int]], batch: int, f64: bool, activation: str = "") -> list[bool]:
    """Per layer ``(fan_in, fan_out)``, whether its step runs in gemm mode (else rows),
    for this minibatch size, precision and activation: the cost model above."""
    item = 8 if f64 else 4
    if batch == 1 and activation == "relu":
        return [False] * len(shapes)
    return [
        batch > 1 or (fo * item >= GEMM_MIN_ROW_BYTES and fi * fo * item <= GEMM_MAX_BYTES)
        for fi, fo in shapes
    ]


class MemberArgs:
    """The fixed arguments of one member's calls: shapes and pointers into the
    ensemble's tensors (which stay put: the trainer allocates them once), the layers'
    modes and the layout of the noise in a step's row of ``Z``, in the ``struct
    mf_args`` the calls pass (:attr:`struct`; :func:`run_member` sets a chunk's fields,
    so one member's calls run one at a time, as its in-place updates require anyway)."""

    __slots__ = (
        "B",
        "VB",
        "VW",
        "W",
        "act",
        "b",
        "blas",
        "fin",
        "fout",
        "gemm",
        "keep",
        "loss",
        "lowest",
        "mult",
        "nl",
        "out",
        "pl",
        "struct",
        "trainable",
        "zoff",
        "zstride",
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
        *,
        gemm: list[bool] | None = None,
        blas: int | None = None,
        zoff: np.ndarray | None = None,
        zstride: int = 0,
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
        self.gemm = np.array(gemm if gemm is not None else [False] * self.nl, np.int32)
        if self.gemm.any() and not blas:
            raise ValueError("gemm layers need a BLAS gemm")
        self.blas = blas
        self.zoff = (
            np.full(2 * self.nl, -1, np.int64) if zoff is None else np.ascontiguousarray(zoff, np.int64)
        )
        self.zstride = int(zstride)
        self.VW: np.ndarray | None = None
        self.VB: np.ndarray | None = None
        if vW is not None and vb is not None:
            for v in vW:
                if v is not None and not v.is_contiguous():
                    raise ValueError("the native step loop needs contiguous momentum buffers")
            self.VW = np.array([0 if v is None else v.data_ptr() for v in vW], np.uintp)
            self.VB = np.array([0 if v is None else v.data_ptr() for v in vb], np.uintp)
        self.keep = (W, b, vW, vb)  # the tensors must outlive the pointers
        self.struct = MfArgs(
            nl=self.nl,
            lowest=self.lowest,
            act=self.act,
            out=self.out,
            loss_kind=self.loss,
            fin=self.fin.ctypes.data,
            fout=self.fout.ctypes.data,
            W=self.W.ctypes.data,
            b=self.b.ctypes.data,
            mult=self.mult.ctypes.data,
            trainable=self.trainable.ctypes.data,
            pl=self.pl.ctypes.data,
            B=self.B,
            VW=None if self.VW is None else self.VW.ctypes.data,
            VB=None if self.VB is None else self.VB.ctypes.data,
            gemm=self.gemm.ctypes.data,
            blas=self.blas,
            zoff=self.zoff.ctypes.data,
            zstride=self.zstride,
        )


def run_member(
    lib: ctypes.CDLL,
    args: MemberArgs,
    x: torch.Tensor,
    y: torch.Tensor,
    coef: np.ndarray,
    loss: np.ndarray,
    z: torch.Tensor | None = None,
) -> None:
    """``n`` steps of one member on its chunk ``x`` ``(n, B, d)``, ``y`` ``(n, B, K)``
    (contiguous, the weights' dtype; int64 labels ``(n, B)`` for cross-entropy);
    ``coef`` ``(n, nl, NCOEF)`` the steps' coefficients (:data:`COEFS`) in the weights'
    dtype; ``z`` ``(n, zstride)`` the steps' noise (laid out as ``args.zoff`` says) or
    ``None``; ``loss`` ``(n,)`` float64 takes each step's loss sum
    (``EnsembleTrainer._loss_scale`` makes it the batch mean)."""
    f64 = x.dtype == torch.float64
    fn = lib.mf_sgd_f64 if f64 else lib.mf_sgd_f32
    n = int(x.shape[0])
    if not (x.is_contiguous() and y.is_contiguous() and coef.flags.c_contiguous and loss.flags.c_contiguous):
        raise ValueError("the native step loop needs contiguous chunks")
    if coef.shape[0] != n or loss.shape[0] != n:
        raise ValueError("coef and loss must have one row per step")
    if z is not None and (not z.is_contiguous() or tuple(z.shape) != (n, args.zstride)):
        raise ValueError(f"the noise must be a contiguous ({n}, {args.zstride}) tensor")
    st = args.struct
    st.n = n
    st.X = x.data_ptr()
    st.Y = y.data_ptr()
    st.coef = coef.ctypes.data
    st.Z = None if z is None else z.data_ptr()
    st.loss = loss.ctypes.data
    rc = fn(st)
    if rc == -2:
        raise ValueError("the native step loop got gemm layers but no BLAS gemm")
    if rc != 0:
        raise MemoryError("the native step loop could not allocate its scratch memory")


def evaluate(
    W: list[torch.Tensor],
    b: list[torch.Tensor | None],
    mult: list[float],
    act: str,
    out: str,
    loss: str,
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    task: str,
    rows: int,
) -> tuple[float, float] | None:
    """The test set's loss sum and number of correct predictions by the native loop's
    forward pass (its products in the BLAS gemm), or ``None`` where it cannot (no
    library, no BLAS, not the CPU, an activation or loss it does not know)."""
    lib = library()
    f64 = x.dtype == torch.float64
    gemm = blas(f64)
    if (
        lib is None
        or gemm is None
        or x.device.type != "cpu"
        or act not in ACTIVATIONS
        or out not in OUTPUTS
        or loss not in LOSSES
        or not all(t.is_contiguous() for t in (x, y, *W))
    ):
        return None
    kind = ACCURACY.get(task if labels is not None else None, 0)
    if labels is not None and not labels.is_contiguous():
        return None
    fin = np.array([w.shape[0] for w in W], np.int64)
    fout = np.array([w.shape[1] for w in W], np.int64)
    ptr_w = np.array([w.data_ptr() for w in W], np.uintp)
    ptr_b = np.array([0 if t is None else t.data_ptr() for t in b], np.uintp)
    mults = np.array(mult, np.float64)
    pl = np.array(_PL, np.float64)
    result = np.zeros(2, np.float64)
    fn = lib.mf_eval_f64 if f64 else lib.mf_eval_f32
    st = MfArgs(
        nl=len(W),
        act=ACTIVATIONS[act],
        out=ACTIVATIONS[out],
        loss_kind=LOSSES[loss],
        acc_kind=kind,
        fin=fin.ctypes.data,
        fout=fout.ctypes.data,
        W=ptr_w.ctypes.data,
        b=ptr_b.ctypes.data,
        mult=mults.ctypes.data,
        pl=pl.ctypes.data,
        n=int(x.shape[0]),
        rows=int(rows),
        X=x.data_ptr(),
        Y=y.data_ptr(),
        labels=None if labels is None else labels.data_ptr(),
        blas=gemm,
        result=result.ctypes.data,
    )
    rc = fn(st)
    if rc != 0:
        raise MemoryError("the native evaluation could not allocate its scratch memory")
    return float(result[0]), float(result[1])
