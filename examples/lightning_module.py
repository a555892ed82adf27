"""A Lightning module trained with the bmc_fast losses.

Multi-task training of one ResMLP on all tasks of the embedded digits stream at once: every
batch mixes tasks, and ``bmc_fast.nn.TaskMaskedCrossEntropy`` restricts each row's softmax to
its own task's range of the shared head (offsets and lengths from ``TaskStream.task_range``),
so the tasks never compete for logits. Validation reports task-IL accuracy. Needs
``pip install lightning``.

    python examples/lightning_module.py [--tiny]
"""
import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import bmc_fast
from bmc_fast.data import demo_stream


def task_il_dataset(stream, split: str) -> TensorDataset:
    """Every task's rows with global labels and the head range of their task."""
    parts = []
    for t, task in enumerate(stream):
        x, y = (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
        offset, length = stream.task_range(t)
        parts.append((x, y + offset, torch.full_like(y, offset), torch.full_like(y, length)))
    return TensorDataset(*(torch.cat(c) for c in zip(*parts)))


class TaskILModule(L.LightningModule):
    def __init__(self, input_dim: int, num_classes: int, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.model = bmc_fast.ResMLP(input_dim, num_classes)
        self.loss = bmc_fast.nn.TaskMaskedCrossEntropy()

    def training_step(self, batch, batch_idx):
        x, y, offset, length = batch
        logits, _features = self.model(x)
        loss = self.loss(logits, y, offset, length)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, offset, length = batch
        logits, _ = self.model(x)
        cols = torch.arange(logits.shape[1], device=x.device)
        inside = (cols >= offset[:, None]) & (cols < (offset + length)[:, None])  # each row's own range
        predicted = logits.masked_fill(~inside, float("-inf")).argmax(1)
        self.log("task_il_accuracy", (predicted == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a Lightning module trained with the bmc_fast losses")
    parser.add_argument("--tiny", action="store_true", help="a few batches only (what the tests run)")
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    stream = demo_stream()
    train = DataLoader(task_il_dataset(stream, "train"), batch_size=64, shuffle=True, drop_last=True)
    val = DataLoader(task_il_dataset(stream, "test"), batch_size=256)
    trainer = L.Trainer(max_epochs=1 if args.tiny else 10, limit_train_batches=3 if args.tiny else 1.0,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=not args.tiny)
    trainer.fit(TaskILModule(stream.input_dim, stream.num_classes), train, val)
    print(f"task-IL accuracy {trainer.callback_metrics['task_il_accuracy']:.3f}")
