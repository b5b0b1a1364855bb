"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (file, flag, config, model folder) that names the thing and the fix."""


class NonFiniteWeights(UserError):
    """A save refused because a state dict about to be written holds NaN/inf values (nothing was written, the run
    stays unfinished). Training loops catch it at an intermediate checkpoint to roll back. `parts`: what was
    non-finite, e.g. ["ema (206 of 206 tensors)"]."""

    def __init__(self, message: str, parts=()):
        super().__init__(message)
        self.parts = list(parts)
