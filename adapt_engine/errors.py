"""The package's one base exception: errors a user can fix, reported by the CLI as a message and exit code 2.

Every error about bad input (a flag, a path, a file, a model, data, a checkpoint) derives from
:class:`AdaptEngineError`. The CLI catches only this class, so a bug (any other exception) keeps its
traceback. Subclasses that existed before as ``ValueError`` keep that base too, so callers that catch
``ValueError`` still work.
"""

from __future__ import annotations


class AdaptEngineError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""

    exit_code = 2


class UsageError(AdaptEngineError, ValueError):
    """A command-line value or argument combination that cannot work."""


class BenchInputError(UsageError):
    """Bad benchmark input; the message names the problem and the fix."""


class OutputPathError(AdaptEngineError, ValueError):
    """An output location that cannot be written, or that would destroy something it must not."""
