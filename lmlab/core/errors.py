class UserError(Exception):
    """Bad input from the user: the message is one sentence naming the file or field and the fix.

    The CLI prints it and exits with status 2; nothing on disk is left half-written.
    """
