"""Backbones. A model maps ``x -> (logits [N, C], features [N, D])``; the features are the
penultimate activations used by the feature-mode stability and distillation losses.

The default :class:`ResMLP` trains through a fused path on the CPU (``fused=True``): the whole
training-mode forward is one ``resmlp`` op call and one autograd node (its backward one more
call): per residual block three matmuls and two passes of the ``bn_relu_dropout`` kernel
(BatchNorm with batch statistics, the residual sum, ReLU and dropout), instead of some twenty
small eager ops and their autograd nodes. :func:`resmlp_forward` runs the same path over K
stacked models ``[K, B, ...]`` for the parallel experts. Eval mode, other devices and
dtypes, autocast, ``torch.compile`` and ``vmap`` use the plain modules; without autograd, the
eval forward of a fused float32 CPU model does its large products through oneDNN where
bmc_fast chose it (:func:`bmc_fast.set_cpu_matmul`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import _ext, _torch_compat as compat

__all__ = ["ResMLP", "resmlp_forward", "resmlp_train_forward", "fused_args", "fused_path_available",
           "inference_rows"]


def inference_rows(device) -> int:
    """Rows per forward pass when a model runs without autograd over many samples (evaluation,
    buffers, the base-feature table). On the CPU, 2,048: a chunk's activations and logits stay in
    cache, and passes of 8,192 rows ran 1.2-1.4x slower for the same products on a 2-core Zen 3.
    Elsewhere 8,192. Eval mode makes a sample's outputs independent of the chunk it is in."""
    return 2048 if torch.device(device).type == "cpu" else 8192


class _ResBlock(nn.Module):
    """fc-BN-ReLU-fc-BN plus a Linear-BN shortcut, then ReLU and dropout; the first fc goes to
    ``d_mid`` features, the second back to ``d_out``."""

    def __init__(self, d_in: int, d_out: int, dropout: float, d_mid: int):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_mid), nn.BatchNorm1d(d_mid)
        self.fc2, self.bn2 = nn.Linear(d_mid, d_out), nn.BatchNorm1d(d_out)
        self.short, self.bn_s = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, linear=None):
        linear = linear or _module_linear
        h = self.bn2(linear(self.fc2, torch.relu(self.bn1(linear(self.fc1, x)))))
        return self.drop(torch.relu(h + self.bn_s(linear(self.short, x))))


def _module_linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def _onednn_linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] * m.in_features * m.out_features < _ext.ONEDNN_MIN_MACS:  # as csrc/cpu/gemm.cpp
        return m(x)
    return torch.ops.mkldnn._linear_pointwise(x, m.weight, m.bias, "none", [], "")


