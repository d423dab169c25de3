"""Typed run parameters, validated once at the edge.

`params.yaml` holds one section per pipeline stage: `prepare` (manifest and splits), `validate`
(the data contract), `data`/`model`/`policy`/`optim` (training) and `remote` (where DVC keeps data).
Everything below the CLI receives these models, never raw dicts, files or environment variables.
Unknown keys and bad values are refused with the dotted key named, so a typo fails before any work
starts. The environment (spottune/settings.py) may say where things live (endpoints, the store),
never what is computed; credentials never appear in params.yaml (boto3's standard chain finds them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spottune.endpoints import (
    REGION_PATTERN,
    check_endpoint_url,
    redact_url_credentials,
    refuse_url_credentials,
)
from spottune.errors import ConfigError

Backbone = Literal[
    "efficientnet_lite0", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet26"
]
Method = Literal["spottune", "finetune", "linear", "lastk", "l2sp"]
BACKBONES: tuple[str, ...] = Backbone.__args__
METHODS: tuple[str, ...] = Method.__args__


def _no_nul_in_paths(value: Any) -> Any:
    """A NUL byte passes pydantic's Path type but makes every later open() fail with a bare ValueError."""
    if isinstance(value, Path) and "\x00" in str(value):
        raise ValueError("path contains a NUL byte")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _paths_without_nul = field_validator("*")(_no_nul_in_paths)


class DataParams(_Section):
    """Where the images are and how they are fed to the network."""

    root: Path = Field(Path("data/fashion-mnist"), description="ImageFolder root with train/ and test/ (val/ optional)")
    manifest: Path | None = Field(
        None, description="CSV written by `spottune prepare`: splits come from it (None: ImageFolder train/test as is); "
        "the pipeline's train stages set it to prepare.manifest"
    )
    image_size: int = Field(64, ge=16, le=1024)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="carved from train/ when there is no val/")
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    augment: bool = Field(False, description="random resized crop; no flips (digits and text change meaning)")


class ModelParams(_Section):
    """Which backbone, which pretrained weights, which transfer method."""

    backbone: Backbone = "efficientnet_lite0"
    weights: str = Field("imagenet", description="'imagenet', 'none' (random init) or a local weights file")
    method: Method = "spottune"
    last_k: int = Field(4, ge=1, description="blocks fine-tuned by method 'lastk'")
    l2sp_alpha: float = Field(0.01, ge=0.0, description="L2-SP pull of backbone weights toward pretrained")
    tuned_l2sp_alpha: float = Field(0.0, ge=0.0, description="spottune: L2-SP pull of the tuned copy toward the "
                                    "pretrained (frozen) copy, in place of its weight decay; 0: off")
    train_stem: bool = Field(True, description="fine-tune the shared stem (spottune, finetune, l2sp)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the new head")

    @model_validator(mode="after")
    def _weights_exist(self) -> ModelParams:
        if self.weights not in ("imagenet", "none") and not _is_file(self.weights):
            raise ValueError(f"weights file not found: {_shown(self.weights)} (or use 'imagenet' / 'none')")
        if self.backbone == "resnet26" and self.weights == "imagenet":
            raise ValueError("resnet26 has no published ImageNet weights: use 'none' or a local weights file")
        return self


