"""The bmc_fast losses in a plain PyTorch training loop.

One ResMLP learns the embedded digits stream task after task. Each task owns a range of the
shared head (``TaskStream.task_range``); ``task_masked_cross_entropy`` takes, for every row, the
offset and length of its task's range, so one batch can mix tasks: here the current task and a
small replay of the earlier ones. Prints each task's task-IL accuracy (argmax inside its range)
at the end.

    python examples/plain_pytorch.py [--tiny]
"""
import argparse

import torch

import bmc_fast
from bmc_fast.data import demo_stream

parser = argparse.ArgumentParser(description="the bmc_fast losses in a plain PyTorch loop")
parser.add_argument("--tiny", action="store_true", help="one epoch per task (what the tests run)")
args = parser.parse_args()

torch.manual_seed(0)
stream = demo_stream()
model = bmc_fast.ResMLP(stream.input_dim, stream.num_classes)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
epochs, batch, replay_per_task = (1 if args.tiny else 5), 64, 50


def rows(t):
    """Task t's training rows: inputs, global labels, and its head range for every row."""
    task, (offset, length) = stream[t], stream.task_range(t)
    n = task.x_train.shape[0]
    return [task.x_train, task.y_train + offset, torch.full((n,), offset), torch.full((n,), length)]


replay = None
for t in range(len(stream)):
    x, y, off, ln = rows(t) if replay is None else [torch.cat(p) for p in zip(rows(t), replay)]
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0]).split(batch):
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            logits, _features = model(x[idx])
            loss = bmc_fast.task_masked_cross_entropy(logits, y[idx], off[idx], ln[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    kept = [v[:replay_per_task] for v in rows(t)]
    replay = kept if replay is None else [torch.cat(p) for p in zip(replay, kept)]

model.eval()
with torch.no_grad():
    for t, task in enumerate(stream):
        offset, length = stream.task_range(t)
        logits, _ = model(task.x_test)
        accuracy = (logits[:, offset:offset + length].argmax(1) == task.y_test).float().mean()
        print(f"{task.name}: task-IL accuracy {accuracy:.3f}")
