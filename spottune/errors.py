"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


class SpotTuneError(Exception):
    """Base class: the message names the file, key or value at fault."""


class ConfigError(SpotTuneError):
    """Bad params.yaml, override or CLI argument."""


class DataError(SpotTuneError):
    """Missing data directory, unreadable image, empty class, ..."""


class CheckpointError(SpotTuneError):
    """Missing, incomplete or unsafe checkpoint or model file."""


class StoreError(SpotTuneError):
    """Artifact store: unreachable endpoint, missing bucket or credentials, incomplete or corrupt version."""
