"""K experts trained at once with ``stability_loss``, in your own loop.

BMC's regularization phase by hand: K copies of a base model, one per task of the embedded
digits stream, stacked with ``torch.func.stack_module_state`` and run as one ``vmap``-ed model
over ``[K, B, ...]`` batches. ``stability_loss`` keeps each expert's features near those that a
frozen copy of the base gives on the same batch; ``task_masked_cross_entropy`` trains each
expert on its own task's range of the shared head. Prints each expert's task-IL accuracy and
how far its features moved from the base's.

    python examples/stacked_experts.py [--tiny]
"""
import argparse
import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

import bmc_fast
from bmc_fast.data import demo_stream

parser = argparse.ArgumentParser(description="stacked experts with stability_loss")
parser.add_argument("--tiny", action="store_true", help="a few steps only (what the tests run)")
args = parser.parse_args()

torch.manual_seed(0)
stream = demo_stream()
k, batch, steps = len(stream), 32, (3 if args.tiny else 150)
base = bmc_fast.ResMLP(stream.input_dim, stream.num_classes)  # in BMC: the consolidated model so far
frozen = copy.deepcopy(base).eval().requires_grad_(False)

params, buffers = stack_module_state([copy.deepcopy(base) for _ in range(k)])  # leaves of shape [K, ...]
skeleton = copy.deepcopy(base).to("meta")
experts = vmap(lambda p, b, x: functional_call(skeleton, (p, b), (x,)), randomness="different")
opt = torch.optim.AdamW(params.values(), lr=1e-2)
ranges = torch.tensor([stream.task_range(t) for t in range(k)])  # [K, 2]: offset, length
offsets, lengths = ranges[:, 0].repeat_interleave(batch), ranges[:, 1].repeat_interleave(batch)

for step in range(steps):
    rows = [torch.randint(0, t.x_train.shape[0], (batch,)) for t in stream]
    x = torch.stack([t.x_train[r] for t, r in zip(stream, rows)])                  # [K, B, D]
    y = torch.stack([t.y_train[r] for t, r in zip(stream, rows)]) + ranges[:, :1]  # global labels
    logits, features = experts(params, buffers, x)                                  # [K, B, C], [K, B, F]
    with torch.no_grad():
        base_features = frozen(x.flatten(0, 1))[1].view_as(features)
    loss = (bmc_fast.task_masked_cross_entropy(logits.flatten(0, 1), y.flatten(), offsets, lengths)
            + bmc_fast.stability_loss(features, base_features))  # summed over the K experts
    opt.zero_grad()
    loss.backward()
    opt.step()

for t, task in enumerate(stream):
    expert = copy.deepcopy(base)
    expert.load_state_dict({n: v[t] for n, v in {**params, **buffers}.items()})
    expert.eval()
    with torch.no_grad():
        logits, feats = expert(task.x_test)
        drift = bmc_fast.stability_loss(feats[None], frozen(task.x_test)[1][None])
    offset, length = stream.task_range(t)
    accuracy = (logits[:, offset:offset + length].argmax(1) == task.y_test).float().mean()
    print(f"expert {t} ({task.name}): task-IL accuracy {accuracy:.3f}, feature drift {drift:.4f}")
