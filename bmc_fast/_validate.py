"""Argument checks shared by the fused ops and their references.

Static checks (types, dtypes, shapes, devices, options) only read metadata, so they are free and
safe under ``torch.compile``. Data-dependent checks (ids and labels in range, finite weights) are
done by the C++ kernels; the references do them eagerly with the ``check_*_values`` functions.
Every error names the argument. The paired inputs of a loss may differ in floating dtype:
:func:`loss_dtype` gives the dtype both are cast to before the op.
"""
from __future__ import annotations

import math
import numbers

import torch

REDUCTIONS = ("none", "sum", "mean")
_INT_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    return x


def integer(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {x.dtype}")
    return x


def same_dtype(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def loss_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The dtype a loss over its paired floating inputs ``xs`` (expert and base, student and
    teacher, ...) computes and returns in, as torch's own losses decide it: the dtypes promoted as
    a binary op promotes them (:func:`torch.promote_types`: bfloat16 with float32 gives float32);
    under autocast for their device, float32 (float64 stays), the policy autocast gives
    ``mse_loss`` and ``cross_entropy``. Metadata only, so static under torch.compile."""
    dt = xs[0].dtype
    for x in xs[1:]:
        if x.dtype != dt:
            dt = torch.promote_types(dt, x.dtype)
    if dt != torch.float64 and _autocast_on(xs[0].device.type):
        dt = torch.float32
    return dt


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call's cost when the dtype already matches (the common case)."""
    return x if x.dtype == dtype else x.to(dtype)


def autocast_aux(x):
    """An auxiliary floating input (weights, importance) as autocast would hand it to the op:
    float32 under autocast for its device (float64 stays), else unchanged. Its dtype never sets
    the loss's: the kernels convert it to the accumulation dtype or wider."""
    if x is not None and x.dtype not in (torch.float32, torch.float64) and _autocast_on(x.device.type):
        return x.to(torch.float32)
    return x


def same_device(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def shape(x: torch.Tensor, expected, name: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(x.shape)}")


def reduction(r) -> str:
    if not isinstance(r, str) or r not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {r!r}")
    return r


def positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(t).__name__}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    return float(t)


def optional_weights(w, k: int, ref: torch.Tensor, name: str = "weights") -> None:
    if w is None:
        return
    floating(w, name)
    same_device(w, ref, name, "the inputs")
    shape(w, (k,), name)


def per_row_index(v, n: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    """An integer tensor [n], or a Python int broadcast to one."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return torch.full((n,), int(v), dtype=torch.int64, device=ref.device)
    integer(v, name)
    same_device(v, ref, name, "the inputs")
    shape(v, (n,), name)
    return v


# ---- data-dependent checks, eager only (references) -------------------------------------------

def check_finite_weights(w, name: str = "weights") -> None:
    if w is not None and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite")


def check_ids(ids: torch.Tensor, num_experts: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert_ids must be in [0, num_experts={num_experts})")


def check_importance(imp) -> None:
    if imp is not None and not bool(((imp >= 0) & torch.isfinite(imp)).all()):
        raise ValueError("importance must be finite and >= 0")


def check_ranges(offset: torch.Tensor, length: torch.Tensor, c: int) -> None:
    if offset.numel() == 0:
        return
    if int(offset.min()) < 0:
        raise ValueError("task_offset must be >= 0")
    if int(length.min()) < 1:
        raise ValueError("task_len must be >= 1")
    if int((offset + length).max()) > c:
        raise ValueError(f"task_offset + task_len must be <= the number of classes {c}")


def check_labels(labels, offset, length, ignore_index: int) -> None:
    keep = labels != ignore_index
    bad = keep & ((labels < offset) | (labels >= offset + length))
    if bool(bad.any()):
        raise ValueError("labels must lie in their task range [task_offset, task_offset + task_len)")


# ---- per-op static checks (shared by bmc_fast.ops and bmc_fast.reference) ----------------------

def stability_args(expert, base, weights, red) -> None:
    floating(expert, "expert")
    floating(base, "base")
    same_device(base, expert, "base", "expert")
    if expert.dim() < 1:
        raise ValueError("expert must have shape [K, ...], got a scalar")
    shape(base, expert.shape, "base")
    optional_weights(weights, expert.shape[0], expert)
    reduction(red)


def weight_stability_args(expert_params, base_params, importance, weights, red) -> None:
    floating(expert_params, "expert_params")
    floating(base_params, "base_params")
    same_device(base_params, expert_params, "base_params", "expert_params")
    if expert_params.dim() != 2:
        raise ValueError(f"expert_params must have shape [K, P], got {list(expert_params.shape)}")
    k, p = expert_params.shape
    shape(base_params, (p,), "base_params")
    if importance is not None:
        floating(importance, "importance")
        same_device(importance, expert_params, "importance", "expert_params")
        shape(importance, (p,), "importance")
    optional_weights(weights, k, expert_params)
    reduction(red)


def distillation_args(student, teacher, expert_ids, num_experts, weights, red) -> int:
    floating(student, "student")
    floating(teacher, "teacher")
    same_device(teacher, student, "teacher", "student")
    if student.dim() < 1:
        raise ValueError("student must have shape [N, ...], got a scalar")
    shape(teacher, student.shape, "teacher")
    integer(expert_ids, "expert_ids")
    same_device(expert_ids, student, "expert_ids", "student")
    shape(expert_ids, (student.shape[0],), "expert_ids")
    e = positive_int(num_experts, "num_experts")
    optional_weights(weights, e, student)
    reduction(red)
    return e


def masked_logits_args(logits, name: str) -> None:
    floating(logits, name)
    if logits.dim() != 2:
        raise ValueError(f"{name} must have shape [N, C], got {list(logits.shape)}")


def cross_entropy_args(logits, labels, task_offset, task_len, red, ignore_index):
    masked_logits_args(logits, "logits")
    n = logits.shape[0]
    integer(labels, "labels")
    same_device(labels, logits, "labels", "logits")
    shape(labels, (n,), "labels")
    off = per_row_index(task_offset, n, logits, "task_offset")
    ln = per_row_index(task_len, n, logits, "task_len")
    reduction(red)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return off, ln


def kd_args(student_logits, teacher_logits, task_offset, task_len, tau, red):
    masked_logits_args(student_logits, "student_logits")
    floating(teacher_logits, "teacher_logits")
    same_device(teacher_logits, student_logits, "teacher_logits", "student_logits")
    shape(teacher_logits, student_logits.shape, "teacher_logits")
    n = student_logits.shape[0]
    off = per_row_index(task_offset, n, student_logits, "task_offset")
    ln = per_row_index(task_len, n, student_logits, "task_len")
    temperature(tau)
    reduction(red)
    return off, ln


def bn_relu_dropout_args(inputs, weights, biases, running_means, running_vars, pre_biases, momentum, eps, p):
    """inputs: 1-4 [K, B, C] floating tensors of one dtype/device (B >= 2); every other list
    [K, C] tensors, one per input (running stats and pre_biases may be None or empty)."""
    if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= 4:
        raise ValueError(f"inputs must be a list of 1 to 4 tensors, got {type(inputs).__name__}"
                         + (f" of {len(inputs)}" if isinstance(inputs, (list, tuple)) else ""))
    a0 = floating(inputs[0], "inputs[0]")
    if a0.dim() not in (2, 3):
        raise ValueError(f"inputs[0] must have shape [K, B, C] or [B, C], got {list(a0.shape)}")
    b, c = a0.shape[-2:]
    stat = (c,) if a0.dim() == 2 else (a0.shape[0], c)
    if b < 2:
        raise ValueError(f"inputs must have at least 2 rows per model (batch statistics), got shape {list(a0.shape)}")
    for i, a in enumerate(inputs):
        floating(a, f"inputs[{i}]")
        same_dtype(a, a0, f"inputs[{i}]", "inputs[0]")
        same_device(a, a0, f"inputs[{i}]", "inputs[0]")
        shape(a, a0.shape, f"inputs[{i}]")
    n = len(inputs)
    for name, lst, optional in (("weights", weights, False), ("biases", biases, False),
                                ("running_means", running_means, True), ("running_vars", running_vars, True),
                                ("pre_biases", pre_biases, True)):
        if optional and not lst:
            continue
        if not isinstance(lst, (list, tuple)) or len(lst) != n:
            raise ValueError(f"{name} must be a list of {n} tensors like inputs, got "
                             f"{len(lst) if isinstance(lst, (list, tuple)) else type(lst).__name__}")
        for i, t in enumerate(lst):
            floating(t, f"{name}[{i}]")
            same_dtype(t, a0, f"{name}[{i}]", "inputs[0]")
            same_device(t, a0, f"{name}[{i}]", "inputs[0]")
            shape(t, stat, f"{name}[{i}]")
    if bool(running_means) != bool(running_vars):
        raise ValueError("running_means and running_vars must be given together")
    for name, val, lo, hi, hi_open in (("momentum", momentum, 0.0, 1.0, False), ("p", p, 0.0, 1.0, True)):
        number = isinstance(val, numbers.Real) and not isinstance(val, bool)
        if not (number and (lo <= val < hi if hi_open else lo <= val <= hi)):
            raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {val!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def resmlp_args(x, weights, biases, bn_weights, bn_biases, running_means, running_vars, momentum, eps, p, seeds,
                first_model=0):
    """A ResMLP's tensors for resmlp(): x [B, I] (weights [O, I]) or [K, B, I] (weights [K, O, I]);
    proj, (fc1, fc2, short) per block, head; widths chained (a block's inner width, fc1's output,
    may differ from its output width); first_model an integer >= 0; returns
    the number of blocks."""
    x = floating(x, "x")
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have shape [B, I] or [K, B, I], got {list(x.shape)}")
    if x.shape[-2] < 2:
        raise ValueError(f"x must have at least 2 rows per model (batch statistics), got shape {list(x.shape)}")
    if not isinstance(weights, (list, tuple)) or len(weights) < 5 or (len(weights) - 2) % 3:
        got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError("weights must be a list of proj, (fc1, fc2, short) per block and head: 2 + 3 * blocks "
                         f"tensors, got {got}")
    nb = (len(weights) - 2) // 3
    models = tuple(x.shape[:-2])  # (K,) stacked, () one model

    def param(t, name, want):
        floating(t, name)
        same_dtype(t, x, name, "x")
        same_device(t, x, name, "x")
        shape(t, models + tuple(want), name)

    for name, lst, n in (("biases", biases, len(weights)), ("bn_weights", bn_weights, 3 * nb),
                         ("bn_biases", bn_biases, 3 * nb), ("running_means", running_means, 3 * nb),
                         ("running_vars", running_vars, 3 * nb)):
        if name.startswith("running") and not lst:
            continue
        if not isinstance(lst, (list, tuple)) or len(lst) != n:
            raise ValueError(f"{name} must be a list of {n} tensors, got "
                             f"{len(lst) if isinstance(lst, (list, tuple)) else type(lst).__name__}")
    if bool(running_means) != bool(running_vars):
        raise ValueError("running_means and running_vars must be given together")
    if not isinstance(weights[0], torch.Tensor) or weights[0].dim() != x.dim():
        got = list(weights[0].shape) if isinstance(weights[0], torch.Tensor) else type(weights[0]).__name__
        raise ValueError(f"weights[0] must have {x.dim()} dimensions like x {list(x.shape)}, got {got}")
    width = weights[0].shape[-2]
    param(weights[0], "weights[0]", (width, x.shape[-1]))
    param(biases[0], "biases[0]", (width,))
    def out_dim(t):
        return t.shape[-2] if isinstance(t, torch.Tensor) and t.dim() >= 2 else -1

    for b in range(nb):
        i = 1 + 3 * b
        m, w = out_dim(weights[i]), out_dim(weights[i + 1])  # the block's inner and output widths
        for j, (want, c) in enumerate((((m, width), m), ((w, m), w), ((w, width), w))):
            param(weights[i + j], f"weights[{i + j}]", want)
            param(biases[i + j], f"biases[{i + j}]", (c,))
            for name, lst in (("bn_weights", bn_weights), ("bn_biases", bn_biases), ("running_means", running_means),
                              ("running_vars", running_vars)):
                if lst:
                    param(lst[3 * b + j], f"{name}[{3 * b + j}]", (c,))
        width = w
    last = len(weights) - 1
    c = weights[last].shape[-2] if isinstance(weights[last], torch.Tensor) and weights[last].dim() >= 2 else -1
    param(weights[last], f"weights[{last}]", (c, width))
    param(biases[last], f"biases[{last}]", (c,))
    number = isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)
    if not (number and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if p is not None:
        if not isinstance(p, (list, tuple)) or len(p) != nb:
            raise ValueError(f"p must be a list of {nb} dropout probabilities (one per block), got {p!r}")
        for v in p:
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 <= v < 1.0):
                raise ValueError(f"p must hold numbers in [0, 1), got {p!r}")
    if seeds is not None and (not isinstance(seeds, (list, tuple)) or len(seeds) != nb
                              or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"seeds must be a list of {nb} integers (one per block), got {seeds!r}")
    if isinstance(first_model, bool) or not isinstance(first_model, numbers.Integral) or first_model < 0:
        raise ValueError(f"first_model must be an integer >= 0, got {first_model!r}")
    return nb
