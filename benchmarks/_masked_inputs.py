"""Inputs of the task-masked benchmarks: [N, C] logits, per-row ranges of 2..max(2, C/10) classes."""
import torch


def masked_inputs(n, c, dtype, teacher=False, device="cpu"):
    dtype = getattr(torch, dtype)
    g = torch.Generator(device).manual_seed(0)
    hi = max(2, c // 10)
    ln = torch.randint(2, hi + 1, (n,), generator=g, device=device)
    off = (torch.rand(n, generator=g, device=device) * (c - ln + 1)).floor().long().clamp_max(c - ln)
    x = (torch.randn(n, c, generator=g, device=device) * 3).to(dtype)
    y = off + (torch.rand(n, generator=g, device=device) * ln).floor().long()
    other = (torch.randn(n, c, generator=g, device=device) * 3).to(dtype) if teacher else y
    esz = x.element_size()
    read = int(ln.sum()) * esz * (2 if teacher else 1) + 3 * 8 * n
    return dtype, (x, other, off, ln), {"fwd": read, "fwd+bwd": read + n * c * esz}
