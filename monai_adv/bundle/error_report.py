"""End a failed bundle command with its root cause in one line, when monai-adv raised it about the user's input.

MONAI's bundle CLI wraps every error of a config expression in ``RuntimeError: Failed to evaluate
ConfigExpression: ...``, so a clear message from monai-adv ("mask M is 120x100 but its image ...") sits in the middle
of a long traceback and the last line names only the expression. Importing this module (the bundle configs do, in
``imports``: ``"$import monai_adv.bundle.error_report"``) installs a :data:`sys.excepthook` that prints the traceback
as before and then, when the chain of causes holds an error of monai-adv's own (a
:class:`~monai_adv.errors.MonaiAdvError`, or any exception class defined in ``monai_adv``, such as
``NonFiniteLossError``), one last line::

    monai-adv: error: <that error's message, on one line>

Progress bars still open are closed first, so that their last redraw does not follow the line. Any other error (a bug, an error of MONAI, torch or the system) keeps Python's usual output and nothing is added.
Installing is idempotent and chains to the hook that was installed before.
"""

from __future__ import annotations

import gc
import sys
import warnings
from types import TracebackType

from monai_adv.errors import MonaiAdvError

__all__ = ["PREFIX", "install", "project_error", "summary_line"]

PREFIX = "monai-adv: error: "


def _is_project_error(error: BaseException) -> bool:
    return isinstance(error, MonaiAdvError) or type(error).__module__.split(".")[0] == "monai_adv"


def project_error(error: BaseException) -> BaseException | None:
    """The innermost error of monai-adv's own in the chain of ``error`` and its causes, or None.

    Follows ``__cause__`` (``raise ... from``) and, unless suppressed, ``__context__``.

    Args:
        error: the exception that ended the program.

    Returns:
        The deepest exception in the chain that is a :class:`~monai_adv.errors.MonaiAdvError` or whose class is
        defined in a ``monai_adv`` module; None when there is none.
    """
    found: BaseException | None = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_project_error(current):
            found = current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return found


def summary_line(error: BaseException) -> str:
    """``monai-adv: error: <message>`` with the message's lines joined into one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return PREFIX + (" ".join(lines) if lines else type(error).__name__)


def _close_progress_bars() -> None:
    """Close the tqdm bars still open (Ignite's ``ProgressBar`` of an interrupted epoch), so that their final redraw,
    which tqdm does when a bar is closed or collected at exit, comes before the summary line and not after it."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated objects warns
        warnings.simplefilter("ignore")
        bars = [obj for obj in gc.get_objects() if isinstance(obj, tqdm_module.tqdm)]
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001, S110 - a bar that cannot close must not hide the error report
            pass


class _ErrorReport:
    """The installed hook: the previous hook's output, then the summary line for monai-adv's own errors."""

    def __init__(self, previous) -> None:
        self.previous = previous

    def __call__(self, error_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        self.previous(error_type, error, traceback)
        cause = project_error(error) if isinstance(error, Exception) else None
        if cause is not None:
            _close_progress_bars()
            sys.stderr.flush()
            print(summary_line(cause), file=sys.stderr, flush=True)


def install() -> None:
    """Install the report as :data:`sys.excepthook` (once; the previous hook still prints the traceback)."""
    if not isinstance(sys.excepthook, _ErrorReport):
        sys.excepthook = _ErrorReport(sys.excepthook)


install()
