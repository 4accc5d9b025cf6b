"""Error types shared by every portion of qsurgeon.

They live in the client portion because dependencies flow server -> worker -> client:
every layer can raise them and the CLI can turn them into one-line messages without
importing anything heavy.
"""


class QsurgeonError(Exception):
    """Base of every error qsurgeon raises on purpose; its message is meant for users."""


class UsageError(QsurgeonError, ValueError):
    """The user asked for something invalid (bad option, bad file, bad problem)."""


class InvalidProblemError(UsageError):
    """A block problem is malformed: shapes, symmetry, constraint or values."""


class InfeasibleSolutionError(QsurgeonError):
    """A solver returned an assignment that violates the problem's constraint."""


class SolverUnavailableError(UsageError):
    """A solver is unknown, or its optional dependencies are not installed."""


class ProblemTooLargeError(UsageError):
    """A problem has more variables than the chosen solver accepts."""
