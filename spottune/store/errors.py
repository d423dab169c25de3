"""The store's errors: StoreError subclasses (spottune.errors.StoreError is the base callers catch)."""

from __future__ import annotations

from spottune.errors import StoreError


class StoreMisconfigured(StoreError):
    """Settings or permissions are wrong (no credentials, no bucket, access denied, a store folder that
    cannot be written): retrying cannot help, a person must fix them."""


class ObjectMissing(StoreError):
    """The key does not exist."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded sha256 or size, or a file is not what it claims to be."""


class WriteConflict(StoreError):
    """A conditional write lost the race: the object changed (or appeared) since it was read."""


class PromotionRefused(StoreError):
    """The version may not become production: incomplete, unverified, or its gate failed."""
