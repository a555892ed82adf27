"""AutoDS feature folders (BMC-SPEC §5): a safe reader, and a converter to a memory-mappable
format that opens a long stream lazily.

Layout read by :func:`load_autods`::

    <root>/<dataset>/metadata.pickle                 torch.save'd dict: file_names, class_names
    <root>/<dataset>/feats/<feats_name>/<split>/     LMDB: key = file path (utf-8),
                                                     value = pickled numpy feature vector

Pickle runs code on load, so metadata goes through ``torch.load(weights_only=True)`` and LMDB
values through an unpickler that accepts numpy arrays and plain containers only; anything else
is refused with an error naming the file and key. Never imports the compiled extension.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import torch

from .._io import atomic_write_bytes
from .tasks import Task, TaskStream

__all__ = ["load_autods", "convert_autods", "load_features", "feature_sets", "safe_unpickle", "UnsafePickleError"]

TRAIN, TEST = "train", "val"


class UnsafePickleError(ValueError):
    """A pickle asked for something other than numpy arrays and plain containers."""


# numpy's own pickling of arrays, dtypes and scalars, under its old and new module names.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to load {module}.{name}")


def safe_unpickle(data: bytes, where: str = "data"):
    """Unpickles numpy arrays, numbers, strings and lists/tuples/dicts of them; raises
    :class:`UnsafePickleError` naming ``where`` for anything else (code never runs)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{where}: {exc} (only numpy arrays and plain containers are allowed)") from None
    except Exception as exc:
        raise ValueError(f"{where}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _load_metadata(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AutoDS metadata not found: {path}")
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the metadata safely ({exc})") from None
    if not isinstance(meta, dict) or "file_names" not in meta or "class_names" not in meta:
        raise ValueError(f"{path}: expected a dict with 'file_names' and 'class_names'")
    return meta


def _open_lmdb(path: str):
    try:
        import lmdb
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading AutoDS features needs the lmdb package (pip install lmdb)") from exc
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise FileNotFoundError(f"no LMDB features at {path} (data.mdb missing)")
    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True)
    except lmdb.Error as exc:
        raise ValueError(f"{path}: corrupt or unreadable LMDB ({exc})") from None


def _read_split(ds_dir: str, dataset: str, feats_name: str, split: str, items: list, labels: dict):
    path = os.path.join(ds_dir, "feats", feats_name, split)
    if not items:
        raise ValueError(f"dataset {dataset!r}: the {split!r} split is empty")
    env = _open_lmdb(path)
    xs, dim = [], None
    try:
        with env.begin() as txn:
            for file_path, class_name in items:
                try:
                    raw = txn.get(str(file_path).encode("utf-8"))
                except Exception as exc:
                    raise ValueError(f"{path}: corrupt LMDB while reading key {file_path!r} ({exc})") from None
                if raw is None:
                    raise KeyError(f"{path}: no features for key {file_path!r}")
                v = np.asarray(safe_unpickle(raw, f"{path} key {file_path!r}"), dtype=np.float32).reshape(-1)
                if dim is None:
                    dim = v.shape[0]
                elif v.shape[0] != dim:
                    raise ValueError(f"{path} key {file_path!r}: feature of dimension {v.shape[0]}, expected {dim}")
                xs.append(v)
    except Exception as exc:
        import lmdb

        if isinstance(exc, lmdb.Error):
            raise ValueError(f"{path}: corrupt LMDB ({exc})") from None
        raise
    finally:
        env.close()
    y = np.array([labels[c] for _, c in items], dtype=np.int64)
    return np.stack(xs), y


def _subset_of(meta: dict, dataset: str, subset):
    subsets = list(meta["file_names"].keys())
    want = subset.get(dataset) if isinstance(subset, dict) else subset
    if want is None:
        if len(subsets) == 1:
            return subsets[0]
        if "none" in subsets:
            return "none"
        raise ValueError(f"dataset {dataset!r} has subsets {subsets}: choose one with subset=")
    if want not in meta["file_names"]:
        raise ValueError(f"dataset {dataset!r} has no subset {want!r} (it has {subsets})")
    return want


