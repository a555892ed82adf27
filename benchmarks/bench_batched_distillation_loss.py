import pytest
import torch

import bmc_fast
from bmc_fast import reference
import shapes
from _harness import run_case

CONFIGS = [(n, d, k, dt, m) for (n, d, k) in shapes.DISTILLATION for dt in shapes.DTYPES for m in shapes.MODES]


def setup(n, d, k, dtype):
    dtype = getattr(torch, dtype)
    student = torch.randn(n, d).to(dtype)
    teacher = torch.randn(n, d).to(dtype)
    ids = torch.randint(0, k, (n,))
    esz = student.element_size()
    return dtype, (student, teacher, ids), {"fwd": 2 * n * d * esz + 8 * n, "fwd+bwd": 3 * n * d * esz + 8 * n}


@pytest.mark.parametrize("n,d,k,dtype,mode", CONFIGS)
def bench_batched_distillation_loss(benchmark, machine, n, d, k, dtype, mode):
    dt, inputs, nbytes = setup(n, d, k, dtype)
    run_case(benchmark, machine, "batched_distillation_loss", {"N": n, "D": d, "K": k}, dt, mode,
               lambda s, t, i: bmc_fast.batched_distillation_loss(s, t, i, k),
               lambda s, t, i: reference.batched_distillation_loss(s, t, i, k), inputs, [0], nbytes[mode])
