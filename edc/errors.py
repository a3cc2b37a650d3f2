"""Errors a user can act on. Stages print them as one line and exit non-zero, no traceback."""


class EdcError(Exception):
    """Base class: the message names the file, key or shard at fault and what is wrong."""


class ParamsError(EdcError):
    """params.yaml is unreadable or invalid; ``problems`` holds one line per problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class DataError(EdcError):
    """A dataset source or a prepared dataset is missing, malformed or inconsistent."""


class ArtifactError(EdcError):
    """A pipeline artifact (observer checkpoint, statistics file, shard) is missing or inconsistent."""
