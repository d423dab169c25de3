"""Settings from the environment (SPOTTUNE_*), validated once at the edge: where and how to run, the
DVC remote's endpoint, the artifact store. They never change what a run computes; that is params.yaml
(spottune/config.py). Credentials are never among them: boto3's standard chain finds those."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from spottune.config import RemoteParams, format_error
from spottune.endpoints import REGION_PATTERN, check_endpoint_url, check_webhook_url
from spottune.errors import ConfigError


class RuntimeSettings(BaseSettings):
    """Where and how to run, from the environment: never changes what a run computes."""

    model_config = SettingsConfigDict(env_prefix="SPOTTUNE_", extra="ignore")

    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    progress: bool = Field(True, description="show progress bars")
    cuda_graphs: bool = Field(True, description="replay training steps as CUDA graphs on GPUs "
                              "(spottune/models/block_graphs.py); false runs them eagerly: the same function, slower")
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")


class RemoteSettings(BaseSettings):
    """The DVC remote: params.yaml's `remote` section, with SPOTTUNE_REMOTE_* taking precedence.

    Endpoints differ per machine (a local S3-compatible server in tests, AWS in production), so
    the environment wins over the file; the file never overrides the environment.
    """

    model_config = SettingsConfigDict(env_prefix="SPOTTUNE_REMOTE_", extra="ignore")

    name: str = "storage"
    url: str | None = None
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return env_settings, init_settings

    @classmethod
    def resolve(cls, params: RemoteParams) -> RemoteSettings:
        """Environment over params.yaml, then re-checked against the params rules."""
        merged = cls(**params.model_dump())
        try:
            RemoteParams.model_validate(merged.model_dump())
        except ValidationError as e:
            raise ConfigError(format_error(e, "remote settings (params.yaml + SPOTTUNE_REMOTE_*)")) from None
        return merged


class StoreSettings(BaseSettings):
    """Where published models live, from the environment (SPOTTUNE_STORE_*, SPOTTUNE_S3_*).

    Credentials are deliberately absent: the S3 backend takes them from boto3's standard chain
    (AWS_* environment variables, shared profile, instance role), so they never reach params, logs
    or uploaded artifacts. Where the models are stored never changes what a run computes.
    """

    model_config = SettingsConfigDict(env_prefix="SPOTTUNE_", extra="ignore")

    store_backend: Literal["local", "s3"] = Field("local", description="'local' (a folder, the default) or 's3'")
    store_root: Path = Field(Path("artifacts"), description="folder of the local backend")
    store_prefix: str = Field("", pattern=r"^([A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*)?$",
                              description="key prefix inside the bucket (or the local folder)")
    s3_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="S3 bucket name")
    s3_endpoint_url: str | None = Field(None, pattern=r"^https?://", description="S3-compatible endpoint (default: AWS)")
    s3_region: str | None = Field(None, pattern=REGION_PATTERN, description="S3 region (letters, digits, '-' and "
                                  "'_'); unset: AWS_REGION, then boto3's chain (AWS_DEFAULT_REGION, the profile's "
                                  "region), as the AWS SDKs do")
    s3_multipart_threshold_mb: int = Field(64, ge=5, description="files above this size upload in parts")
    s3_multipart_chunksize_mb: int = Field(16, ge=5, description="size of one part (S3's minimum is 5 MiB)")
    s3_max_attempts: int = Field(5, ge=1, description="botocore attempts per request (standard retry mode, backoff)")
    s3_connect_timeout_s: float = Field(5.0, gt=0)
    s3_read_timeout_s: float = Field(60.0, gt=0)
    model_cache_dir: Path | None = Field(None, description="where fetched model versions are kept (one folder per "
                                         "version); default $XDG_CACHE_HOME/spottune/models or ~/.cache/spottune/models")

    _endpoint_shape = field_validator("s3_endpoint_url")(check_endpoint_url)

    @field_validator("store_prefix")
    @classmethod
    def _prefix_stays_inside(cls, value: str) -> str:
        if any(p in (".", "..") for p in value.split("/")):
            raise ValueError("a prefix may not hold '.' or '..' parts (it would climb out of the store)")
        return value

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StoreSettings:
        if self.store_backend == "s3" and not self.s3_bucket:
            raise ValueError("store_backend 's3' needs a bucket: set SPOTTUNE_S3_BUCKET")
        return self


class AlertSettings(BaseSettings):
    """Where the retrain flow's alerts go (a failed flow run, a gate that refuses): SPOTTUNE_ALERT_*.

    Unset webhook: no alerts (the flow says so once in its log). The URL may hold a token (many webhooks
    do), so it is never logged or repeated in an error: only its scheme and host are shown.
    """

    model_config = SettingsConfigDict(env_prefix="SPOTTUNE_", extra="ignore")

    alert_webhook: str | None = Field(None, description="http(s) URL that receives each alert as a JSON POST")
    alert_timeout_s: float = Field(5.0, gt=0, le=60, description="seconds to wait for the webhook to answer")

    _webhook_shape = field_validator("alert_webhook")(check_webhook_url)


def from_environment(cls: type[BaseSettings], what: str) -> BaseSettings:
    """Settings of `cls` read from the environment; a bad value is one ConfigError naming each variable
    (exit 3), never a pydantic traceback nor the value (an endpoint or webhook may hold a secret)."""
    try:
        return cls()
    except ValidationError as e:
        lines = [f"invalid {what} in the environment:"]
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            var = f"SPOTTUNE_{field.upper()}" if field else "(settings)"
            lines.append(f"  {var}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None


def alert_settings() -> AlertSettings:
    """AlertSettings from the environment; ConfigError naming the variable (never the URL, which may hold a token)."""
    return from_environment(AlertSettings, "alert settings")
