"""Run under ``torchrun``: the loss and gradients of one global batch, saved by rank 0 (tests/test_distributed.py).

Arguments: PHANTOM_FOLDER OUT_FILE; one set of gradients per loss (clip, siglip; siglip with the
self-supervised two-view term added), one of clip with mixup on the head and one of a self-supervised phase's
batch. The model is built from the same seed in every process and every run, so a 1-process and a 2-process run
see the same weights and batch.
"""

import sys

import torch
from safetensors.torch import save_file

import medvl
from medvl.data.captions import CaptionConfig
from medvl.train import distributed
from medvl.train.loop import ContrastiveObjective, TrainConfig

INDICES = list(range(3, 3 + 11))  # one global batch of 11 rows: shards of 5 and 6


def main(folder: str, out_file: str) -> None:
    distributed.init_from_env()
    dataset = medvl.load_dataset(folder).select("train")
    tensors: dict[str, torch.Tensor] = {}
    for loss in ("clip", "siglip"):
        tensors.update(gradients(dataset, loss))
    tensors.update(gradients(dataset, "clip", "mixup", mixup=0.4))
    tensors.update(pretraining_gradients(dataset))
    if distributed.is_main():
        save_file(tensors, out_file)
    distributed.shutdown()
    distributed.exit_process(0)  # as `medvl` does: no interpreter teardown, which can abort a gloo rank


def started_objective(dataset, config: TrainConfig) -> ContrastiveObjective:
    torch.manual_seed(0)
    model = medvl.create_model("vit-tiny")  # layer norm only: no per-rank batch statistics
    objective = ContrastiveObjective(model, dataset, config, CaptionConfig())
    objective.start(None, show_progress=False)
    for module in objective.model.modules():  # dropout masks depend on the shard: switch it off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    objective.model.train()
    return objective


def gradients(dataset, loss: str, name: str | None = None, mixup: float = 0.0) -> dict[str, torch.Tensor]:
    """The gradients of one global batch, keyed ``NAME.grad.PARAMETER`` (``name`` default: the loss); ``mixup``:
    the head's images blended with partners that may sit in the other rank's shard."""
    name = name or loss
    config = TrainConfig(batch_size=12, label_columns=["finding"], supervised_weight=0.5, loss=loss,
                         text_source="both", self_supervised_weight=0.5 if loss == "siglip" else 0.0, mixup=mixup)
    objective = started_objective(dataset, config)
    parts = objective.losses(INDICES, seed=7)
    parts["loss"].backward()
    distributed.average_gradients(objective.model)
    tensors = {f"{name}.grad.{param_name}": torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
               for param_name, p in objective.model.named_parameters() if p.requires_grad}
    tensors[f"{name}.contrastive"] = parts["contrastive"].detach().reshape(1)
    head_loss = distributed.mean_over_ranks({"ce": float(parts["ce_finding"])})["ce"]  # as fit logs it
    tensors[f"{name}.ce_finding"] = torch.tensor([head_loss])
    if "self_supervised" in parts:  # the two-view loss over the global batch of both views
        tensors[f"{name}.self_supervised"] = parts["self_supervised"].detach().reshape(1)
    return tensors


def pretraining_gradients(dataset) -> dict[str, torch.Tensor]:
    """A batch of the self-supervised phase: only the parameters with a gradient (the image tower and the
    view projection; the text side and the head have none, on every rank)."""
    config = TrainConfig(batch_size=12, label_columns=["finding"], supervised_weight=0.5, text_source="both",
                         self_supervised_epochs=1)
    objective = started_objective(dataset, config)
    parts = objective.pretraining_losses(INDICES, seed=7)
    parts["loss"].backward()
    distributed.average_gradients(objective.model)
    tensors = {f"pretraining.grad.{name}": p.grad.detach().clone()
               for name, p in objective.model.named_parameters() if p.requires_grad and p.grad is not None}
    tensors["pretraining.self_supervised"] = parts["loss"].detach().reshape(1)
    return tensors


if __name__ == "__main__":
    main(*sys.argv[1:3])
