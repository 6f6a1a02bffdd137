class UserError(Exception):
    """Bad input from the user: the message is one sentence naming the file or field and the fix.

    The CLI prints it and exits with status 2; nothing on disk is left half-written. The Python API raises it, and
    IPython (a notebook, Colab) shows its sentence alone, not a traceback through lmlab: a mistake of the input,
    not of the code (`_render_traceback_`, which IPython asks an exception for).
    """

    def _render_traceback_(self) -> list[str]:
        return [f"UserError: {self}"]


class PeerLost(UserError):
    """A torchrun job's collective failed because another of its processes ended or stopped answering: said by
    the rank that saw it, since the process that speaks for its node may be the one gone."""
