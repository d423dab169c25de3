"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback.

Exit codes (README, docs/reliability.md) tell a script or a scheduler which kind of failure it met,
so it can decide whether a retry may help:

    0  success
    1  internal error: a bug or the machine (a traceback is printed)
    2  usage: the command line does not parse (argparse's own code and message)
    3  bad input: params, settings, options, data, checkpoints or model files (fix them, then rerun)
    4  external service: the artifact store, S3, DVC or the network (a retry may succeed)
  130  interrupted (Ctrl-C)
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_SERVICE = 4
EXIT_INTERRUPTED = 130


class SpotTuneError(Exception):
    """Base class: the message names the file, key or value at fault."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(SpotTuneError):
    """Bad params.yaml, override or CLI argument."""


class DataError(SpotTuneError):
    """Missing data directory, unreadable image, empty class, ..."""


class CheckpointError(SpotTuneError):
    """Missing, incomplete or unsafe checkpoint or model file."""


class RunLocked(ConfigError):
    """Another live process holds the run folder."""


class ServiceError(SpotTuneError):
    """An external service or tool failed (the artifact store, S3, DVC, the network)."""

    exit_code = EXIT_SERVICE


class StoreError(ServiceError):
    """Artifact store: unreachable endpoint, missing bucket or credentials, incomplete or corrupt version."""
