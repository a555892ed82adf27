"""Atomic writes and checkpoints that load without running code.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one, so a crash at any moment leaves either the old or the new checkpoint, never a
torn file. Checkpoints hold only tensors, numbers, strings, lists and dicts, and are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import tempfile

import torch

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint"]


def atomic_write_bytes(path, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(folder, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot load checkpoint {path}: {exc}") from exc
