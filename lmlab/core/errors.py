class UserError(Exception):
    """Bad input from the user: the message is one sentence naming the file or field and the fix.

    The CLI prints it and exits with status 2; nothing on disk is left half-written.
    """


class PeerLost(UserError):
    """A torchrun job's collective failed because another of its processes ended or stopped answering: said by
    the rank that saw it, since the process that speaks for its node may be the one gone."""
