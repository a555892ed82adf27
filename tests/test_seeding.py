"""Named random streams: keyed by what a draw belongs to, and the caller's RNG left alone."""

import torch

import bmc_fast
from bmc_fast import BMC, BMCConfig
from bmc_fast.data import demo_stream
from bmc_fast.train import seeding
from bmc_fast.train.distributed import rank_tasks
from bmc_fast.train.experts import train_experts


def test_streams_are_stable_and_distinct():
    a = seeding.derive(0, "expert_batches", 3)
    assert a == seeding.derive(0, "expert_batches", 3)
    assert len({a, seeding.derive(0, "buffer", 3), seeding.derive(0, "expert_batches", 4),
                seeding.derive(1, "expert_batches", 3)}) == 4
    assert 0 <= a < 2**63
    try:
        seeding.derive(0, "no such stream")
    except ValueError as exc:
        assert "no such stream" in str(exc)
    else:
        raise AssertionError("an unknown stream must be refused")


def test_fit_and_baselines_leave_the_global_rng_untouched():
    from bmc_fast.train.baselines import finetune, joint

    torch.manual_seed(123)
    before = torch.get_rng_state()
    stream = demo_stream()
    cfg = BMCConfig(n_experts=2, epochs=1, consolidation_epochs=1, progress=False)
    BMC(cfg).fit(stream)
    finetune(stream, cfg, lambda d, c: bmc_fast.ResMLP(d, c))
    joint(stream, cfg, lambda d, c: bmc_fast.ResMLP(d, c), epochs=1)
    assert torch.equal(before, torch.get_rng_state())


def test_fit_does_not_depend_on_the_callers_rng():
    stream = demo_stream()
    cfg = BMCConfig(n_experts=2, epochs=1, consolidation_epochs=1, progress=False, fused_step=False)
    res = []
    for s in (1, 2):
        torch.manual_seed(s)
        res.append(BMC(cfg).fit(stream).cil_matrix)
    torch.testing.assert_close(torch.from_numpy(res[0]), torch.from_numpy(res[1]), equal_nan=True)


def test_rank_blocks_are_consecutive_and_cover_the_step():
    for k in range(1, 8):
        ids = list(range(10, 10 + k))
        for world in range(1, k + 1):
            parts = [rank_tasks(ids, r, world) for r in range(world)]
            assert sum(parts, []) == ids
            assert all(p == list(range(p[0], p[0] + len(p))) for p in parts if p)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _experts(stream, ids, mode, fused_step=True):
    torch.manual_seed(0)
    base = bmc_fast.ResMLP(stream.input_dim, stream.num_classes, dropout=0.3)
    cfg = BMCConfig(n_experts=len(ids), parallel=mode, epochs=1, batch_size=32, keep_expert_states=True,
                    progress=False, fused_step=fused_step)
    return train_experts(base, stream, ids, cfg, step_index=1, use_stability=True,
                         steps=12)


def test_an_experts_dropout_does_not_depend_on_its_stack_slot():
    # Task 3 trained alone, or in the stack [2, 3] (slot 1), or in [3, 4] (slot 0), or one model at
    # a time: the same expert up to float rounding.
    stream = demo_stream()
    runs = [_experts(stream, [3], "stacked")[0], _experts(stream, [2, 3], "stacked")[1],
            _experts(stream, [3, 4], "stacked")[0], _experts(stream, [2, 3], "sequential")[1],
            _experts(stream, [2, 3], "stacked", fused_step=False)[1]]
    ref = runs[0].state
    for art in runs[1:]:
        for n, v in art.state.items():
            torch.testing.assert_close(v, ref[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
