"""Real datasets materialised as ImageFolder trees, and loaders that name what is wrong."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from spottune.data.loaders import build_datasets, load_rgb, make_loader, stratified_split
from spottune.data.sources import materialise, safe_class_name
from spottune.errors import DataError


def test_fashion_mnist_tree_holds_real_decodable_images(fashion_root):
    classes = sorted(p.name for p in (fashion_root / "train").iterdir())
    assert classes == ["ankle_boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker",
                       "t-shirt_top", "trouser"]
    for split, per_class in (("train", 40), ("test", 20)):
        for c in classes:
            files = list((fashion_root / split / c).glob("*.png"))
            assert len(files) == per_class
    img = load_rgb(str(next((fashion_root / "train" / "trouser").glob("*.png"))))
    assert img.size == (28, 28) and img.mode == "RGB"
    assert len(np.unique(np.asarray(img))) > 10, "a real photo of a garment, not a blank"


def test_materialise_is_deterministic_and_refuses_to_overwrite(tmp_path):
    a = materialise("digits", tmp_path / "a", train_per_class=5, test_per_class=3, seed=1, log=lambda _: None)
    b = materialise("digits", tmp_path / "b", train_per_class=5, test_per_class=3, seed=1, log=lambda _: None)
    assert a == b == {"train": 50, "test": 30}
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    assert names(tmp_path / "a") == names(tmp_path / "b")
    with pytest.raises(DataError, match="overwrite"):
        materialise("digits", tmp_path / "a", log=lambda _: None)
    assert not (tmp_path / "a.partial").exists()


def test_mnist_from_its_package_is_real_digits(tmp_path):
    counts = materialise("mnist", tmp_path / "mnist", train_per_class=3, test_per_class=2, log=lambda _: None)
    assert counts == {"train": 30, "test": 20}
    image = load_rgb(next((tmp_path / "mnist" / "test" / "7").glob("*.png")))
    pixels = np.asarray(image)
    assert image.size == (28, 28) and pixels.max() > 200 and pixels.min() == 0  # a white stroke on black


def test_missing_packaged_files_name_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        materialise("fashion-mnist", tmp_path / "x", fashion_mnist_dir=tmp_path / "nowhere", log=lambda _: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_unknown_source_is_named(tmp_path):
    from spottune.errors import ConfigError

    with pytest.raises(ConfigError, match="imagenet-22k"):
        materialise("imagenet-22k", tmp_path / "x", log=lambda _: None)


def test_safe_class_names():
    assert safe_class_name("T-shirt/top") == "t-shirt_top"
    assert safe_class_name("Ankle boot") == "ankle_boot"
    with pytest.raises(DataError):
        safe_class_name("///")


def test_validation_split_is_stratified_and_seeded():
    targets = [0] * 50 + [1] * 30
    keep, held = stratified_split(targets, 0.2, seed=0)
    assert sorted(keep + held) == list(range(80)) and not set(keep) & set(held)
    assert sum(targets[i] == 0 for i in held) == 10 and sum(targets[i] == 1 for i in held) == 6
    assert stratified_split(targets, 0.2, seed=0) == (keep, held)
    assert stratified_split(targets, 0.2, seed=1) != (keep, held)


def test_datasets_from_an_image_folder(fashion_root, tiny_params):
    params = tiny_params(fashion_root)
    splits = build_datasets(params.data, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 200)
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and 0 <= y < 10


@pytest.mark.slow
def test_workers_of_a_loader_for_a_gpu_start_from_a_server_and_load_the_same_batches(fashion_root, tiny_params):
    """Pinning for a GPU, the workers start from a forkserver (a fork of a process using CUDA may abort its
    child: loaders.py), and decode the same images in the same order as the main process does alone."""
    splits = build_datasets(tiny_params(fashion_root).data, seed=0)

    def batches(**kw) -> tuple:
        loader = make_loader(splits.test, 50, shuffle=True, generator=torch.Generator().manual_seed(3), **kw)
        return loader, list(loader)

    with warnings.catch_warnings():  # pinning without an accelerator is skipped with a warning
        warnings.simplefilter("ignore", UserWarning)
        served, got = batches(num_workers=2, pin_memory=True)
    _, want = batches(num_workers=0)
    assert served.multiprocessing_context.get_start_method() == "forkserver"
    assert len(got) == len(want) == 4
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))


@pytest.mark.parametrize("size", [32, 224])
def test_images_normalised_on_the_device_equal_torchvisions_cpu_transform(fashion_root, tiny_params, size):
    """The loaders hand over uint8 and DeviceSetup normalises: bit for bit what ToTensor + Normalize
    in the workers gave, for every backbone's normalisation."""
    from torchvision import transforms as T

    from spottune.data.loaders import build_transform
    from spottune.engine import DeviceSetup
    from spottune.models.backbones import input_normalization

    files = sorted((fashion_root / "train").rglob("*.png"))[:8]
    images = [load_rgb(str(f)) for f in files]
    batch = torch.stack([build_transform(size, train=False, augment=False)(im) for im in images])
    assert batch.dtype == torch.uint8
    for backbone in ("efficientnet_lite0", "resnet50"):
        mean, std = input_normalization(backbone)
        old = T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(mean, std)])
        expected = torch.stack([old(im) for im in images])
        setup = DeviceSetup.resolve("cpu", amp=False, channels_last=False, normalization=(mean, std))
        assert torch.equal(setup.images(batch), expected)
    with pytest.raises(ValueError, match="normalisation"):
        DeviceSetup.resolve("cpu", amp=False, channels_last=False).images(batch)


@pytest.fixture
def broken_root(fashion_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(fashion_root, root)
    return root


def test_unreadable_image_is_named(broken_root, tiny_params):
    bad = next((broken_root / "train" / "bag").glob("*.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    splits = build_datasets(tiny_params(broken_root).data, seed=0)
    with pytest.raises(DataError, match=bad.name):
        for i in range(len(splits.train.dataset)):
            splits.train.dataset[i]


def test_missing_directories_are_named(broken_root, tiny_params, tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build_datasets(tiny_params(tmp_path / "nowhere").data, seed=0)
    shutil.rmtree(broken_root / "test")
    with pytest.raises(DataError, match="test"):
        build_datasets(tiny_params(broken_root).data, seed=0)


def test_empty_class_and_mismatched_classes_are_named(broken_root, tiny_params):
    for f in (broken_root / "train" / "coat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="coat"):
        build_datasets(tiny_params(broken_root).data, seed=0)
    shutil.rmtree(broken_root / "train" / "coat")
    with pytest.raises(DataError, match="coat"):  # test/ still has it
        build_datasets(tiny_params(broken_root).data, seed=0)
