"""BMC inside Avalanche, beside Avalanche's own Replay, on one benchmark with one evaluator.

An Avalanche benchmark built from tensors (the embedded digits stream: 5 experiences of 2
classes, global class ids); ``BMCStrategy`` trains K = 2 experts per incremental step and
consolidates, through bmc_fast's trainer; Avalanche's Replay trains on the same benchmark with
the same memory budget, plus bmc_fast's stability loss as a plugin. Both are evaluated by
Avalanche's ``EvaluationPlugin``; prints one table of final accuracies. Needs the [avalanche]
extra.

    python examples/avalanche_bmc.py [--tiny]
"""
import argparse
import time

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Replay
from avalanche.training.plugins import EvaluationPlugin

import bmc_fast
from bmc_fast.data import demo_stream
from bmc_fast.integrations.avalanche import (BMCStrategy, LogitsModel, StabilityPlugin, TaskMaskedCrossEntropy,
                                             benchmark_from_stream)

parser = argparse.ArgumentParser(description="BMC and Replay in one Avalanche experiment")
parser.add_argument("--tiny", action="store_true", help="one epoch each (what the tests run)")
args = parser.parse_args()

stream = demo_stream()
benchmark = benchmark_from_stream(stream)   # or any benchmark whose experiences bring the next classes
epochs, consolidation = (1, 1) if args.tiny else (5, 20)
memory = 200
config = bmc_fast.BMCConfig(n_experts=2, epochs=epochs, consolidation_epochs=consolidation, memory_size=memory,
                            progress=False)


def evaluator():
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def model():
    return bmc_fast.ResMLP(stream.input_dim, stream.num_classes)   # returns (logits, features)


torch.manual_seed(0)
bmc = BMCStrategy(model=model(), config=config, evaluator=evaluator())
net = LogitsModel(model())                     # Avalanche's strategies take a model returning logits
replay = Replay(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.01),
                criterion=TaskMaskedCrossEntropy(), mem_size=memory, train_mb_size=64, train_epochs=epochs,
                eval_mb_size=1024, plugins=[StabilityPlugin(coef=1.0)], evaluator=evaluator())

rows = []
for name, strategy in (("bmc (K = 2)", bmc), ("replay + stability", replay)):
    t0 = time.perf_counter()
    if strategy is bmc:
        for start in range(0, len(benchmark.train_stream), 2):
            strategy.train(benchmark.train_stream[start:start + 2])   # K experiences a call: K experts
    else:
        for experience in benchmark.train_stream:
            strategy.train(experience)
    seconds = time.perf_counter() - t0
    metrics = strategy.eval(benchmark.test_stream)
    rows.append((name, metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"], seconds))

print(f"{'strategy':22s} {'final accuracy':>15s} {'train s':>8s}")
for name, acc, seconds in rows:
    print(f"{name:22s} {acc:15.3f} {seconds:8.1f}")
