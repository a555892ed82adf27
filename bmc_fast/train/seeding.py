"""Named random streams of the trainer.

Every random draw of a run comes from a stream named here and keyed by the run's seed and by
what the draw belongs to (a task, an incremental step, a training step), never by where it runs:
an expert's batch order and dropout masks are a function of (seed, task id, training step) only,
so stacked, sequential, one process and N processes train the same experts. The trainer never
touches the caller's global generator: :func:`private_rng` forks it for the length of a call.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch

__all__ = ["STREAMS", "derive", "generator", "dropout_seeds", "private_rng"]

# The streams; a name is part of every key, so two streams never share draws.
STREAMS = (
    "model_init",             # the base model's initial weights and any module-level dropout
    "expert_batches",         # (task): the order of an expert's training batches
    "expert_dropout",         # (incremental step, training step): dropout of the fused experts
    "buffer",                 # (task): which samples of a task its buffer keeps
    "memory",                 # (incremental step): which samples the memory keeps
    "consolidation",          # (incremental step): validation split and batch order
    "consolidation_dropout",  # (incremental step, training step): dropout of the fused base
    "mixup",                  # (incremental step): mixup weights and partners
    "baseline",               # (method, phase): the baselines' batch order, buffers and dropout
)


def derive(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit integer determined by ``(seed, stream, *parts)`` alone."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; one of {STREAMS}")
    key = f"{int(seed)}|{stream}|" + "|".join(str(int(p)) for p in parts)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, stream: str, *parts: int) -> torch.Generator:
    """A CPU generator seeded with :func:`derive`."""
    g = torch.Generator()
    g.manual_seed(derive(seed, stream, *parts))
    return g


def dropout_seeds(seed: int, stream: str, *parts: int, n: int = 2) -> list[int]:
    """``n`` dropout seeds of the fused ResMLP's counter-based masks (one per block)."""
    return [derive(seed, stream, *parts, i) for i in range(n)]


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device | str = "cpu"):
    """Runs the block on torch's global generator (and the CUDA one of ``device``) seeded with
    ``seed``, then restores the caller's states: code that draws from the global generator
    (module dropout, ``vmap`` randomness) stays reproducible and the caller's draws unchanged."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield
