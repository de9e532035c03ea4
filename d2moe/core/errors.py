"""User-facing errors: the CLI prints them on one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a field, and how to fix it.

    Raised anywhere in the package; `d2moe.cli.main` turns it into a one-line
    message on stderr and exit code 2, never a traceback.
    """

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None,
                 fix: str | None = None) -> None:
        parts = []
        if path:
            parts.append(str(path))
        if field:
            parts.append(f"field '{field}'")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)
        self.path, self.field, self.fix = path, field, fix


def bare(exc: UserError) -> str:
    """The message of `exc` without its path, field and fix (to re-raise it elsewhere)."""
    text = str(exc)
    prefix = str(UserError("", path=exc.path, field=exc.field)) if exc.path or exc.field else ""
    suffix = f" (fix: {exc.fix})" if exc.fix else ""
    if text.startswith(prefix) and text.endswith(suffix):
        return text[len(prefix):len(text) - len(suffix)] or text
    return text
