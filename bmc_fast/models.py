"""Backbones. A model maps ``x -> (logits [N, C], features [N, D])``; the features are the
penultimate activations used by the feature-mode stability and distillation losses.

The default :class:`ResMLP` trains through a fused path on the CPU (``fused=True``): the whole
training-mode forward is one ``resmlp`` op call and one autograd node (its backward one more
call): per residual block three matmuls and two passes of the ``bn_relu_dropout`` kernel
(BatchNorm with batch statistics, the residual sum, ReLU and dropout), instead of some twenty
small eager ops and their autograd nodes. :func:`resmlp_forward` runs the same path over K
stacked models ``[K, B, ...]`` for the parallel experts. Eval mode, other devices and
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


_LAYERS = ("fc1", "bn1", "fc2", "bn2", "short", "bn_s")
_BLOCKS = ("block1", "block2")


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
    """Training-mode forward of a ResMLP through the fused ``resmlp`` op (one autograd node).
    Stacked: ``params`` and ``buffers`` map the names of ``model.named_parameters()`` /
    ``named_buffers()`` to tensors stacked over K (as :func:`torch.func.stack_module_state` makes
    them) and ``x`` is ``[K, B, ...]``; returns ``(logits [K, B, C], features [K, B, F])``.
    Unstacked (one model's own tensors, ``x`` ``[B, ...]``): ``(logits [B, C], features [B, F])``.
    Updates the BatchNorm buffers in place, as the modules would. ``model`` only supplies the
    hyper-parameters (it may be on "meta")."""
    from .ops.bn_relu_dropout import new_seed
    from .ops.resmlp import resmlp_unchecked

    x = x.reshape(x.shape[0], x.shape[1], -1) if params["proj.weight"].dim() == 3 else x.flatten(1)
    bn0 = model.block1.bn1
    if bn0.momentum is None:  # cumulative moving average, as BatchNorm: 1 / batches seen
        momentum = 1.0 / (float(buffers["block1.bn1.num_batches_tracked"].reshape(-1)[0]) + 1)
    else:
        momentum = float(bn0.momentum)
    lin = [f"{b}.{layer}" for b in _BLOCKS for layer in ("fc1", "fc2", "short")]
    bns = [f"{b}.{layer}" for b in _BLOCKS for layer in ("bn1", "bn2", "bn_s")]
    lin = ["proj"] + lin + ["head"]
    p = [float(getattr(model, b).drop.p) for b in _BLOCKS]
    seeds = [new_seed() if v > 0 else 0 for v in p]
    logits, h = resmlp_unchecked(x, [params[n + ".weight"] for n in lin], [params[n + ".bias"] for n in lin],
                                 [params[n + ".weight"] for n in bns], [params[n + ".bias"] for n in bns],
                                 [buffers[n + ".running_mean"] for n in bns], [buffers[n + ".running_var"] for n in bns],
                                 momentum, float(bn0.eps), p, seeds)
    with torch.no_grad():
        torch._foreach_add_([buffers[n + ".num_batches_tracked"] for n in bns], 1)
    return logits, h
