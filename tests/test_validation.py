"""Table-driven bad inputs: each raises ValueError/TypeError naming the argument, through both the
fused op and its reference, and never crashes the process. (Mixed floating dtypes are not bad
input: they promote, see test_autocast.py.)"""
import pytest
import torch

import bmc_fast
from bmc_fast import reference

f32 = lambda *s: torch.randn(*s)  # noqa: E731
i64 = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731

SL, WSL, BDL, CE, KD = ("stability_loss", "weight_stability_loss", "batched_distillation_loss",
                        "task_masked_cross_entropy", "task_masked_kd_loss")

CASES = [
    # op, args, kwargs, error, match
    (SL, (f32(3, 4), f32(3, 5)), {}, ValueError, "base"),
    (SL, (f32(3, 4), torch.ones(3, 4, dtype=torch.long)), {}, TypeError, "base"),
    (SL, (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), {}, TypeError, "expert"),
    (SL, (f32(3, 4), f32(3, 4)), {"weights": f32(4)}, ValueError, "weights"),
    (SL, (f32(3, 4), f32(3, 4)), {"weights": torch.tensor([1.0, float("nan"), 1.0])}, ValueError, "weights"),
    (SL, (f32(3, 4), f32(3, 4)), {"weights": torch.tensor([1.0, float("inf"), 1.0])}, ValueError, "weights"),
    (SL, (f32(3, 4), f32(3, 4)), {"reduction": "avg"}, ValueError, "reduction"),
    (SL, (torch.tensor(1.0), torch.tensor(1.0)), {}, ValueError, "expert"),
    (SL, ([1.0, 2.0], f32(2)), {}, TypeError, "expert"),
    (SL, (f32(3, 4), f32(3, 4), torch.ones(3, dtype=torch.long)), {}, TypeError, "weights"),
    (WSL, (f32(3, 10), f32(9)), {}, ValueError, "base_params"),
    (WSL, (f32(30), f32(30)), {}, ValueError, "expert_params"),
    (WSL, (f32(3, 10), f32(10)), {"importance": -torch.rand(10)}, ValueError, "importance"),
    (WSL, (f32(3, 10), f32(10)), {"importance": torch.rand(11)}, ValueError, "importance"),
    (WSL, (f32(3, 10), torch.ones(10, dtype=torch.long)), {}, TypeError, "base_params"),
    (WSL, (f32(3, 10), f32(10)), {"weights": torch.tensor([1.0, 2.0, float("nan")])}, ValueError, "weights"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2, 3), 3), {}, ValueError, "expert_ids"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, -1, 0), 3), {}, ValueError, "expert_ids"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2), 3), {}, ValueError, "expert_ids"),
    (BDL, (f32(4, 8), f32(4, 8), torch.zeros(4), 3), {}, TypeError, "expert_ids"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2, 0), 0), {}, ValueError, "num_experts"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2, 0), 2.5), {}, TypeError, "num_experts"),
    (BDL, (f32(4, 8), f32(4, 9), i64(0, 1, 2, 0), 3), {}, ValueError, "teacher"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2, 0), 3), {"weights": f32(4)}, ValueError, "weights"),
    (BDL, (f32(4, 8), f32(4, 8), i64(0, 1, 2, 0), 3), {"reduction": "max"}, ValueError, "reduction"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 0, 8), i64(5, 5, 2)), {}, ValueError, "labels"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 5, 8), i64(5, 5, 3)), {}, ValueError, "task_offset"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 5, 8), i64(5, 0, 2)), {}, ValueError, "task_len"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, -1, 8), i64(5, 5, 2)), {}, ValueError, "task_offset"),
    (CE, (f32(3, 10), i64(0, 5), i64(0, 5, 8), i64(5, 5, 2)), {}, ValueError, "labels"),
    (CE, (f32(3, 10), torch.zeros(3), i64(0, 5, 8), i64(5, 5, 2)), {}, TypeError, "labels"),
    (CE, (f32(30), i64(0), i64(0), i64(5)), {}, ValueError, "logits"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 5), i64(5, 5, 2)), {}, ValueError, "task_offset"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 5, 8), torch.ones(3)), {}, TypeError, "task_len"),
    (CE, (f32(3, 10), i64(0, 5, 9), i64(0, 5, 8), i64(5, 5, 2)), {"ignore_index": 1.5}, TypeError, "ignore_index"),
    (KD, (f32(3, 10), f32(3, 10), 0, 10), {"temperature": 0.0}, ValueError, "temperature"),
    (KD, (f32(3, 10), f32(3, 10), 0, 10), {"temperature": float("nan")}, ValueError, "temperature"),
    (KD, (f32(3, 10), f32(3, 11), 0, 10), {}, ValueError, "teacher_logits"),
    (KD, (f32(3, 10), torch.ones(3, 10, dtype=torch.long), 0, 10), {}, TypeError, "teacher_logits"),
    (KD, (f32(3, 10), f32(3, 10), i64(0, 5, 8), i64(5, 5, 3)), {}, ValueError, "task_offset"),
    (KD, (f32(3, 10), f32(3, 10), 0, 10), {"reduction": "batchmean"}, ValueError, "reduction"),
]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}-{c[4]}" for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument(case, impl):
    op, args, kwargs, err, match = case
    fn = getattr(bmc_fast if impl == "fused" else reference, op)
    with pytest.raises(err, match=match):
        fn(*args, **kwargs)


def test_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == 5


@pytest.mark.parametrize("op", [SL, BDL, CE])
def test_raw_op_checks_data_in_cpp(op):
    # Data-dependent checks live in the kernels, so calling torch.ops.bmc_fast directly is safe too.
    with pytest.raises(ValueError):
        if op == SL:
            torch.ops.bmc_fast.stability_loss(f32(2, 3), f32(2, 4), None, "sum", False)
        elif op == BDL:
            torch.ops.bmc_fast.batched_distillation_loss(f32(2, 3), f32(2, 3), i64(0, 7), 2, None, "sum", False)
        else:
            torch.ops.bmc_fast.task_masked_cross_entropy(f32(2, 3), i64(0, 2), i64(0, 0), i64(1, 1), "sum", -100,
                                                         False)


def test_mixed_devices_rejected():
    meta = torch.empty(3, 4, device="meta")
    with pytest.raises(ValueError, match="base"):
        bmc_fast.stability_loss(f32(3, 4), meta)
    with pytest.raises(ValueError, match="labels"):
        bmc_fast.task_masked_cross_entropy(f32(3, 4), torch.zeros(3, dtype=torch.long, device="meta"), 0, 4)
