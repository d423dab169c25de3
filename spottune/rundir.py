"""A run folder's files and its model card's format, named once. Torch-free: the artifact store reads
and publishes run folders without importing torch."""

from __future__ import annotations

from pathlib import Path

MODEL_FORMAT = "spottune-model/1"  # model.json's "format", and the weights' safetensors metadata
WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
RUN_FILES: tuple[str, str, str] = (WEIGHTS, MODEL_CARD, METRICS)  # what a finished run publishes


class RunDir:
    """The files of one run, by name."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoint = self.root / CHECKPOINT
        self.weights = self.root / WEIGHTS
        self.model_card = self.root / MODEL_CARD
        self.metrics = self.root / METRICS

    def outputs(self) -> list[Path]:
        return [self.checkpoint, self.weights, self.model_card, self.metrics]
