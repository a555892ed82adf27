"""Loads the compiled extension ``bmc_fast._C`` and decides, per call, kernel or reference.

``import bmc_fast`` imports it first (so that ``torch.ops.bmc_fast`` exists before any op
wrapper registers its fake kernel), and the op wrappers, the backbone's fused paths and the
expert trainer read :data:`HAVE_EXTENSION` from it. A missing or mismatched ``_C`` is not an
import error (unless ``BMC_FAST_REQUIRE_EXTENSION=1``): it warns once, every op runs its
pure-PyTorch reference, and the fused paths report themselves unavailable.
"""
from __future__ import annotations

import os
import warnings

import torch

_C = None
LOAD_ERROR: BaseException | None = None
try:
    from . import _C  # noqa: F811  (registers torch.ops.bmc_fast.*)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    LOAD_ERROR = exc

REQUIRE = os.environ.get("BMC_FAST_REQUIRE_EXTENSION", "") not in ("", "0")

if _C is not None:
    _built = _C.torch_version().split("+")[0].split(".")[:2]
    _running = torch.__version__.split("+")[0].split(".")[:2]
    if _built != _running:
        LOAD_ERROR = ImportError(
            f"bmc_fast._C was built against torch {_C.torch_version()} but torch {torch.__version__} "
            "is installed: rebuild with `pip install --no-build-isolation .`"
        )
        _C = None
    elif _C.cuda_built() and torch.version.cuda is not None:
        if _C.cuda_version().split(".")[0] != torch.version.cuda.split(".")[0]:
            LOAD_ERROR = ImportError(
                f"bmc_fast._C was built with CUDA {_C.cuda_version()} but torch uses CUDA "
                f"{torch.version.cuda}: rebuild with `pip install --no-build-isolation .`"
            )
            _C = None

HAVE_EXTENSION = _C is not None
CUDA_BUILT = bool(_C is not None and _C.cuda_built())

if not HAVE_EXTENSION:
    if REQUIRE:
        raise ImportError(
            f"bmc_fast: the compiled extension is required (BMC_FAST_REQUIRE_EXTENSION=1) but "
            f"could not be loaded: {LOAD_ERROR}"
        ) from LOAD_ERROR
    warnings.warn(
        f"bmc_fast: the compiled extension could not be loaded ({LOAD_ERROR}); every loss runs its "
        "slow pure-PyTorch reference. Reinstall with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )

# glibc's malloc, by default, hands a training step's freed temporaries back to the system and
# takes them again on the next step (page faults and zeroed pages: 15-30% of a CPU step at the
# trainer's sizes). bmc_fast fixes its thresholds once, at import: up to 64 MB free at the top of
# each malloc arena kept, blocks under 16 MB from the heap. BMC_FAST_MALLOC=system leaves malloc
# as it is, as does any setting of the user's for these thresholds (MALLOC_TRIM_THRESHOLD_ and
# the like, or their glibc.malloc tunables). backend_info()["malloc"] says which.
_MALLOC_TRIM_MB, _MALLOC_MMAP_MB = 64, 16


def _malloc_mode() -> str:
    mode = os.environ.get("BMC_FAST_MALLOC", "tuned")
    if mode not in ("tuned", "system"):
        warnings.warn(f"BMC_FAST_MALLOC must be 'tuned' or 'system', got {mode!r}: malloc is left as it is",
                      RuntimeWarning, stacklevel=2)
        return "system"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    users = any(os.environ.get(f"MALLOC_{k.upper()}_") is not None or f"glibc.malloc.{k}" in tunables
                for k in ("trim_threshold", "mmap_threshold", "top_pad", "mmap_max"))
    if mode == "system" or users or _C is None:
        return "system"
    return "tuned" if _C.tune_malloc(_MALLOC_TRIM_MB, _MALLOC_MMAP_MB) else "system"


MALLOC = _malloc_mode()

_warned: set[str] = set()


def use_kernel(op: str, t: torch.Tensor) -> bool:
    """True when the fused kernel of ``op`` can run on ``t``'s device; else warns once (or raises
    under BMC_FAST_REQUIRE_EXTENSION=1) and the caller runs the reference."""
    dev = t.device.type
    if HAVE_EXTENSION and (dev in ("cpu", "meta") or (dev == "cuda" and CUDA_BUILT)):
        return True
    why = "the extension is not loaded" if not HAVE_EXTENSION else f"it was built without {dev} kernels"
    if REQUIRE:
        raise RuntimeError(f"bmc_fast.{op}: no fused kernel for {dev} tensors ({why})")
    if op not in _warned:
        _warned.add(op)
        warnings.warn(
            f"bmc_fast.{op}: running the pure-PyTorch reference on {dev} because {why}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


_MATMUL_MODES = ("auto", "onednn", "mkl")
if os.environ.get("BMC_FAST_MATMUL", "auto") not in _MATMUL_MODES:
    raise ValueError(f"BMC_FAST_MATMUL must be one of {_MATMUL_MODES}, got {os.environ['BMC_FAST_MATMUL']!r}")


def set_cpu_matmul(mode: str) -> str:
    """Chooses the library for the float32 matrix products of bmc_fast's fused CPU ResMLP (the
    training step and the eval forward): ``"mkl"`` (torch's own, through ``at::mm``), ``"onednn"``
    (torch's ``mkldnn::_linear_pointwise``) or ``"auto"``: oneDNN on AMD processors with AVX-512,
    where MKL runs its AVX2 code, MKL elsewhere (the default; ``BMC_FAST_MATMUL`` sets it at start).
    Returns the library now in use ("onednn" or "mkl")."""
    if not isinstance(mode, str) or mode not in _MATMUL_MODES:
        raise ValueError(f"mode must be one of {_MATMUL_MODES}, got {mode!r}")
    if not HAVE_EXTENSION:
        return "mkl"
    _C.set_cpu_matmul(mode)
    return _C.cpu_matmul()


def onednn_matmul() -> bool:
    """Whether the fused ResMLP's float32 products go to oneDNN (see :func:`set_cpu_matmul`)."""
    return HAVE_EXTENSION and _C.cpu_matmul() == "onednn"


# Products of fewer multiply-adds stay on MKL even where oneDNN is chosen (csrc/cpu/gemm.h).
ONEDNN_MIN_MACS = _C.onednn_min_macs() if HAVE_EXTENSION else 0


def backend_info() -> dict:
    """What was compiled and what runs: CPU kernel build, CUDA, versions, architectures."""
    if _C is None:
        return {
            "extension": False,
            "error": str(LOAD_ERROR),
            "cpu": False,
            "cuda": False,
            "torch": torch.__version__,
        }
    return {
        "extension": True,
        "cpu": True,
        "cpu_capability": _C.cpu_capability(),
        "cpu_matmul": _C.cpu_matmul(),
        "cpu_blas_direct": _C.direct_blas(),
        "malloc": MALLOC,
        "cuda": _C.cuda_built(),
        "cuda_version": _C.cuda_version() or None,
        "cuda_archs": _C.cuda_archs().split(",") if _C.cuda_archs() else [],
        "built_with_torch": _C.torch_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