def _datasets(root: str, datasets=None) -> list:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"AutoDS root not found: {root}")
    available = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "metadata.pickle")))
    if datasets is None:
        datasets = available
    missing = [d for d in datasets if d not in available]
    if missing:
        raise FileNotFoundError(f"datasets not found under {root}: {missing} (available: {available})")
    if not datasets:
        raise ValueError(f"no AutoDS dataset under {root} (expected <root>/<dataset>/metadata.pickle)")
    return sorted(datasets)


def feature_sets(root, datasets=None) -> list:
    """The names of the feature sets (``<dataset>/feats/<name>/``) that every dataset under
    ``root`` (or every one of ``datasets``) has, sorted."""
    root = os.fspath(root)
    common = None
    for ds in _datasets(root, datasets):
        feats = os.path.join(root, ds, "feats")
        have = {f for f in os.listdir(feats) if os.path.isdir(os.path.join(feats, f))} if os.path.isdir(feats) else set()
        common = have if common is None else common & have
    return sorted(common)


def _choose_feature_set(root: str, datasets) -> str:
    names = feature_sets(root, datasets)
    if len(names) == 1:
        return names[0]
    if not names:
        raise FileNotFoundError(f"no feature set common to every dataset under {root} "
                                "(expected <dataset>/feats/<name>/train and val)")
    raise ValueError(f"{root} has several feature sets {names}: choose one with feats_name= (--feats-name)")


def load_autods(root, datasets=None, feats_name: str | None = None, subset=None) -> TaskStream:
    """A :class:`TaskStream` of AutoDS features: one task per dataset, in alphabetical order,
    labels = index of the class name among the subset's sorted class names (the same mapping
    for train and val, even when a split lacks a class), ``val`` as the test split.

    ``feats_name``: the feature set (``<dataset>/feats/<feats_name>/``); None takes the only one
    the datasets have (:func:`feature_sets`) and is an error if they have several.
    ``subset``: None (each dataset's only subset, or "none"), a name, or {dataset: name}."""
    root = os.fspath(root)
    datasets = _datasets(root, datasets)
    if feats_name is None:
        feats_name = _choose_feature_set(root, datasets)
    tasks, dim = [], None
    for ds in datasets:
        ds_dir = os.path.join(root, ds)
        meta = _load_metadata(os.path.join(ds_dir, "metadata.pickle"))
        sub = _subset_of(meta, ds, subset)
        names = sorted(meta["class_names"][sub])
        labels = {c: i for i, c in enumerate(names)}
        if not os.path.isdir(os.path.join(ds_dir, "feats", feats_name)):
            have = sorted(os.listdir(os.path.join(ds_dir, "feats"))) if os.path.isdir(os.path.join(ds_dir, "feats")) else []
            raise FileNotFoundError(f"dataset {ds!r}: no features named {feats_name!r} (available: {have})")
        splits = meta["file_names"][sub]
        for split in (TRAIN, TEST):
            if split not in splits:
                raise ValueError(f"dataset {ds!r}: metadata has no {split!r} split")
            unknown = {c for _, c in splits[split]} - set(labels)
            if unknown:
                raise ValueError(f"dataset {ds!r}: {split} samples of classes not in class_names: {sorted(unknown)[:5]}")
        xtr, ytr = _read_split(ds_dir, ds, feats_name, TRAIN, splits[TRAIN], labels)
        xte, yte = _read_split(ds_dir, ds, feats_name, TEST, splits[TEST], labels)
        if dim is not None and xtr.shape[1] != dim:
            raise ValueError(f"dataset {ds!r}: features of dimension {xtr.shape[1]}, other datasets have {dim}")
        if xte.shape[1] != xtr.shape[1]:
            raise ValueError(f"dataset {ds!r}: val features of dimension {xte.shape[1]}, train has {xtr.shape[1]}")
        dim = xtr.shape[1]
        name = ds if sub == "none" else f"{ds}/{sub}"
        tasks.append(Task(name, torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                          torch.from_numpy(yte), len(names)))
    return TaskStream(tasks)