def _is_file(path: str) -> bool:
    """Path.is_file that answers False (not OSError/ValueError) for names too long or holding a NUL byte."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


class PolicyParams(_Section):
    """SpotTune's routing policy, its Gumbel-Softmax relaxation, and how the frozen copy normalises."""

    width: int = Field(32, ge=4, description="channels of the policy's first stage (ResNet-8: w, 2w, 4w)")
    input_size: int = Field(64, ge=8, le=512, description="policy sees the image resized to this side: its cost "
                            "does not grow with the backbone's resolution")
    temperature: float = Field(5.0, gt=0.0)
    temperature_min: float = Field(0.5, gt=0.0)
    temperature_decay: float = Field(1.0, gt=0.0, le=1.0, description="multiplied into the temperature each epoch")
    eval_decisions: Literal["argmax", "sample", "expectation"] = Field(
        "argmax", description="decisions outside training: 'argmax' (each image runs one branch per block), "
        "'sample' (a random draw), 'expectation' (each block returns F + p (F~ - F) with the image's probability p "
        "of tuning: the expected output over training's sampled decisions; both branches run)")
    noise_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="scale of the Gumbel noise in training decisions: 'constant' 1, or 'cosine' from 1 "
        "in the first epoch to 0 in the last, so that training ends on the decisions evaluation takes")
    global_k: int | None = Field(None, ge=0, description="global-k variant: target number of tuned blocks")
    k_weight: float = Field(1.0, ge=0.0)
    entropy_weight: float = Field(0.1, ge=0.0)
    usage_weight: float = Field(
        0.0, ge=0.0, description="weight of the per-image usage term: ln 2 minus the mutual information between "
        "an image and its decision, per block (zero when half of a batch tunes a block and each image is decided); "
        "it rewards routing that differs between images")
    init_weight_std: float = Field(
        0.0, ge=0.0, le=1.0, description="std of the policy's last layer weights at the start (0: every image "
        "starts with the same logits, and a term that rewards per-image decisions has no gradient there)")
    init_tune_probability: float = Field(
        0.9, gt=0.0, lt=1.0, description="probability of the tuned copy for every block at the start of training "
        "(0.5: undecided; near 1: start as fine-tuning and learn where the frozen copy does better)")
    frozen_bn: Literal["pretrained", "target"] = Field(
        "pretrained", description="statistics the frozen copy's BatchNorm uses in training: 'pretrained' (its own, "
        "untouched: a per-image function) or 'target' (the target batch's, running statistics adapted to the target "
        "as in the 2019 code, affine weights still frozen; training then runs both copies on the whole batch)")
    recompute_frozen: bool = Field(
        False, description="memory for time: in blocks where some image takes the tuned copy, keep nothing of the "
        "frozen copy for the backward pass (its activations, F~ - F) and run its forward again there (same gradients)")


class OptimParams(_Section):
    """SGD with separate learning rates for the network, the new head and the policy."""

    epochs: int = Field(3, ge=1)
    lr_net: float = Field(0.01, gt=0.0)
    lr_head: float = Field(0.1, gt=0.0)
    lr_policy: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    policy_weight_decay: float = Field(1e-3, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: tuple[int, ...] = Field((), description="epochs at which 'step' multiplies the lr by gamma")
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1, description="torch's generators take 64-bit seeds")
    amp: bool = Field(True, description="bf16 autocast on CUDA (CPU always runs float32)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap on steps per epoch (smoke runs)")


class PrepareParams(_Section):
    """How `spottune prepare` turns the image tree at data.root into a manifest with splits."""

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="of each class of train/, when there is no val/")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="of each class, only when there is no test/")
    seed: int = Field(0, description="seeds the stratified split, independent of the training seed")
    manifest: Path = Field(Path("prepared/manifest.csv"), description="where the manifest is written")


class ValidateParams(_Section):
    """The data contract `spottune validate` enforces on the manifest and the image files."""

    classes: tuple[str, ...] | None = Field(
        None, description="the allowed labels; None: the classes recorded in DATA_ROOT/dataset.json by `spottune data`"
    )
    min_images_per_class: int = Field(5, ge=1, description="in every split")
    max_imbalance: float = Field(3.0, ge=1.0, description="largest class / smallest class, per split")
    min_rows: int = Field(1, ge=1)
    max_rows: int = Field(10_000_000, ge=1)
    min_side: int = Field(8, ge=1, description="pixels, width and height")
    max_side: int = Field(4096, ge=1, description="pixels, width and height")
    max_pixels: int = Field(16_000_000, ge=1, description="width x height; larger files are not decoded (bombs)")
    modes: tuple[str, ...] = Field(("L", "RGB"), min_length=1, description="PIL modes accepted")

    @model_validator(mode="after")
    def _ranges(self) -> ValidateParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} exceeds max_side {self.max_side}")
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows {self.min_rows} exceeds max_rows {self.max_rows}")
        return self


class RemoteParams(_Section):
    """DVC's S3-compatible remote: where, never who (credentials come from boto3's chain)."""

    name: str = Field("storage", pattern=r"^[A-Za-z0-9_-]+$")
    url: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                            description="s3://BUCKET/PREFIX; None: no remote (env SPOTTUNE_REMOTE_URL overrides)")
    endpoint_url: str | None = Field(None, pattern=r"^https?://",
                                     description="S3-compatible endpoint; None: AWS (env SPOTTUNE_REMOTE_ENDPOINT_URL overrides)")
    region: str | None = Field(None, pattern=REGION_PATTERN)

    _no_credentials = field_validator("url")(refuse_url_credentials)
    _endpoint_shape = field_validator("endpoint_url")(check_endpoint_url)


