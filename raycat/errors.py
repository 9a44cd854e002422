"""The exceptions the CLI turns into a one-line message.

Raise ``RaycatError`` for problems the user can fix (bad config, missing upstream outputs, bad input
rows, a resource pre-flight refusal); its text says what is wrong and how to fix it. Anything else
(a torch OOM, a pandas error, an internal invariant) keeps its traceback: those are not the user's
to fix from a message.
"""


class RaycatError(Exception):
    """A problem the user can fix: printed by the CLI as one line, without a traceback."""


class MissingInputError(RaycatError, FileNotFoundError):
    """An input a stage needs is not there (a file, a package, an earlier stage's output)."""


class StageFailed(RaycatError):
    """A stage finished its work but its outcome breaks a policy the user set (e.g. too many teacher
    failures); ``result`` holds the stage's metrics so they can still be shown."""

    def __init__(self, stage: str, message: str, result: dict):
        super().__init__(message)
        self.stage, self.result = stage, result
