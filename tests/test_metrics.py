"""Accuracy matrices from one evaluation per model, and what the summaries mean."""
import numpy as np
import pytest
import torch

from bmc_fast.backbone import ResMLP, inference_rows
from bmc_fast.data import Task, TaskStream
from bmc_fast.train.metrics import Result, evaluate_rows


def _stream(sizes=(2, 3, 2, 4), n=37, d=5):
    g = torch.Generator().manual_seed(0)
    return TaskStream([Task(f"t{i}", torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g),
                            torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), c)
                       for i, c in enumerate(sizes)])


class _Model(torch.nn.Module):
    def __init__(self, d, c):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(d, c)

    def forward(self, x):
        return self.lin(x), x


def _naive(model, stream, i, full_head):
    seen = stream.offsets[i] + stream[i].num_classes
    cil, til = [], []
    for j in range(i + 1):
        o, n = stream.task_range(j)
        logits = model(stream[j].x_test)[0]
        pred = (logits if full_head else logits[:, :seen]).argmax(1)
        cil.append(float((pred == stream[j].y_test + o).float().mean()))
        til.append(float((logits[:, o:o + n].argmax(1) == stream[j].y_test).float().mean()))
    return cil, til


@pytest.mark.parametrize("full_head", [False, True])
@pytest.mark.parametrize("chunk", [7, 8192, None])
def test_rows_from_one_pass_equal_the_per_row_evaluation(full_head, chunk):
    stream = _stream()
    model = _Model(5, stream.num_classes)
    with torch.no_grad():
        model.lin.bias[3] = 5.0  # a class of task 1 that wins often: rows 0 and 1+ differ
        got = evaluate_rows(model, stream, [0, 1, 3], "cpu", full_head, batch=chunk)
        for i in (0, 1, 3):
            want = _naive(model, stream, i, full_head)
            np.testing.assert_allclose(got[i][0], want[0])
            np.testing.assert_allclose(got[i][1], want[1])


def test_backward_transfer_compares_with_the_accuracy_after_consolidation():
    # Two steps of two tasks: task 0's mid-step row (before its consolidation) shows 0.1; just
    # after consolidation (row 1) it is 0.9; at the end 0.7. BWT counts 0.7 - 0.9, not 0.7 - 0.1.
    nan = np.nan
    cil = np.array([[0.1, nan, nan, nan], [0.9, 0.8, nan, nan], [0.9, 0.8, 0.1, nan], [0.7, 0.6, 0.9, 0.9]])
    r = Result(["a", "b", "c", "d"], cil, cil.copy(), step_starts=[0, 2])
    assert r.just_learned(0) == pytest.approx(0.9)
    assert r.backward_transfer == pytest.approx(((0.7 - 0.9) + (0.6 - 0.8)) / 2)
    assert r.forgetting == pytest.approx(((0.9 - 0.7) + (0.8 - 0.6)) / 2)


def test_the_default_model_is_evaluated_on_the_seen_classes_only():
    # The ResMLP's rows come from a copy with the head rows of the classes seen (the others are
    # never read unless full_head): same accuracies as the whole model.
    from bmc_fast import ResMLP

    stream = _stream()
    torch.manual_seed(2)
    model = ResMLP(5, stream.num_classes, hidden=8, width=16).eval()
    with torch.no_grad():
        got = evaluate_rows(model, stream, [0, 2], "cpu")
        for i in (0, 2):
            want = _naive(lambda x: model(x), stream, i, False)
            np.testing.assert_allclose(got[i][0], want[0])
            np.testing.assert_allclose(got[i][1], want[1])


def test_the_default_chunks_give_the_matrices_of_one_pass_per_task():
    """Tasks larger than the CPU's inference chunk: the same accuracies as whole-task passes."""
    rows = inference_rows("cpu")
    assert rows == 2048 and inference_rows("meta") == 8192
    stream = _stream(sizes=(3, 5), n=rows + 300, d=16)
    torch.manual_seed(0)
    model = ResMLP(16, stream.num_classes)
    chunked = evaluate_rows(model, stream, [0, 1], "cpu")
    whole = evaluate_rows(model, stream, [0, 1], "cpu", batch=10 * rows)
    assert chunked == whole
    assert 0 < chunked[1][0][0] < 1


def test_a_chunk_of_no_rows_is_refused():
    stream = _stream()
    with pytest.raises(ValueError, match="batch must be a positive number of rows, got 0"):
        evaluate_rows(_Model(5, stream.num_classes), stream, [0], "cpu", batch=0)
