"""AutoDS feature folders: exact layout fixtures built with lmdb and torch.save."""
import json
import os
import pickle

import lmdb
import numpy as np
import pytest
import torch

from bmc_fast import BMC, BMCConfig
from bmc_fast.data.autods import (UnsafePickleError, convert_autods, feature_sets, load_autods, load_features,
                                  safe_unpickle)

DIM = 12


def write_lmdb(path, items: dict, file_names, raw=None):
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode("utf-8"), pickle.dumps(v))
        txn.put(b"file_names", pickle.dumps(list(file_names)))
        for k, v in (raw or {}).items():
            txn.put(k.encode("utf-8"), v)
    env.close()


def make_dataset(root, name, classes, subset="none", n_train=6, n_val=3, val_classes=None, dim=DIM, seed=0):
    """Writes <root>/<name>/metadata.pickle and feats/default/{train,val}; returns {path: (vector, class)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    file_names = {subset: {}}
    for split, n, cls in (("train", n_train, classes), ("val", n_val, val_classes or classes)):
        items, entries = {}, []
        for i in range(n):
            c = cls[i % len(cls)]
            p = f"{name}/{split}/{c}/{i}.jpg"
            v = rng.standard_normal(dim).astype(np.float32)
            items[p] = v
            entries.append((p, c))
            truth[p] = (v, c)
        file_names[subset][split] = entries
        write_lmdb(os.path.join(root, name, "feats", "default", split), items, [p for p, _ in entries])
    torch.save({"file_names": file_names, "class_names": {subset: list(classes)}},
               os.path.join(root, name, "metadata.pickle"))
    return truth


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "autods"
    truth = {}
    truth.update(make_dataset(r, "cars", ["sedan", "coupe", "van"], seed=1))
    truth.update(make_dataset(r, "birds", ["owl", "crow"], subset="passerines", seed=2, n_val=2,
                              val_classes=["owl"]))  # the val split lacks a class
    truth.update(make_dataset(r, "apples", ["red", "green"], seed=3))
    return r, truth


def test_load_autods_labels_offsets_values(root):
    r, truth = root
    s = load_autods(r)
    assert [t.name for t in s] == ["apples", "birds/passerines", "cars"]  # alphabetical
    assert s.offsets == [0, 2, 4] and s.num_classes == 7 and s.input_dim == DIM
    meta_order = {"apples": ["green", "red"], "birds/passerines": ["crow", "owl"], "cars": ["coupe", "sedan", "van"]}
    for t in s:
        ds = t.name.split("/")[0]
        for split, x, y in (("train", t.x_train, t.y_train), ("val", t.x_test, t.y_test)):
            paths = [p for p in truth if p.startswith(f"{ds}/{split}/")]
            paths.sort(key=lambda p: int(p.rsplit("/", 1)[1].split(".")[0]))
            for i, p in enumerate(paths):
                v, c = truth[p]
                np.testing.assert_array_equal(x[i].numpy(), v)
                assert int(y[i]) == meta_order[t.name].index(c)  # sorted class names, same for val
    birds = s[1]
    assert set(birds.y_test.tolist()) == {1}  # only "owl" in val, still label 1


def test_subset_and_dataset_selection(root):
    r, _ = root
    s = load_autods(r, datasets=["cars", "birds"], subset={"birds": "passerines"})
    assert [t.name for t in s] == ["birds/passerines", "cars"]
    with pytest.raises(ValueError, match="no subset"):
        load_autods(r, datasets=["birds"], subset="raptors")


@pytest.mark.parametrize("breakage, error, match", [
    ("missing_root", FileNotFoundError, "root not found"),
    ("missing_dataset", FileNotFoundError, "not found"),
    ("missing_split", FileNotFoundError, "data.mdb"),
    ("missing_key", KeyError, "no features for key"),
    ("wrong_dim", ValueError, "dimension"),
    ("corrupt_lmdb", ValueError, "LMDB"),
    ("empty_split", ValueError, "empty"),
    ("feats_name", FileNotFoundError, "no features named"),
])
def test_clear_errors(tmp_path, breakage, error, match):
    r = tmp_path / "a"
    make_dataset(r, "cars", ["sedan", "coupe"])
    kwargs = {}
    if breakage == "missing_root":
        r = tmp_path / "nowhere"
    elif breakage == "missing_dataset":
        kwargs["datasets"] = ["planes"]
    elif breakage == "missing_split":
        os.remove(r / "cars" / "feats" / "default" / "val" / "data.mdb")
    elif breakage == "missing_key":
        meta = torch.load(r / "cars" / "metadata.pickle")
        meta["file_names"]["none"]["train"].append(("cars/train/sedan/99.jpg", "sedan"))
        torch.save(meta, r / "cars" / "metadata.pickle")
    elif breakage == "wrong_dim":
        write_lmdb(str(r / "cars" / "feats" / "default" / "val"),
                   {"cars/val/sedan/0.jpg": np.zeros(DIM), "cars/val/coupe/1.jpg": np.zeros(DIM + 1),
                    "cars/val/sedan/2.jpg": np.zeros(DIM)}, [])
    elif breakage == "corrupt_lmdb":
        f = r / "cars" / "feats" / "default" / "train" / "data.mdb"
        f.write_bytes(f.read_bytes()[:100])
    elif breakage == "empty_split":
        meta = torch.load(r / "cars" / "metadata.pickle")
        meta["file_names"]["none"]["val"] = []
        torch.save(meta, r / "cars" / "metadata.pickle")
    elif breakage == "feats_name":
        kwargs["feats_name"] = "clip"
    with pytest.raises(error, match=match):
        load_autods(r, **kwargs)


def test_feature_set_is_chosen_only_when_there_is_one(tmp_path):
    import shutil

    r = tmp_path / "a"
    make_dataset(r, "cars", ["sedan", "coupe"], seed=1)
    make_dataset(r, "apples", ["red", "green"], seed=2)
    assert feature_sets(r) == ["default"] and len(load_autods(r)) == 2
    shutil.copytree(r / "cars" / "feats" / "default", r / "cars" / "feats" / "clip")
    assert feature_sets(r) == ["default"]  # only what every dataset has
    assert feature_sets(r, datasets=["cars"]) == ["clip", "default"]
    assert len(load_autods(r)) == 2
    with pytest.raises(ValueError, match=r"several feature sets \['clip', 'default'\]"):
        load_autods(r, datasets=["cars"])
    assert len(load_autods(r, datasets=["cars"], feats_name="clip")) == 1
    shutil.rmtree(r / "apples" / "feats" / "default")
    with pytest.raises(FileNotFoundError, match="no feature set common"):
        convert_autods(r, tmp_path / "out", progress=False)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/bmc_fast_pwned",))


def test_crafted_pickle_is_refused(tmp_path):
    if os.path.exists("/tmp/bmc_fast_pwned"):
        os.remove("/tmp/bmc_fast_pwned")
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        safe_unpickle(pickle.dumps(Evil()), "test")
    r = tmp_path / "a"
    make_dataset(r, "cars", ["sedan", "coupe"])
    write_lmdb(str(r / "cars" / "feats" / "default" / "train"), {}, [],
               raw={f"cars/train/{c}/{i}.jpg": pickle.dumps(Evil()) for i, c in
                    enumerate(["sedan", "coupe"] * 3)})
    with pytest.raises(UnsafePickleError, match="cars/train/sedan/0.jpg"):
        load_autods(r)
    # metadata: torch.load(weights_only=True) refuses code too
    torch.save({"file_names": Evil(), "class_names": {}}, r / "cars" / "metadata.pickle")
    with pytest.raises(ValueError, match="metadata"):
        load_autods(r)
    assert not os.path.exists("/tmp/bmc_fast_pwned")
    assert isinstance(safe_unpickle(pickle.dumps({"a": [np.arange(3), (1.5, "x")]})), dict)


def test_convert_and_load_features_lazily(root, tmp_path):
    r, _ = root
    out = tmp_path / "conv"
    convert_autods(r, out, dtype="float16", progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "float16" and len(index["tasks"]) == 3
    a, b = load_autods(r), load_features(out, verify=True)
    assert [t.name for t in a] == [t.name for t in b] and a.offsets == b.offsets
    for ta, tb in zip(a, b):
        torch.testing.assert_close(tb.x_train.float(), ta.x_train, rtol=1e-3, atol=1e-3)
        assert torch.equal(ta.y_test, tb.y_test)
    # a file changed after conversion is caught by verify=True
    f = out / index["tasks"][0]["train"]["x"]["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_features(out, verify=True)


def test_killed_conversion_leaves_only_complete_tasks(root, tmp_path, monkeypatch):
    r, _ = root
    out = tmp_path / "conv"
    import bmc_fast.data.autods as A

    calls = {"n": 0}
    real = A._save_npy

    def dying(folder, name, array):
        calls["n"] += 1
        if calls["n"] == 6:  # task 1's second file
            raise KeyboardInterrupt
        return real(folder, name, array)

    monkeypatch.setattr(A, "_save_npy", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_autods(r, out, progress=False)
    s = load_features(out, verify=True)
    assert len(s) == 1 and s[0].name == "apples"


def test_bmc_trains_on_a_loaded_stream(root, tmp_path):
    r, _ = root
    convert_autods(r, tmp_path / "conv", progress=False)
    s = load_features(tmp_path / "conv")
    res = BMC(BMCConfig(n_experts=2, epochs=1, consolidation_epochs=1, batch_size=4, consolidation_batch_size=4,
                        progress=False)).fit(s)
    assert res.cil_matrix.shape == (3, 3) and np.isfinite(res.cil_matrix[2]).all()


def test_cli_convert_autods(root, tmp_path):
    import subprocess
    import sys

    r, _ = root
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "-m", "bmc_fast", "convert-autods", str(r), str(out), "--dtype", "float16",
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(load_features(out)) == 3
