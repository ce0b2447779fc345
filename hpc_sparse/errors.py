"""The one exception type users see: a problem in their input, with the fix in the message."""


class UserError(Exception):
    """Bad input (config, data, checkpoint). The message names the problem and the fix.

    The CLI prints it as a single line and exits with status 2; no traceback.
    """
