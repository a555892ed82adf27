"""print(task) and print(stream) summarise names, sizes and classes, never tensor contents."""
import torch

from bmc_fast.data import Task, TaskStream, demo_stream


def _task(name, n=6, c=2, d=3):
    return Task(name, torch.randn(n, d), torch.arange(n) % c, torch.randn(4, d), torch.arange(4) % c, c)


def test_task_repr_is_a_summary():
    t = Task("big", torch.randn(50_000, 64), torch.arange(50_000) % 3, torch.randn(7, 64), torch.arange(7) % 3, 3)
    assert repr(t) == "Task('big', 3 classes, input [64] float32, train 50000, test 7)"
    assert str(t) == repr(t) and "tensor" not in repr([t])


def test_stream_repr_lists_tasks_with_their_head_ranges():
    s = demo_stream()
    text = repr(s)
    lines = text.splitlines()
    assert lines[0] == "TaskStream(5 tasks, 10 classes, input [64], train 1258, test 539"
    assert len(lines) == 6 and text.endswith(")") and "tensor" not in text
    for i, line in enumerate(lines[1:]):
        o, n = s.task_range(i)
        assert line.split()[:2] == [str(i), s[i].name]
        assert f"classes [{o}, {o + n})" in line
        assert f"train {s[i].x_train.shape[0]}" in line and f"test {s[i].x_test.shape[0]}" in line


def test_long_stream_repr_shows_first_and_last_tasks():
    s = TaskStream([_task(f"task{i}", c=2 + i % 3) for i in range(40)])
    lines = repr(s).splitlines()
    assert lines[0].startswith("TaskStream(40 tasks, ")
    names = [ln.split()[1] for ln in lines[1:] if not ln.strip().startswith("...")]
    assert names == [f"task{i}" for i in range(9)] + ["task38", "task39"]
    assert "... 29 more tasks" in repr(s)
    o, n = s.task_range(39)
    assert lines[-1].rstrip(")").endswith("test 4") and f"classes [{o}, {o + n})" in lines[-1]