class ResMLP(nn.Module):
    """The backbone of the BMC reference benchmark (BMC-SPEC §2): input -> Linear(128) with no
    activation -> residual blocks 128->256 and 256->256 (dropout after each) -> features (256)
    -> linear head. Xavier-normal initialisation.

    ``fused=True`` trains through the fused CPU kernels (same function, same parameters and
    buffers; dropout masks come from bmc_fast's counter-based generator, seeded from torch's
    default generator). ``fused=False`` is the plain eager module.

    ``inner``: the width inside each residual block (the first fc's output; default ``width``).
    The authors' public code has 128 there (``BMCConfig.preset("parity")`` sets it); the fused
    kernels and the one-call step take any inner width.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 128, width: int = 256,
                 dropout: float = 0.3, fused: bool = True, inner: int | None = None):
        super().__init__()
        if input_dim < 1 or num_classes < 1:
            raise ValueError(f"input_dim and num_classes must be >= 1, got {input_dim}, {num_classes}")
        if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
            raise ValueError(f"inner must be None or an int >= 1, got {inner!r}")
        self.input_dim, self.num_classes, self.feature_dim = input_dim, num_classes, width
        self.inner = inner or width
        self.fused = bool(fused)
        self.proj = nn.Linear(input_dim, hidden)
        self.block1 = _ResBlock(hidden, width, dropout, self.inner)
        self.block2 = _ResBlock(width, width, dropout, self.inner)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if self.fused and self.training and fused_path_available(self, x):
            return resmlp_train_forward(self, fused_args(self), x)
        x = x.flatten(1)
        if self.fused and not self.training and self._onednn_eval(x):
            # Eval without autograd (buffers, base features, accuracy): the matmuls through
            # oneDNN where bmc_fast chose it (bmc_fast.set_cpu_matmul), the rest as below.
            h = self.block2(self.block1(_onednn_linear(self.proj, x), _onednn_linear), _onednn_linear)
            return _onednn_linear(self.head, h), h
        h = self.block2(self.block1(self.proj(x)))
        return self.head(h), h

    def head_rows(self, start: int, count: int) -> "ResMLP":
        """A copy whose head holds only the ``count`` rows from row ``start`` (rows past the end of
        the head are zero): a model that computes only some classes' logits, e.g. an expert's own
        task. :meth:`with_head_of` puts them back into a whole head."""
        m = copy.deepcopy(self)
        w, b = self.head.weight, self.head.bias
        head = nn.Linear(self.feature_dim, count, device=w.device, dtype=w.dtype)
        take = max(0, min(count, self.num_classes - start))
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[:take] = w[start:start + take]
            head.bias[:take] = b[start:start + take]
        m.head, m.num_classes = head, count
        return m

    def with_head_of(self, narrow: "ResMLP", start: int, count: int) -> "ResMLP":
        """``narrow`` (made by :meth:`head_rows`) with this model's whole head, whose rows
        ``[start, start + count)`` are the first ``count`` rows of ``narrow``'s head."""
        m = copy.deepcopy(narrow)
        head = copy.deepcopy(self.head)
        with torch.no_grad():
            head.weight[start:start + count] = narrow.head.weight[:count]
            head.bias[start:start + count] = narrow.head.bias[:count]
        m.head, m.num_classes = head, self.num_classes
        return m

    def _onednn_eval(self, x: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.dtype == torch.float32 and _eager_cpu_input(self, x)
                and _ext.onednn_matmul())


_BLOCKS = ("block1", "block2")
# The fused op's layer order, named as in named_parameters(): the one place that defines it.
_LINEAR_NAMES = ["proj"] + [f"{b}.{layer}" for b in _BLOCKS for layer in ("fc1", "fc2", "short")] + ["head"]
_BN_NAMES = [f"{b}.{layer}" for b in _BLOCKS for layer in ("bn1", "bn2", "bn_s")]


def _submodules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The submodules at dotted ``names``, through the modules' own dicts (attribute access goes
    through nn.Module.__getattr__, ~0.7 us each: a noticeable part of a small training step)."""
    out = []
    for name in names:
        m = model
        for part in name.split("."):
            m = m._modules[part]
        out.append(m)
    return out


def _bns(model: ResMLP):
    return _submodules(model, _BN_NAMES)


def fused_path_available(model: nn.Module, x: torch.Tensor) -> bool:
    """True when :func:`resmlp_train_forward` can train ``model`` on ``x``: a :class:`ResMLP` with
    standard BatchNorm layers (affine, running statistics, one eps and momentum), float32/float64
    CPU tensors, the extension loaded, no autocast, not under torch.compile or functorch
    transforms, at least 2 rows (batch statistics)."""
    if not (isinstance(model, ResMLP) and isinstance(x, torch.Tensor)):
        return False
    if x.dtype not in (torch.float32, torch.float64) or x.dim() < 2 or x.shape[0] < 2:
        return False
    if not _eager_cpu_input(model, x):
        return False
    bns = _bns(model)
    return all(bn.affine and bn.track_running_stats and bn.eps == bns[0].eps and bn.momentum == bns[0].momentum
               for bn in bns)


def _eager_cpu_input(model: ResMLP, x: torch.Tensor) -> bool:
    """What every fused CPU path of a ResMLP needs: the extension loaded, ``x`` a plain CPU tensor
    of the parameters' dtype, no autocast, not under torch.compile or functorch transforms."""
    return (_ext.HAVE_EXTENSION and x.device.type == "cpu"
            and model._modules["proj"]._parameters["weight"].dtype == x.dtype
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and compat.FAST_EAGER and not compat.is_transform_wrapped(x))