# ---- the converted format ------------------------------------------------------------------------

INDEX = "index.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_npy(folder: str, name: str, array: np.ndarray) -> dict:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(os.path.join(folder, name), buf.getvalue())
    return {"file": name, "shape": list(array.shape), "dtype": str(array.dtype),
            "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def convert_autods(root, out, dtype: str = "float32", feats_name: str | None = None, datasets=None, subset=None,
                   progress: bool = True) -> str:
    """Writes every task of an AutoDS root to ``out`` as ``.npy`` files (features in ``dtype``,
    int64 labels) with a JSON index of shapes, class counts, the feature set and sha256
    checksums. Files are written atomically and the index is rewritten after each finished
    task, so a killed conversion leaves only complete tasks in the index. ``feats_name``,
    ``datasets`` and ``subset`` as in :func:`load_autods`."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    root = os.fspath(root)
    if feats_name is None:
        feats_name = _choose_feature_set(root, _datasets(root, datasets))
    stream = load_autods(root, datasets, feats_name, subset)
    os.makedirs(out, exist_ok=True)
    index = {"format": "bmc_fast-features-v1", "dtype": dtype, "feats_name": feats_name,
             "input_dim": stream.input_dim, "tasks": []}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(stream), desc="convert-autods")
        except ImportError:  # pragma: no cover
            bar = None
    for i, t in enumerate(stream):
        entry = {"name": t.name, "num_classes": t.num_classes}
        for split, x, y in (("train", t.x_train, t.y_train), ("test", t.x_test, t.y_test)):
            entry[split] = {"x": _save_npy(out, f"task{i:04d}.{split}.x.npy", x.numpy().astype(dtype)),
                            "y": _save_npy(out, f"task{i:04d}.{split}.y.npy", y.numpy().astype(np.int64))}
        index["tasks"].append(entry)
        atomic_write_bytes(os.path.join(out, INDEX), json.dumps(index, indent=1).encode())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return os.path.join(out, INDEX)


def _open_npy(folder: str, spec: dict, verify: bool) -> torch.Tensor:
    path = os.path.join(folder, spec["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is listed in {INDEX} but missing")
    if verify and _sha256(path) != spec["sha256"]:
        raise ValueError(f"{path}: checksum mismatch (the file changed or is truncated)")
    try:
        arr = np.load(path, mmap_mode="c", allow_pickle=False)  # copy-on-write map: lazy, writable view
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npy file ({exc})") from None
    if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
        raise ValueError(f"{path}: shape/dtype {list(arr.shape)}/{arr.dtype} differ from the index "
                         f"{spec['shape']}/{spec['dtype']}")
    return torch.from_numpy(arr)


def load_features(folder, verify: bool = False) -> TaskStream:
    """Opens a folder written by :func:`convert_autods` (or ``bmc-fast convert-autods``) as a
    :class:`TaskStream` whose tensors are memory maps: nothing is read until a task is used.
    ``verify=True`` checks every file's sha256 first (reads everything)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {INDEX} in {folder}: not a converted feature folder")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != "bmc_fast-features-v1" or not index.get("tasks"):
        raise ValueError(f"{path}: not a bmc_fast feature index, or it lists no task")
    tasks = []
    for e in index["tasks"]:
        t = {s: {k: _open_npy(folder, e[s][k], verify) for k in ("x", "y")} for s in ("train", "test")}
        tasks.append(Task(e["name"], t["train"]["x"], t["train"]["y"], t["test"]["x"], t["test"]["y"],
                          e["num_classes"], check_values=False))
    return TaskStream(tasks)
