"""One exception root for campaignd, and the exit codes every entry point uses."""

EXIT_OK = 0
EXIT_FAILURE = 1
# Usage and configuration errors: the CLI, and a child that cannot load its
# config. The supervisor stops the whole daemon on this code instead of
# respawning a child that can never start, and the systemd unit lists it in
# RestartPreventExitStatus so systemd does not loop either.
EXIT_CONFIG = 2
# `campaignd status` when no daemon answers on the status socket.
EXIT_NOT_RUNNING = 3
# `campaignd status` when something answers but its state cannot be known
# (permission denied, an answer that is not ours): systemctl's "unknown".
EXIT_UNKNOWN = 4


class DaemonError(Exception):
    """Root of every error campaignd raises on purpose."""


class ConfigError(DaemonError):
    """A config file or value is wrong; the message names the key."""


class InputError(DaemonError):
    """Bad operator input (CSV, template, API body); the message says why."""


class NotFoundError(DaemonError):
    """A campaign, contact or message id that does not exist."""


class StateError(DaemonError):
    """An operation that the current state does not allow (e.g. start twice)."""
