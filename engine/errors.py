"""The named errors of the project: each says what was wrong and where (the file, field or key), so a runner can print
it as one line and exit with status 2."""


class ConfigError(ValueError):
    """A config that does not fit its schema; the message names the source and the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the path and the offending key."""


class RewardCheckpointError(ValueError):
    """A reward model folder or head file that does not match the configured model."""


class VideoError(ValueError):
    """A video that cannot give the clip asked for: missing, unreadable, without a video stream, or too short."""


class BootstrapError(RuntimeError):
    """A bootstrap trainer that failed, or a bootstrap that did not finish in time."""
