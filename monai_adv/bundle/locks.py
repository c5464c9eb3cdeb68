"""A lock file that keeps a second process out of a folder while one writes into it (training, ``run augment``).

The lock is a JSON file (``pid``, ``host`` and what holds it) created with ``O_CREAT | O_EXCL``. A lock whose process
no longer runs on this host (killed, crashed) is taken over with a warning; a lock of another host is never
treated as stale. It is released by :meth:`FolderLock.release` and, failing that, at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_adv.errors import LockError

__all__ = ["UNWRITTEN_LOCK_GRACE_S", "FolderLock"]

# a lock file still empty this long after it was created belongs to a process killed while writing it
UNWRITTEN_LOCK_GRACE_S = 30.0


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or holds no object."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """The lock file ``folder/name``, held by this process between :meth:`acquire` and :meth:`release`.

    Args:
        folder: the folder to keep to one writer (created if absent).
        name: the lock file's name (e.g. ``"training.lock"``, ``"augment.lock"``).
        what: what holds it, for messages ("training", "augmentation").
        advice: what to do instead, for the refusal (e.g. "train in another --bundle_root").
        info: more to record in the lock file (e.g. ``{"run_id": ...}``), shown in the refusal.

    Example::

        with FolderLock(output_dir, "augment.lock", "augmentation", "write into another --output_dir"):
            ...  # write the files
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str,
        what: str = "process",
        advice: str = "use another folder",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what
        self.advice = advice
        self.info = dict(info or {})
        self.held = False

    def acquire(self) -> FolderLock:
        """Take the lock (a stale one is taken over with a warning).

        Returns:
            self.

        Raises:
            LockError: (a ``RuntimeError``) when a running process holds it, naming its pid, host and info.
        """
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), **self.info}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json_object(self.path)
                if self._is_held(holder):
                    about = ", ".join(f"{k} {v}" for k, v in (holder or {}).items() if k not in ("pid", "host"))
                    raise LockError(
                        f"another {self.what} is running in {self.folder} (pid {holder.get('pid') if holder else '?'} "
                        f"on {holder.get('host') if holder else '?'}{', ' + about if about else ''}): wait for it to "
                        f"end or {self.advice}. If none runs there, delete {self.path}."
                    ) from None
                warnings.warn(
                    f"taking over the stale lock {self.path} of a {self.what} that no longer runs ({holder})."
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as lock_file:
                json.dump(me, lock_file)
            self.held = True
            atexit.register(self.release)
            return self
        raise LockError(f"could not take the lock {self.path}: other processes keep creating it.")

    def release(self) -> None:
        """Remove the lock file if this process holds it (also done at exit)."""
        if not self.held:
            return
        holder = read_json_object(self.path)
        if holder and holder.get("pid") == os.getpid() and all(holder.get(k) == v for k, v in self.info.items()):
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FolderLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _is_held(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # being written right now, or left empty by a kill
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age < UNWRITTEN_LOCK_GRACE_S
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell whether a process on another machine runs
        pid = int(holder.get("pid", -1))
        return pid != os.getpid() and _process_alive(pid)
