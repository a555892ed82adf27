"""Random task-masked inputs: rows with their own ranges [o, o + l) of a C-class head."""
import torch


def ranges(n, c, device, min_len=1, max_len=None):
    max_len = max_len or c
    ln = torch.randint(min_len, max(min_len, min(max_len, c)) + 1, (n,), device=device)
    off = (torch.rand(n, device=device) * (c - ln + 1)).floor().long().clamp_max(c - ln)
    return off, ln


def labels_in(off, ln):
    return off + (torch.rand(off.shape, device=off.device) * ln).floor().long()
