"""Backbones. A model maps ``x -> (logits [N, C], features [N, D])``; the features are the
penultimate activations used by the feature-mode stability and distillation losses.

The default :class:`ResMLP` trains through a fused path on the CPU (``fused=True``): each
residual block is three matmuls and two calls of the ``bn_relu_dropout`` kernel (BatchNorm with
batch statistics, the residual sum, ReLU and dropout in one pass; backward in two), instead of
some twenty small eager ops and their autograd nodes. :func:`resmlp_forward` runs the same path
over K stacked models ``[K, B, ...]`` for the parallel experts. Eval mode, other devices and
dtypes, autocast, ``torch.compile`` and ``vmap`` use the plain modules.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ext

__all__ = ["ResMLP", "resmlp_forward", "fused_path_available"]


class _ResBlock(nn.Module):
    """fc-BN-ReLU-fc-BN plus a Linear-BN shortcut, then ReLU and dropout."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.fc2, self.bn2 = nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)
        self.short, self.bn_s = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))
        return self.drop(torch.relu(h + self.bn_s(self.short(x))))


class ResMLP(nn.Module):
    """The backbone of the BMC reference benchmark (BMC-SPEC §2): input -> Linear(128) with no
    activation -> residual blocks 128->256 and 256->256 (dropout after each) -> features (256)
    -> linear head. Xavier-normal initialisation.

    ``fused=True`` trains through the fused CPU kernels (same function, same parameters and
    buffers; dropout masks come from bmc_fast's counter-based generator, seeded from torch's
    default generator). ``fused=False`` is the plain eager module.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 128, width: int = 256,
                 dropout: float = 0.3, fused: bool = True):
        super().__init__()
        if input_dim < 1 or num_classes < 1:
            raise ValueError(f"input_dim and num_classes must be >= 1, got {input_dim}, {num_classes}")
        self.input_dim, self.num_classes, self.feature_dim = input_dim, num_classes, width
        self.fused = bool(fused)
        self.proj = nn.Linear(input_dim, hidden)
        self.block1 = _ResBlock(hidden, width, dropout)
        self.block2 = _ResBlock(width, width, dropout)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if self.fused and self.training and fused_path_available(self, x):
            return resmlp_forward(self, *_module_tensors(self), x)
        h = self.block2(self.block1(self.proj(x.flatten(1))))
        return self.head(h), h


def _bns(model: ResMLP):
    return [bn for blk in (model.block1, model.block2) for bn in (blk.bn1, blk.bn2, blk.bn_s)]


def fused_path_available(model: nn.Module, x: torch.Tensor) -> bool:
    """True when :func:`resmlp_forward` can train ``model`` on ``x``: a :class:`ResMLP` with
    standard BatchNorm layers (affine, running statistics, one eps and momentum), float32/float64
    CPU tensors, the extension loaded, no autocast, not under torch.compile or functorch
    transforms, at least 2 rows (batch statistics)."""
    if not (_ext.HAVE_EXTENSION and isinstance(model, ResMLP) and isinstance(x, torch.Tensor)):
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() < 2 or x.shape[0] < 2:
        return False
    if model.proj.weight.dtype != x.dtype or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return False
    bns = _bns(model)
    return all(bn.affine and bn.track_running_stats and bn.eps == bns[0].eps and bn.momentum == bns[0].momentum
               for bn in bns)


class _StackedLinear(torch.autograd.Function):
    """``x [K, B, I] @ w[K, O, I]^T (+ b [K, O])`` with the backward of nn.Linear: the weight
    gradient comes out as ``[K, O, I]`` contiguous (autograd of ``bmm(x, w.transpose(1, 2))``
    would give a transposed view that the optimizer's gradient accumulation copies)."""

    @staticmethod
    def forward(x, w, b):
        wt = w.transpose(1, 2)
        return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _mm(x, w, b=None):  # x [K, B, I] @ w[K, O, I]^T (+ b [K, O]) -> [K, B, O]; unstacked: x [B, I], w [O, I]
    if w.dim() == 2:
        return torch.nn.functional.linear(x, w, b)
    return _StackedLinear.apply(x, w, b)


_LAYERS = ("fc1", "bn1", "fc2", "bn2", "short", "bn_s")


def _module_tensors(model: ResMLP):
    """The parameters and buffers of a ResMLP by name, read as attributes (named_parameters()
    walks the module tree: ~0.1 ms a call, a tenth of a small training step)."""
    params = {"proj.weight": model.proj.weight, "proj.bias": model.proj.bias,
              "head.weight": model.head.weight, "head.bias": model.head.bias}
    buffers = {}
    for name in ("block1", "block2"):
        blk = getattr(model, name)
        for layer in _LAYERS:
            m = getattr(blk, layer)
            params[f"{name}.{layer}.weight"], params[f"{name}.{layer}.bias"] = m.weight, m.bias
            if layer.startswith("bn"):
                for b in ("running_mean", "running_var", "num_batches_tracked"):
                    buffers[f"{name}.{layer}.{b}"] = getattr(m, b)
    return params, buffers


def resmlp_forward(model: ResMLP, params: dict, buffers: dict, x: torch.Tensor):
    """Training-mode forward of a ResMLP through the fused kernels. Stacked: ``params`` and
    ``buffers`` map the names of ``model.named_parameters()`` / ``named_buffers()`` to tensors
    stacked over K (as :func:`torch.func.stack_module_state` makes them) and ``x`` is
    ``[K, B, ...]``; returns ``(logits [K, B, C], features [K, B, F])``. Unstacked (one model's own
    tensors, ``x`` ``[B, ...]``): ``(logits [B, C], features [B, F])``. Updates the BatchNorm
    buffers in place, as the modules would. ``model`` only supplies the hyper-parameters (it may
    be on "meta")."""
    from .ops.bn_relu_dropout import bn_relu_dropout_unchecked as bn_act, new_seed

    if params["proj.weight"].dim() == 3:
        h = _mm(x.reshape(x.shape[0], x.shape[1], -1), params["proj.weight"], params["proj.bias"])
    else:
        h = _mm(x.flatten(1), params["proj.weight"], params["proj.bias"])
    bn0 = model.block1.bn1
    eps = float(bn0.eps)
    if bn0.momentum is None:  # cumulative moving average, as BatchNorm: 1 / batches seen
        momentum = 1.0 / (float(buffers["block1.bn1.num_batches_tracked"].reshape(-1)[0]) + 1)
    else:
        momentum = float(bn0.momentum)
    for name in ("block1", "block2"):
        p = {layer: (params[f"{name}.{layer}.weight"], params[f"{name}.{layer}.bias"]) for layer in _LAYERS}
        s = {layer: (buffers[f"{name}.{layer}.running_mean"], buffers[f"{name}.{layer}.running_var"])
             for layer in ("bn1", "bn2", "bn_s")}
        r = bn_act([_mm(h, p["fc1"][0])], [p["bn1"][0]], [p["bn1"][1]], [s["bn1"][0]], [s["bn1"][1]], [p["fc1"][1]],
                   momentum, eps, 0.0, 0)
        drop = float(getattr(model, name).drop.p)
        h = bn_act([_mm(r, p["fc2"][0]), _mm(h, p["short"][0])], [p["bn2"][0], p["bn_s"][0]],
                   [p["bn2"][1], p["bn_s"][1]], [s["bn2"][0], s["bn_s"][0]], [s["bn2"][1], s["bn_s"][1]],
                   [p["fc2"][1], p["short"][1]], momentum, eps, drop, new_seed() if drop > 0 else 0)
        with torch.no_grad():
            torch._foreach_add_([buffers[f"{name}.{layer}.num_batches_tracked"] for layer in ("bn1", "bn2", "bn_s")], 1)
    return _mm(h, params["head.weight"], params["head.bias"]), h
