import pytest

import bmc_fast
from bmc_fast import reference
import shapes
from _harness import run_case
from _masked_inputs import masked_inputs

CONFIGS = [(n, c, dt, m) for (n, c) in shapes.MASKED for dt in shapes.DTYPES for m in shapes.MODES]


@pytest.mark.parametrize("n,c,dtype,mode", CONFIGS)
def bench_task_masked_kd_loss(benchmark, machine, n, c, dtype, mode):
    dt, inputs, nbytes = masked_inputs(n, c, dtype, teacher=True)
    run_case(benchmark, machine, "task_masked_kd_loss", {"N": n, "C": c}, dt, mode,
               lambda s, t, o, l: bmc_fast.task_masked_kd_loss(s, t, o, l, 2.0),  # noqa: E741
               lambda s, t, o, l: reference.task_masked_kd_loss(s, t, o, l, 2.0), inputs, [0], nbytes[mode])  # noqa: E741
