"""Exceptions raised by neonb.

Every error meant for a user says what was expected, what was found, which file it
concerns and, where there is one, what to try. They all derive from :class:`NeonbError`
so a command-line wrapper can turn any of them into a one-line message and a non-zero
exit status without hiding real bugs.
"""

from __future__ import annotations

from os import PathLike


class NeonbError(Exception):
    """Base class of every error neonb raises on purpose."""


class DataError(NeonbError, ValueError):
    """A file or table that neonb was asked to read is missing or not as expected.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, as one short sentence.
        hint: optionally, what the user can do about it.

    Example:
        >>> str(DataError("sub-1_T2w.nii.gz", "is not a NIfTI file"))
        'sub-1_T2w.nii.gz: is not a NIfTI file'
    """

    def __init__(self, path: str | PathLike, problem: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ConfigError(NeonbError, ValueError):
    """A parameter or configuration value is out of its allowed range."""


class NeonbWarning(UserWarning):
    """Something a user should know about an input that neonb could still use.

    For example a header whose ``pixdim`` disagrees with its affine. The command line
    prints each as one line on standard error.
    """
