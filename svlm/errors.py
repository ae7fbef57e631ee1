"""The errors a user can fix: a wrong setting, or a bad sample in their data."""


class ConfigError(ValueError):
    """A wrong configuration value or path; the message names the key."""
