"""The thread count the steps choose under load, and that the choice changes speed, not results."""
import pytest
import torch

from bmc_fast import BMC, BMCConfig
from bmc_fast.data import demo_stream
from bmc_fast.train import threads
from bmc_fast.train.threads import ThreadTuner




def _run(tuner, seconds_per_step, steps=40):
    """Ticks ``steps`` steps whose duration is seconds_per_step(thread count), on a fake clock."""
    now = [0.0]
    real = threads.time.perf_counter
    threads.time.perf_counter = lambda: now[0]
    used = []
    try:
        with tuner:
            for _ in range(steps):
                n = torch.get_num_threads()
                used.append(n)
                now[0] += seconds_per_step(n)
                threads.tick()
    finally:
        threads.time.perf_counter = real
    return used


@pytest.mark.parametrize("fast, slow", [(1, 2), (2, 1)])
def test_the_tuner_keeps_the_faster_thread_count(two_threads, fast, slow):
    tuner = ThreadTuner("auto", trial_steps=3, hold_s=1.0)
    used = _run(tuner, lambda n: 0.01 if n == fast else 0.03)
    assert tuner.choice == fast
    assert used[:4] == [2] * 4 and slow in used and used[-5:] == [fast] * 5  # trials, then the faster
    assert torch.get_num_threads() == 2  # restored


def test_the_tuner_tries_again_after_its_hold(two_threads):
    tuner = ThreadTuner("auto", trial_steps=3, hold_s=0.2)
    calls = {"n": 0}

    def step(n):  # the machine gets busy halfway: then one thread is faster
        calls["n"] += 1
        busy = calls["n"] > 40
        return (0.01 if n == 2 else 0.02) if not busy else (0.04 if n == 2 else 0.02)

    _run(tuner, step, steps=120)
    assert tuner.choice == 1


def test_fixed_and_untouched_thread_counts(two_threads):
    with ThreadTuner(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with ThreadTuner(None):
        assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads"):
        BMCConfig(threads=0)


def test_the_thread_count_changes_no_result(two_threads):
    stream = demo_stream()
    out = []
    for t in (1, 2, "auto"):
        cfg = BMCConfig(n_experts=2, epochs=1, consolidation_epochs=2, progress=False, threads=t)
        bmc = BMC(cfg)
        res = bmc.fit(stream)
        out.append((res.cil_matrix, bmc.model.state_dict()))
        assert torch.get_num_threads() == 2
    for cil, state in out[1:]:
        torch.testing.assert_close(torch.from_numpy(cil), torch.from_numpy(out[0][0]), equal_nan=True, rtol=0, atol=0)
        for k, v in state.items():
            assert torch.equal(v, out[0][1][k]), k
