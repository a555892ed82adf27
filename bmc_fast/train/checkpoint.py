"""Atomic writes and checkpoints that load without running code.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one, so a crash at any moment leaves either the old or the new checkpoint, never a
torn file. Checkpoints hold only tensors, numbers, strings, lists and dicts, and are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io

import torch

from .._io import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(obj: dict, path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load checkpoint {path}: {exc}") from exc
