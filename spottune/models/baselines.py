"""The baselines SpotTune is measured against; same engine, same budget, same head.

finetune  every layer trains (the paper's baseline)
linear    frozen features, only the new head trains (linear probe)
lastk     the last k blocks, the neck and the head train
l2sp      every layer trains, pulled toward its pretrained value (Li et al., 2018) instead of zero
"""

from __future__ import annotations

import torch
from torch import nn

from spottune.config import OptimParams
from spottune.errors import ConfigError
from spottune.models.backbones import Backbone
from spottune.models.base import ModelOutput, TransferModel, new_head, trainable
from spottune.models.block_graphs import BlockGraphs


class FineTuneNet(TransferModel):
    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        method: str = "finetune",
        *,
        last_k: int = 4,
        l2sp_alpha: float = 0.0,
        train_stem: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.method = method
        self._graphs = BlockGraphs()
        self.stem, self.blocks, self.neck = backbone.stem, backbone.blocks, backbone.neck
        self.head = new_head(backbone.num_features, num_classes, dropout)
        self.frozen_modules = []
        n = len(self.blocks)
        if method == "linear":
            self.first_trainable = n + 1  # not even the neck
            self.freeze(self.stem, self.blocks, self.neck)
        elif method == "lastk":
            if last_k > n:
                raise ConfigError(f"model.last_k: {last_k} exceeds the {n} blocks of {backbone.name}")
            self.first_trainable = n - last_k
            self.freeze(self.stem, *self.blocks[: n - last_k])
        elif method in ("finetune", "l2sp"):
            self.first_trainable = 0
            if not train_stem:
                self.freeze(self.stem)
        else:
            raise ConfigError(f"model.method: {method!r} is not a baseline; allowed: finetune, linear, lastk, l2sp")
        self.l2sp_alpha = l2sp_alpha if method == "l2sp" else 0.0
        # L2-SP's anchor: the starting point of every trainable backbone weight. Buffers follow the
        # model across devices; non-persistent, so they are not saved with it.
        self.anchor_names: list[str] = []
        if self.l2sp_alpha:
            for i, p in enumerate(self._backbone_parameters()):
                self.register_buffer(f"l2sp_anchor_{i}", p.detach().clone(), persistent=False)
                self.anchor_names.append(f"l2sp_anchor_{i}")

    def _backbone_parameters(self) -> list[nn.Parameter]:
        return trainable([*self.stem.parameters(), *self.blocks.parameters(), *self.neck.parameters()])

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), memory formats: a captured graph read the old tensors
        super()._apply(fn, recurse)
        self._graphs.reset()
        return self

    def forward(self, images: torch.Tensor) -> ModelOutput:
        if self._replays_as_graph(images):
            return ModelOutput(self._graphs((images,), self._logits, [self.stem, self.blocks, self.neck, self.head]))
        return ModelOutput(self._logits(images))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        # The frozen prefix needs no autograd graph: run it without one.
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.first_trainable == 0):
            x = self.stem(images)
        for i, block in enumerate(self.blocks):
            with torch.set_grad_enabled(grad and i >= self.first_trainable):
                x = block(x)
        with torch.set_grad_enabled(grad and self.first_trainable <= len(self.blocks)):
            features = self.neck(x)
        return self.head(features)

    def parameter_groups(self, optim: OptimParams) -> list[dict]:
        # L2-SP replaces decay toward zero by its pull toward the pretrained weights.
        net_decay = 0.0 if self.l2sp_alpha else optim.weight_decay
        groups = [{"name": "head", "params": list(self.head.parameters()), "lr": optim.lr_head,
                   "weight_decay": optim.weight_decay}]
        net = self._backbone_parameters()
        if net:
            groups.insert(0, {"name": "net", "params": net, "lr": optim.lr_net, "weight_decay": net_decay})
        return groups

    def regularization(self, output: ModelOutput) -> torch.Tensor | None:
        if not self.anchor_names:
            return None
        anchors = (getattr(self, name) for name in self.anchor_names)
        return 0.5 * self.l2sp_alpha * sum(((p - p0) ** 2).sum() for p, p0 in zip(self._backbone_parameters(), anchors))
