"""Backbone adapters: real ImageNet weights offline, local weights files, the ResNet-26 layout."""

from __future__ import annotations

import pytest
import torch

from spottune.errors import CheckpointError, ConfigError
from spottune.models.backbones import build_backbone, input_normalization

from support import requires

IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _photo(array, size: int, name: str) -> torch.Tensor:
    from PIL import Image

    from spottune.data.loaders import build_transform
    from spottune.engine import DeviceSetup

    setup = DeviceSetup.resolve("cpu", amp=False, channels_last=False, normalization=input_normalization(name))
    return setup.images(build_transform(size, train=False, augment=False)(Image.fromarray(array)).unsqueeze(0))


def test_efficientnet_lite0_imagenet_head_sees_the_cat_offline():
    requires("skimage")
    from skimage import data as skimage_data

    backbone = build_backbone("efficientnet_lite0", "imagenet", 224)
    for part in (backbone.stem, backbone.blocks, backbone.neck, backbone.classifier):
        part.eval()
    with torch.no_grad():
        logits = backbone.forward(_photo(skimage_data.chelsea(), 224, "efficientnet_lite0"))
        coffee = backbone.forward(_photo(skimage_data.coffee(), 224, "efficientnet_lite0"))
    assert IMAGENET_CATS & set(logits.topk(5).indices[0].tolist())
    assert not IMAGENET_CATS & set(coffee.topk(5).indices[0].tolist()), "a coffee cup is not a cat"


def test_efficientnet_lite0_cut_into_16_blocks_with_1280_features():
    b = build_backbone("efficientnet_lite0", "imagenet", 64)
    assert len(b.blocks) == 16 and b.num_features == 1280 and b.classifier.out_features == 1000


def test_resnet26_is_three_stages_of_four_basic_blocks():
    from spottune.models.backbones import BasicBlock26

    b = build_backbone("resnet26", "none")
    assert len(b.blocks) == 12 and all(isinstance(x, BasicBlock26) for x in b.blocks)
    widths = [blk.conv2.out_channels for blk in b.blocks]
    assert widths == [64] * 4 + [128] * 4 + [256] * 4
    x = torch.randn(2, 3, 64, 64)
    feats = b.stem(x)
    for blk in b.blocks:
        feats = blk(feats)
    assert feats.shape == (2, 256, 8, 8)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in [*b.stem.modules(), *b.blocks.modules()])
    assert convs + 1 == 26  # 25 convolutions and the classifier


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_loaded_exactly(tmp_path, suffix):
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    torch.manual_seed(99)  # a different random init, which the file must overwrite
    b = build_backbone("resnet18", str(path))
    assert torch.equal(b.stem[0].weight, source.conv1.weight)
    assert torch.equal(b.blocks[-1].conv2.weight, source.layer4[-1].conv2.weight)
    assert torch.equal(b.classifier.weight, source.fc.weight)


def test_local_weights_with_another_head_keep_everything_but_the_classifier(tmp_path):
    from spottune.models.backbones import ResNet26

    torch.manual_seed(0)
    source = ResNet26(num_classes=7)
    torch.save(source.state_dict(), tmp_path / "r26.pth")
    b = build_backbone("resnet26", str(tmp_path / "r26.pth"))
    assert torch.equal(b.blocks[5].conv1.weight, source.blocks[5].conv1.weight)
    assert b.classifier.out_features == 10


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match="r18.pth"):
        build_backbone("resnet34", str(tmp_path / "r18.pth"))


def test_pickled_code_in_a_weights_file_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_backbone("resnet18", str(path))


def test_imagenet_weights_offline_name_the_remedy(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ConfigError, match="model.weights"):
        build_backbone("resnet50", "imagenet")
