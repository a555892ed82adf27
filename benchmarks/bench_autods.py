"""AutoDS reading (issue 6): samples per second through per-item LMDB + pickle (load_autods)
versus the converted memory-mapped format (load_features + reading every value), and the memory
taken by opening a converted 71-task stream."""
import os
import pickle
import resource
import sys
import tempfile
import time

import numpy as np
import torch

import _harness
import shapes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

N, DIM = (20000, 768) if not shapes.QUICK else (500, 32)
TASKS, N_SMALL = (71, 2000) if not shapes.QUICK else (5, 100)


def _write_dataset(root, name, n, dim, seed):
    import lmdb

    rng = np.random.default_rng(seed)
    classes = [f"c{i}" for i in range(10)]
    file_names = {"none": {}}
    for split, m in (("train", n), ("val", max(10, n // 10))):
        path = os.path.join(root, name, "feats", "default", split)
        os.makedirs(path, exist_ok=True)
        env = lmdb.open(path, map_size=max(1 << 26, m * dim * 8))
        entries = []
        with env.begin(write=True) as txn:
            for i in range(m):
                p = f"{name}/{split}/{i}.jpg"
                txn.put(p.encode(), pickle.dumps(rng.standard_normal(dim).astype(np.float32)))
                entries.append((p, classes[i % 10]))
            txn.put(b"file_names", pickle.dumps([p for p, _ in entries]))
        env.close()
        file_names["none"][split] = entries
    torch.save({"file_names": file_names, "class_names": {"none": classes}}, os.path.join(root, name, "metadata.pickle"))


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_autods_read_throughput(benchmark, machine):
    from bmc_fast.data.autods import convert_autods, load_autods, load_features

    with tempfile.TemporaryDirectory() as tmp:
        root, out = os.path.join(tmp, "autods"), os.path.join(tmp, "conv")
        _write_dataset(root, "big", N, DIM, 0)
        convert_autods(root, out, progress=False)
        t_lmdb, t_conv = [], []
        for _ in range(3):  # interleaved
            t0 = time.perf_counter()
            s = load_autods(root)
            float(s[0].x_train.sum())
            t_lmdb.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = load_features(out)
            float(s[0].x_train.sum())  # touch every value
            t_conv.append(time.perf_counter() - t0)
        n = N + max(10, N // 10)
        a, b = n / min(t_lmdb), n / min(t_conv)
        line = (f"AutoDS read, {N} x {DIM} float32 train samples: LMDB+pickle {a:,.0f} samples/s, "
                f"converted {b:,.0f} samples/s, {b / a:.0f}x")
        print("\n" + line)
        benchmark.extra_info.update({"lmdb_samples_per_s": a, "converted_samples_per_s": b, "ratio": b / a})
        _harness.record_run("autods", {"device": "cpu", "bench": "read", "read_samples": N, "dim": DIM,
                                       "lmdb_samples_per_s": a, "converted_samples_per_s": b})
        benchmark.pedantic(lambda: float(load_features(out)[0].x_train.sum()), rounds=3, iterations=1)
        assert b > a


def bench_autods_open_71_tasks(benchmark, machine):
    from bmc_fast.data.autods import load_features
    from bmc_fast.data.autods import _save_npy  # noqa: F401  (format writer)
    import json

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "conv")
        os.makedirs(out)
        rng = np.random.default_rng(0)
        index = {"format": "bmc_fast-features-v1", "dtype": "float16", "input_dim": DIM, "tasks": []}
        from bmc_fast.data.autods import _save_npy as save
        for t in range(TASKS):
            e = {"name": f"task{t:02d}", "num_classes": 10}
            for split, n in (("train", N_SMALL), ("test", N_SMALL // 5)):
                e[split] = {"x": save(out, f"t{t}.{split}.x.npy", rng.standard_normal((n, DIM)).astype(np.float16)),
                            "y": save(out, f"t{t}.{split}.y.npy", (np.arange(n) % 10).astype(np.int64))}
            index["tasks"].append(e)
        with open(os.path.join(out, "index.json"), "w") as f:
            json.dump(index, f)
        size_mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
        before = _rss_mb()
        t0 = time.perf_counter()
        s = load_features(out)
        dt = time.perf_counter() - t0
        grown = _rss_mb() - before
        line = (f"open a converted {TASKS}-task stream ({size_mb:.0f} MB on disk): {dt * 1e3:.0f} ms, "
                f"resident memory +{grown:.1f} MB; peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        print("\n" + line)
        benchmark.extra_info.update({"open_ms": dt * 1e3, "rss_growth_mb": grown, "size_mb": size_mb})
        _harness.record_run("autods", {"device": "cpu", "bench": "open", "tasks": TASKS, "open_ms": dt * 1e3,
                                       "disk_mb": size_mb, "rss_growth_mb": grown})
        benchmark.pedantic(lambda: load_features(out), rounds=3, iterations=1)
        assert len(s) == TASKS and grown < size_mb / 4
