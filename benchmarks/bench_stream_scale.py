"""Stream scale: BMC on a synthetic stream shaped like the 71-task Stream benchmark of CLIP features
(768-D float16 features in the converted, memory-mapped format; 2 to 40 classes a task; uneven
task sizes), at T = 8, 16, 32, 71 tasks: seconds per phase, seconds per task, and the peak
anonymous and file-backed memory of the run, sampled from /proc. Each T runs in its own process
(fresh peaks).

    python benchmarks/bench_stream_scale.py                  # T = 8 16 32 71, 1 + 1 epochs
    python benchmarks/bench_stream_scale.py --tasks 8 16     # some sizes
    python benchmarks/bench_stream_scale.py --full           # the paper's epochs (20 + 100), T = 71: long
    python benchmarks/bench_stream_scale.py --policy keep    # the default memory policy (default here: cap)
    python benchmarks/bench_stream_scale.py --epochs 20 100 --early-stopping 3 --tasks 8   # paper epochs,
                                                             # consolidation stopped on a validation split

Under pytest (``make bench-quick``) a tiny stream checks that the script works.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, TRAIN, TEST = 768, 10_000, 2_000


def task_shape(t: int, train: int, test: int) -> tuple[int, int, int]:
    """(classes, train samples, test samples) of task t: 2..40 classes, sizes from 30% to 170% of
    ``train`` (uneven, as real streams)."""
    classes = 2 + (t * 7) % 39
    scale = 0.3 + 1.4 * ((t * 37) % 71) / 70
    return classes, max(classes * 4, int(train * scale)), max(classes * 2, int(test * scale))


def write_stream(folder: str, n_tasks: int, train: int = TRAIN, test: int = TEST, dim: int = DIM, seed: int = 0):
    """A converted feature folder (bmc_fast.data.load_features) of ``n_tasks`` learnable tasks:
    class means on a random sphere plus Gaussian noise, float16."""
    rng = np.random.default_rng(seed)
    index = {"format": "bmc_fast-features-v1", "dtype": "float16", "input_dim": dim, "tasks": []}
    for t in range(n_tasks):
        c, n_tr, n_te = task_shape(t, train, test)
        means = rng.standard_normal((c, dim)).astype(np.float32)
        entry = {"name": f"task{t:03d}", "num_classes": c}
        for split, n in (("train", n_tr), ("test", n_te)):
            y = rng.integers(0, c, n)
            x = (means[y] + 2.0 * rng.standard_normal((n, dim), dtype=np.float32)).astype(np.float16)
            for kind, arr in (("x", x), ("y", y.astype(np.int64))):
                name = f"task{t:04d}.{split}.{kind}.npy"
                np.save(os.path.join(folder, name), arr, allow_pickle=False)
                entry.setdefault(split, {})[kind] = {"file": name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                                     "sha256": ""}
        index["tasks"].append(entry)
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(index, f)


class _Peaks:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)
                elif line.startswith("RssFile:"):
                    self.file = max(self.file, int(line.split()[1]) * 1024)

    def _run(self):
        while not self._stop.wait(0.02):
            self._sample()

    def stop(self):
        self._stop.set()
        self._t.join()
        self._sample()


def run_one(folder: str, n_tasks: int, epochs: int, consolidation_epochs: int, threads: int,
            policy: str = "cap", early_stopping: int = 0) -> dict:
    """BMC (K = 8, memory 10,000, ``memory_policy=policy``) on the first ``n_tasks`` tasks of
    ``folder``, in this process. ``early_stopping`` > 0: 10% of every consolidation set held out
    for validation, and a consolidation stops after that many epochs without improvement."""
    import torch

    from bmc_fast import BMC, BMCConfig
    from bmc_fast.data import TaskStream, load_features

    torch.set_num_threads(threads)
    peaks = _Peaks()
    stream = TaskStream(load_features(folder).tasks[:n_tasks])
    # "cap": consolidation on the 10,000 samples of the storage budget; "keep" (the default) adds
    # the step's K new buffers in full: up to 90,000 samples here.
    stop = dict(val_fraction=0.1, early_stopping=early_stopping) if early_stopping else {}
    cfg = BMCConfig(n_experts=8, epochs=epochs, consolidation_epochs=consolidation_epochs, memory_size=10_000,
                    buffer_size=10_000, memory_policy=policy, progress=False, **stop)
    runs = []  # epochs each consolidation ran
    t0 = time.perf_counter()
    res = BMC(cfg).fit(stream, events=lambda e: runs.append(e["epochs"]) if e["event"] == "consolidation_done"
                       else None)
    total = time.perf_counter() - t0
    peaks.stop()
    return {"tasks": n_tasks, "classes": stream.num_classes, "total_s": total, "per_task_s": total / n_tasks,
            **{k: v for k, v in res.timings.items()}, "final_cil": res.final_cil_accuracy,
            "peak_anon_mb": peaks.anon / 2**20, "peak_file_mb": peaks.file / 2**20,
            "consolidation_epochs_run": sum(runs) / max(1, len(runs))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[8, 16, 32, 71])
    p.add_argument("--full", action="store_true", help="the paper's epochs (20 expert, 100 consolidation), T = 71")
    p.add_argument("--train", type=int, default=TRAIN, help="train samples of an average task")
    p.add_argument("--test", type=int, default=TEST)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--folder", help="reuse (or write) the stream here")
    p.add_argument("--record", action="store_true", help="merge the figures into this machine kind's results file")
    p.add_argument("--out", default=os.path.join(HERE, "out", "stream_scale.json"))
    p.add_argument("--policy", choices=["keep", "cap"], default="cap",
                   help="BMCConfig.memory_policy: 'keep' (the default of BMCConfig) or 'cap'")
    p.add_argument("--epochs", type=int, nargs=2, metavar=("EXPERT", "CONSOLIDATION"),
                   help="epochs of the experts and of consolidation (default 1 1; --full: 20 100)")
    p.add_argument("--early-stopping", type=int, default=0, metavar="N",
                   help="hold out 10%% of every consolidation set and stop after N epochs without improvement")
    p.add_argument("--one", nargs=4, metavar=("FOLDER", "T", "EPOCHS", "CEPOCHS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.early_stopping < 0:
        p.error(f"--early-stopping must be >= 0, got {a.early_stopping}")
    if a.epochs and min(a.epochs) < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), int(a.one[2]), int(a.one[3]), a.threads, a.policy,
                                 a.early_stopping)))
        return 0
    tasks, (ep, cep) = ([71], (20, 100)) if a.full else (a.tasks, (1, 1))
    if a.epochs:
        ep, cep = a.epochs
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder or tmp
        if not os.path.exists(os.path.join(folder, "index.json")):
            os.makedirs(folder, exist_ok=True)
            t0 = time.perf_counter()
            write_stream(folder, max(tasks), a.train, a.test)
            print(f"wrote {max(tasks)} tasks to {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for t in tasks:
            r = subprocess.run([sys.executable, __file__, "--threads", str(a.threads), "--policy", a.policy,
                                "--early-stopping", str(a.early_stopping), "--one", folder, str(t), str(ep), str(cep)],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(_table(rows[-1:], header=len(rows) == 1), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"epochs": [ep, cep], "threads": a.threads, "policy": a.policy,
                   "early_stopping": a.early_stopping, "rows": rows}, f, indent=1)
    if a.record:
        from bench_contention import _record

        bench = (f"{ep}+{cep}" + ("" if a.policy == "cap" else f", {a.policy}")
                 + (f", early stopping {a.early_stopping}" if a.early_stopping else ""))
        print(_record("stream_scale", {"bench": bench, "epochs": [ep, cep], "policy": a.policy,
                                       "early_stopping": a.early_stopping, "rows": rows}))
    return 0


COLUMNS = ["tasks", "classes", "experts_s", "buffers_s", "consolidation_s", "evaluation_s", "total_s", "per_task_s",
           "peak_anon_mb", "peak_file_mb", "final_cil", "consolidation_epochs_run"]


def _table(rows, header=True) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] if header else []
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows])


def bench_stream_scale_script_runs(tmp_path):
    out = tmp_path / "scale.json"
    assert main(["--tasks", "3", "5", "--train", "120", "--test", "40", "--threads", "1", "--folder",
                 str(tmp_path / "stream"), "--out", str(out), "--policy", "keep"]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["tasks"] for r in rows] == [3, 5] and doc["policy"] == "keep"
    assert main(["--tasks", "5", "--train", "120", "--test", "40", "--threads", "1", "--folder",
                 str(tmp_path / "stream"), "--out", str(out), "--policy", "keep", "--epochs", "1", "6",
                 "--early-stopping", "1"]) == 0
    doc = json.loads(out.read_text())
    assert doc["early_stopping"] == 1 and doc["epochs"] == [1, 6]
    assert 2 <= doc["rows"][0]["consolidation_epochs_run"] <= 6  # stops after one epoch without improvement
    assert all(r["total_s"] > 0 and r["peak_anon_mb"] > 0 and 0 <= r["final_cil"] <= 1 for r in rows)


if __name__ == "__main__":
    sys.exit(main())