class Params(_Section):
    """Everything the pipeline depends on; training reads data/model/policy/optim.

    `validate` is spelled `validate_` in Python (pydantic's BaseModel has a `validate` method);
    both names are accepted. `remote` says where data is stored, not what a run computes, so it
    is left out of dumps (run cards, checkpoints).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    prepare: PrepareParams = PrepareParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    policy: PolicyParams = PolicyParams()
    optim: OptimParams = OptimParams()
    remote: RemoteParams = Field(RemoteParams(), exclude=True)
    gate: GateParams = Field(default_factory=lambda: GateParams(), exclude=True)
    publish: PublishParams = Field(default_factory=lambda: PublishParams(), exclude=True)


def format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        key = printable(key)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = "" if e["type"] == "missing" else f" (got {_shown(e.get('input'))})"
        if key.endswith("endpoint_url"):  # any part of a malformed URL may be a secret pasted into it
            got = ""
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def printable(key: str) -> str:
    """A key as it appears in a message: control characters escaped, so one key is always one line;
    a key that is blank or starts or ends with a space quoted, so it can be seen."""
    if key != key.strip() or not key:
        return repr(key)
    return key if key.isprintable() else key.encode("unicode_escape").decode()


def _shown(value: Any, limit: int = 200) -> str:
    """The offending value for a message: repr, credentials in URLs redacted, cut to `limit` characters."""
    text = redact_url_credentials(repr(value))
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_override(pair: str) -> tuple[str, Any]:
    """'optim.epochs=2' -> ('optim.epochs', 2): the value parses as YAML, as on DVC's command line."""
    key, sep, raw = pair.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {_shown(pair)} is not KEY=VALUE (for example optim.epochs=2)")
    if "" in key.split("."):
        raise ConfigError(f"override {_shown(pair)}: key {printable(key)} has an empty part (for example optim.epochs=2)")
    try:
        return key, safe_yaml(raw)
    except ValueError as e:
        raise ConfigError(f"override {printable(key)}: value {_shown(raw)} is not valid YAML ({e})") from None


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases: ten levels of nested aliases (a 'billion laughs'
    document of a few hundred bytes) expand to billions of nodes once validated or shown in a message.
    Parameters never need them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise yaml.composer.ComposerError(
                None, None, f"YAML {kind} {'*' if kind == 'alias' else '&'}{printable(str(event.anchor))} at line "
                f"{event.start_mark.line + 1}: anchors and aliases are not allowed in parameters (write the values out)",
                event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """yaml.safe_load without anchors and aliases, with every way it fails as one ValueError.

    PyYAML's constructors raise plain ValueError/KeyError/TypeError for well-formed YAML with bad
    content ('2001-13-45' is a timestamp with month 13; '!!int x', '!!bool x'), not only YAMLError.
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ValueError(getattr(e, "problem", None) or str(e).splitlines()[0]) from None
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['optim.epochs=2', 'model.method=finetune'] into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, value = parse_override(pair)
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {_shown(pair)}: {p!r} is not a section")
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_params(path: Path | None, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (if given), apply KEY=VALUE overrides, validate; raise ConfigError naming the key."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"params file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"params file {path} is unreadable: {e}") from None
        try:
            loaded = safe_yaml(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " + overrides"
    return validate_params(raw, source)


def validate_params(raw: dict[str, Any], source: str = "parameters") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_error(e, source)) from None


class GateParams(_Section):
    """The promotion gate (the `gate` DVC stage, spottune/gate.py) on the compare stage's comparison.

    It decides on the paired bootstrap confidence interval of SpotTune's test top-1 minus the
    fine-tuning baseline's (same test images): `superiority` needs the CI's low end above 0,
    `non_inferiority` above -margin. SpotTune's top-1 must also reach `floor`, and it must not be
    significantly worse than the production model (the champion) on the same images. Left out of run
    dumps: it judges a run, it does not change what is trained; and never overridden per run.
    """

    rule: Literal["superiority", "non_inferiority"] = Field(
        "non_inferiority", description="superiority: CI low > 0; non_inferiority: CI low > -margin")
    margin: float = Field(0.0, ge=0.0, le=1.0, description="the non-inferiority margin (top-1, 0.01 = one point); "
                          "unused by superiority")
    floor: float = Field(0.0, ge=0.0, le=1.01, description="candidate top-1 must be >= this (above 1: never passes)")


class PublishParams(_Section):
    """Where the retrain flow publishes in the artifact store (the store itself comes from SPOTTUNE_STORE_*)."""

    model_name: str = Field("fashion-spottune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                            description="model name in the store: models/NAME/versions/...")
    promote: bool = Field(True, description="promote a version that passes the gate (false: publish only)")
