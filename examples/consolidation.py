"""Consolidation with ``batched_distillation_loss`` over your own buffers.

BMC's consolidation phase by hand. K experts (here: copies of the base, each trained briefly on
one task of the embedded digits stream) each leave a buffer: some samples of their task, the
features the expert gives them, and the expert's id. The base model then learns from the union
of the buffers (the memory): cross-entropy over the classes seen so far plus
``batched_distillation_loss``, which pulls the base's features towards each expert's and
averages per expert, so a large buffer does not drown a small one. Prints the consolidated
model's class-IL accuracy on every task.

    python examples/consolidation.py [--tiny]
"""
import argparse
import copy

import torch

import bmc_fast
from bmc_fast.data import demo_stream

parser = argparse.ArgumentParser(description="consolidation with batched_distillation_loss")
parser.add_argument("--tiny", action="store_true", help="a few steps only (what the tests run)")
args = parser.parse_args()

torch.manual_seed(0)
stream = demo_stream()
k, batch, per_buffer = len(stream), 64, 100
expert_steps, epochs = (3, 1) if args.tiny else (100, 20)
base = bmc_fast.ResMLP(stream.input_dim, stream.num_classes)

buffers = []  # (inputs, global labels, expert features, expert id) per expert
for t, task in enumerate(stream):
    offset, length = stream.task_range(t)
    expert = copy.deepcopy(base)
    opt = torch.optim.AdamW(expert.parameters(), lr=1e-2)
    for _ in range(expert_steps):
        rows = torch.randint(0, task.x_train.shape[0], (batch,))
        logits, _ = expert(task.x_train[rows])
        loss = bmc_fast.task_masked_cross_entropy(logits, task.y_train[rows] + offset, offset, length)
        opt.zero_grad()
        loss.backward()
        opt.step()
    keep = torch.randperm(task.x_train.shape[0])[:per_buffer]
    with torch.no_grad():
        features = expert.eval()(task.x_train[keep])[1]
    buffers.append((task.x_train[keep], task.y_train[keep] + offset, features, torch.full((len(keep),), t)))

x, y, teacher, expert_id = (torch.cat(parts) for parts in zip(*buffers))  # the memory
opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
base.train()
for _ in range(epochs):
    for rows in torch.randperm(x.shape[0]).split(batch):
        logits, features = base(x[rows])
        ce = torch.nn.functional.cross_entropy(logits, y[rows])  # every class seen so far
        distill = bmc_fast.batched_distillation_loss(features, teacher[rows], expert_id[rows], num_experts=k,
                                                     reduction="mean")
        opt.zero_grad()
        (ce + distill).backward()
        opt.step()

base.eval()
with torch.no_grad():
    for t, task in enumerate(stream):
        offset, _ = stream.task_range(t)
        accuracy = (base(task.x_test)[0].argmax(1) == task.y_test + offset).float().mean()
        print(f"{task.name}: class-IL accuracy {accuracy:.3f}")
