"""The example's one error type."""


class RunError(Exception):
    """A run that cannot go on (a bad dataset, model, flag or path, a full disk, a diverged loss): its one-line
    message names what is wrong and the fix. Each process prints it as `error: <message>` and exits with 1."""
