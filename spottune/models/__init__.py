"""Backbones, the routing policy, SpotTune and its baselines."""

from __future__ import annotations

from spottune.config import Params
from spottune.models.backbones import Backbone, build_backbone
from spottune.models.base import ModelOutput, TransferModel

__all__ = ["Backbone", "ModelOutput", "TransferModel", "build_backbone", "build_model"]


def build_model(params: Params, num_classes: int, *, pretrained: bool = True) -> TransferModel:
    """The transfer model `params.model.method` asks for, on its backbone.

    pretrained=False skips loading the backbone's weights: use it when a saved state_dict of the
    whole model will be loaded right after (prediction, resume), which also keeps that offline.
    """
    from spottune.models.baselines import FineTuneNet
    from spottune.models.spottune import SpotTuneNet

    m = params.model
    backbone = build_backbone(m.backbone, m.weights if pretrained else "none", params.data.image_size)
    if m.method == "spottune":
        return SpotTuneNet(backbone, num_classes, params.policy, train_stem=m.train_stem, dropout=m.dropout,
                           tuned_l2sp_alpha=m.tuned_l2sp_alpha)
    return FineTuneNet(
        backbone, num_classes, m.method, last_k=m.last_k, l2sp_alpha=m.l2sp_alpha,
        train_stem=m.train_stem, dropout=m.dropout,
    )
