"""Artifact store: published model versions, the production pointer and its audit trail.

Two backends behind one small interface (`Backend`): a local folder (the embedded default) and
S3-compatible object storage through boto3. Everything that matters for safety lives above the
interface, in `ArtifactStore`, so both backends get the same guarantees and the same tests.

Modules (what the rest of the project uses is importable from `spottune.store` itself):

    artifacts.py   ArtifactStore: publish, verify, list, fetch; open_store, load_production_model
    promotion.py   production pointer (compare-and-swap), promote, rollback, audit trail (ArtifactStore's mixin)
    backends.py    Backend protocol, LocalBackend, S3Backend, open_backend, s3_region, key checks, current_umask
    values.py      file names and formats, Gate (and the gate stage's record checks), VersionInfo,
                   PublishResult, name/prefix checks, content_version, check_safetensors
    cards.py       build_card (model_card.json), model_card_markdown (model_card.md)
    hashing.py     sha256 of bytes, files and streams: the one place the store hashes
    errors.py      StoreMisconfigured, ObjectMissing, IntegrityError, WriteConflict, PromotionRefused

Layout (keys below the configured prefix):

    models/NAME/versions/VERSION/model.safetensors   weights (safetensors: loads without executing code)
    models/NAME/versions/VERSION/model.json          params and class names (spottune.training's model card)
    models/NAME/versions/VERSION/params.json         the run's params
    models/NAME/versions/VERSION/metrics.json        test metrics and history
    models/NAME/versions/VERSION/data_version.txt    the data.dvc hash given by the caller
    models/NAME/versions/VERSION/report.md           the evaluation report (or a note that none was given)
    models/NAME/versions/VERSION/model_card.json     the model card: intended use, training data and its version,
                                                     metrics overall and per class, baseline comparison and gate
                                                     reasoning, routing, limitations (spottune.store.cards)
    models/NAME/versions/VERSION/model_card.md       the same card in Markdown
    models/NAME/versions/VERSION/gate.json           the gate stage's record (metrics/gate.json) and verdict:
                                                     failed => candidate forever; none (published by hand)
                                                     => promotable only with force and a reason
    models/NAME/versions/VERSION/lineage.json        git commit and state, dvc.lock's sha256, data version, params,
                                                     experiment, packages, threads, device, flow run (spottune.lineage)
    models/NAME/versions/VERSION/dvc.lock, data.dvc  the pipeline's state and the data's DVC file when it was published
    models/NAME/versions/VERSION/git.diff            only when the checkout was dirty: its tracked changes
    models/NAME/versions/VERSION/MANIFEST.json       sha256 and size of every file above; written LAST
    models/NAME/production.json                      the production pointer; written last on promotion
    models/NAME/audit/<UTC timestamp>-<uuid>.json    one object per promotion or rollback (who, when, reason,
                                                     forced), never overwritten

Invariants:
- lineage.json and its files are there for versions published with a lineage (every flow run and
  `spottune publish`); versions stored before lineage existed lack them and stay valid, as do
  versions stored before model_card.json existed (values.LATER_FILES).
- A version is complete only once its MANIFEST.json exists and every file it lists is present with
  the listed size; only complete versions whose files hash to the manifest are promoted or fetched.
- The manifest is written with a create-only condition, so it is never replaced: publishing a
  version again with the same files is a no-op, with other files it is refused.
- The production pointer is replaced with a compare-and-swap (S3 If-Match / If-None-Match, a file
  lock locally) so two concurrent promotions serialise instead of losing one another's history.

Importing the package needs neither boto3 (imported by S3Backend only) nor torch (by
load_production_model only).
"""

from spottune.store.artifacts import ArtifactStore, load_production_model, open_store
from spottune.store.backends import Backend, LocalBackend, S3Backend
from spottune.store.errors import (
    IntegrityError,
    ObjectMissing,
    PromotionRefused,
    StoreMisconfigured,
    WriteConflict,
)
from spottune.store.hashing import sha256_file
from spottune.store.values import (
    DATA_DVC,
    GATE,
    GIT_DIFF,
    LINEAGE,
    MANIFEST,
    MODEL_CARD_JSON,
    VERSION_FILES,
    WEIGHTS,
    Gate,
    Lineage,
    check_safetensors,
    gated_by_pipeline,
)
from spottune.store.values import (
    _check_name as _check_name,  # spottune.model_cache checks model names with it
)

__all__ = [
    "DATA_DVC",
    "GATE",
    "GIT_DIFF",
    "LINEAGE",
    "MANIFEST",
    "MODEL_CARD_JSON",
    "VERSION_FILES",
    "WEIGHTS",
    "ArtifactStore",
    "Backend",
    "Gate",
    "IntegrityError",
    "Lineage",
    "LocalBackend",
    "ObjectMissing",
    "PromotionRefused",
    "S3Backend",
    "StoreMisconfigured",
    "WriteConflict",
    "check_safetensors",
    "gated_by_pipeline",
    "load_production_model",
    "open_store",
    "sha256_file",
]