def fused_args(model: ResMLP, params: dict | None = None, buffers: dict | None = None) -> tuple:
    """The tensor lists :func:`resmlp_train_forward` takes: (linear weights, linear biases, bn
    weights, bn biases, running means, running vars, batches tracked), in the ``resmlp`` op's
    order. From ``params``/``buffers`` dicts (names of ``named_parameters()``/``named_buffers()``,
    e.g. stacked by :func:`torch.func.stack_module_state`; build them once for many steps) or,
    without them, from the module's own parameter and buffer dicts (``named_parameters()`` walks
    the whole module tree: ~0.05 ms a call)."""
    if params is not None:
        return ([params[n + ".weight"] for n in _LINEAR_NAMES], [params[n + ".bias"] for n in _LINEAR_NAMES],
                [params[n + ".weight"] for n in _BN_NAMES], [params[n + ".bias"] for n in _BN_NAMES],
                [buffers[n + ".running_mean"] for n in _BN_NAMES], [buffers[n + ".running_var"] for n in _BN_NAMES],
                [buffers[n + ".num_batches_tracked"] for n in _BN_NAMES])
    lp = [m._parameters for m in _submodules(model, _LINEAR_NAMES)]
    bns = _bns(model)
    bp = [m._parameters for m in bns]
    bb = [m._buffers for m in bns]
    return ([d["weight"] for d in lp], [d["bias"] for d in lp], [d["weight"] for d in bp], [d["bias"] for d in bp],
            [d["running_mean"] for d in bb], [d["running_var"] for d in bb], [d["num_batches_tracked"] for d in bb])


def resmlp_train_forward(model: ResMLP, args: tuple, x: torch.Tensor, seeds: list[int] | None = None,
                         first_model: int = 0):
    """Training-mode forward of a ResMLP through the fused ``resmlp`` op (one autograd node),
    with the tensor lists of :func:`fused_args`. Stacked (weights ``[K, O, I]``, ``x``
    ``[K, B, ...]``) or one model (``x`` ``[B, ...]``). Updates the BatchNorm buffers in place,
    as the modules would. ``model`` only supplies the hyper-parameters (it may be on "meta").
    ``seeds`` (one per block; None: drawn from torch's default generator) and ``first_model``
    (model k draws the dropout masks of model ``first_model + k``) key the dropout masks."""
    from ..ops.bn_relu_dropout import new_seed
    from ..ops.resmlp import resmlp_unchecked

    weights, biases, bn_w, bn_b, rmean, rvar, tracked = args
    x = x.reshape(x.shape[0], x.shape[1], -1) if weights[0].dim() == 3 else x.flatten(1)
    bn0 = model.block1.bn1
    if bn0.momentum is None:  # cumulative moving average, as BatchNorm: 1 / batches seen
        momentum = 1.0 / (float(tracked[0].reshape(-1)[0]) + 1)
    else:
        momentum = float(bn0.momentum)
    p = [float(model.block1.drop.p), float(model.block2.drop.p)]
    if seeds is None:
        seeds = [new_seed() if v > 0 else 0 for v in p]
    logits, h = resmlp_unchecked(x, weights, biases, bn_w, bn_b, rmean, rvar, momentum, float(bn0.eps), p, list(seeds),
                                 int(first_model))
    with torch.no_grad():
        torch._foreach_add_(tracked, 1)
    return logits, h


def resmlp_forward(model: ResMLP, params: dict, buffers: dict, x: torch.Tensor):
    """Training-mode forward of a ResMLP through the fused ``resmlp`` op (one autograd node).
    Stacked: ``params`` and ``buffers`` map the names of ``model.named_parameters()`` /
    ``named_buffers()`` to tensors stacked over K (as :func:`torch.func.stack_module_state` makes
    them) and ``x`` is ``[K, B, ...]``; returns ``(logits [K, B, C], features [K, B, F])``.
    Unstacked (one model's own tensors, ``x`` ``[B, ...]``): ``(logits [B, C], features [B, F])``.
    Updates the BatchNorm buffers in place, as the modules would. ``model`` only supplies the
    hyper-parameters (it may be on "meta"). For many steps, build :func:`fused_args` once and
    call :func:`resmlp_train_forward`."""
    return resmlp_train_forward(model, fused_args(model, params, buffers), x)
