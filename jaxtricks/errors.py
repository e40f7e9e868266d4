"""User-facing errors: launch.py prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
  """A mistake in the user's command, config or data (not a bug in jaxtricks)."""


class ConfigError(UserError, ValueError):
  """An unknown or inconsistent config key or value."""


class DataError(UserError):
  """A corpus that is empty, unreadable or too small."""
