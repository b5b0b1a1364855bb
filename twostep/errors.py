"""User-facing errors: the CLI prints `error: <message>` on one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (file, flag, config, model folder) that names the thing and the fix."""
