"""Classify images with a trained model: from a run folder or a version fetched from the store.

Images are decoded and predicted in batches as they stream in (never all loaded at once); an image
whose header claims more than Pillow's pixel limit is refused before it is decoded.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spottune.errors import DataError


def image_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given, and the image files under each folder (recursively, sorted, by extension)."""
    from spottune.data.manifest import IMAGE_EXTENSIONS

    for path in map(Path, paths):
        if path.is_dir():
            found = False
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    found = True
                    yield p
            if not found:
                raise DataError(f"{path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            yield path
        else:
            raise DataError(f"{path} does not exist")


class Predictor:
    """A model ready to classify: its transform, device and class names."""

    def __init__(self, model, params, classes: list[str], device: str = "cpu") -> None:
        from spottune.data.loaders import build_transform
        from spottune.engine import DeviceSetup
        from spottune.models.backbones import input_normalization

        self.params, self.classes = params, list(classes)
        self.setup = DeviceSetup.resolve(device, params.optim.amp, params.optim.channels_last,
                                         input_normalization(params.model.backbone))
        self.model = model.to(self.setup.device).eval()
        self.transform = build_transform(params.data.image_size, train=False, augment=False)

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> Predictor:
        """A run folder or a fetched store version (model.json + model.safetensors; no pickle)."""
        from spottune.training import load_model

        model, params, classes = load_model(folder)
        return cls(model, params, classes, device)

    def _rows(self, names: list[str], out, top_k: int) -> list[dict[str, Any]]:
        probs = out.logits.float().softmax(1).cpu()
        top = probs.topk(min(top_k, len(self.classes)), dim=1)
        rows = []
        for i, name in enumerate(names):
            ranked = [{"label": self.classes[j], "probability": round(float(p), 6)}
                      for p, j in zip(top.values[i], top.indices[i])]
            row = {"path": name, "label": ranked[0]["label"], "probability": ranked[0]["probability"], "top": ranked}
            if out.decisions is not None:
                row["tuned_blocks"] = [int(b) for b in (out.decisions[i] > 0.5).nonzero().flatten().tolist()]
            rows.append(row)
        return rows

    def predict_paths(self, paths: Iterable[Path], *, top_k: int = 3, batch_size: int = 64) -> Iterator[dict[str, Any]]:
        """One row per image ({path, label, probability, top, [tuned_blocks]}), batch by batch, in order."""
        import torch

        from spottune.data.loaders import load_rgb

        pending: deque[list[str]] = deque()

        def batches() -> Iterator[torch.Tensor]:
            chunk: list[Path] = []
            for path in _with_end(paths):
                if path is not None:
                    chunk.append(path)
                if chunk and (path is None or len(chunk) == batch_size):
                    tensors = [self.transform(load_rgb(str(p))) for p in chunk]
                    pending.append([str(p) for p in chunk])
                    chunk = []
                    yield self.setup.images(torch.stack(tensors))

        with torch.inference_mode(), self.setup.autocast():
            for out in self.model.infer_batches(batches()):
                yield from self._rows(pending.popleft(), out, top_k)

    def predict_image(self, image, name: str, *, top_k: int = 3) -> dict[str, Any]:
        """One PIL image (an upload): its row."""
        import torch

        with torch.inference_mode(), self.setup.autocast():
            out = self.model(self.setup.images(self.transform(image).unsqueeze(0)))
        return self._rows([name], out, top_k)[0]


def _with_end(items: Iterable[Path]) -> Iterator[Path | None]:
    yield from items
    yield None


def read_upload(data: bytes, name: str, max_pixels: int | None = None):
    """An uploaded image's bytes as an RGB image (open_image: bombs refused from the header)."""
    from spottune.data.images import open_image

    return open_image(io.BytesIO(data), name, max_pixels)
