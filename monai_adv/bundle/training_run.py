"""One training in one bundle root: its identity, its lock, and what MLflow is told about it.

A fresh training gets a new identity (``run_<time>_<random>``), used as its MLflow run name, and moves the files
of the previous training (``checkpoint_epoch=*.pt``, ``model.pt``, its record) to ``previous_runs/<identity>/``
so that ``resume=true`` can only pick up the latest training. ``resume=true`` keeps the identity recorded in
``training_run.json``, so MLflow continues the same run. A lock file keeps a second training out of the root
while one runs; the lock of a process that no longer runs is taken over with a warning.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from monai.utils import str2bool

from monai_adv.bundle.checkpoints import latest_checkpoint
from monai_adv.bundle.locks import FolderLock, read_json_object
from monai_adv.errors import MonaiAdvError, SettingsError, StorageError, TrackingError, TrainingInterrupted

__all__ = ["RESUMABLE_SETTINGS", "TrainingRun", "check_mlflow_handlers", "prepare_mlflow_handlers"]

RECORD_NAME = "training_run.json"
LOCK_NAME = "training.lock"
ARCHIVE_DIR = "previous_runs"
CHECKPOINT_PATTERN = "checkpoint_epoch=*.pt"
BEST_MODEL_NAME = "model.pt"
HISTORY_NAME = "training_history.json"  # monai_adv.bundle.TrainingHistory's file in the bundle

# settings a resumed training may change: they do not change what is trained, only for how long and how fast
RESUMABLE_SETTINGS = ("max_epochs", "val_interval", "num_workers", "adv#track_loss", "resume")

logger = logging.getLogger(__name__)
# the trainers' MLflow handlers of this process (prepare_mlflow_handlers), closed as KILLED on SIGTERM
_TRACKED_HANDLERS: list[Any] = []
# (client, run id) of runs whose KILLED status could not be written from the SIGTERM handler: written at exit
_KILLED_AT_EXIT: list[tuple[Any, str]] = []


def close_as_killed(client: Any, run_id: str) -> bool:
    """Mark an MLflow run KILLED; if that fails (the signal came in the middle of a write to the same store, which
    the handler cannot reenter), try again at exit, once the interrupted call has unwound.

    Args:
        client: an ``MlflowClient``, or the :class:`~monai_adv.bundle.tracking.TrackingGuard` around one (the raw
            client is used: the guard turns a failure into the stop that is already under way).
        run_id: the run to close.

    Returns:
        Whether the run was closed now.
    """
    raw = getattr(client, "client", client)
    try:
        raw.set_terminated(run_id, "KILLED")
        return True
    except Exception as err:  # noqa: BLE001 - any failure here is retried at exit
        logger.debug("MLflow run %s not closed as KILLED from the signal handler (%s): retried at exit", run_id, err)
        if not _KILLED_AT_EXIT:
            atexit.register(close_killed_runs)
        _KILLED_AT_EXIT.append((raw, run_id))
        return False


def close_killed_runs() -> None:
    """Close the runs :func:`close_as_killed` could not (at exit; quietly: the stop's line stays the last one)."""
    while _KILLED_AT_EXIT:
        client, run_id = _KILLED_AT_EXIT.pop(0)
        try:
            client.set_terminated(run_id, "KILLED")
        except Exception as err:  # noqa: BLE001 - nothing more can be done at exit; the run stays RUNNING
            logger.debug("MLflow run %s could not be closed as KILLED: %s", run_id, err)


def _comparable(value: Any) -> Any:
    """A setting as JSON would record it, with MONAI's true/false words as booleans (``"false"`` equals False)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
        return str2bool(value.strip())
    if isinstance(value, str) and value.strip().lower() in ("null", "none"):
        return None
    return json.loads(json.dumps(value, default=str))


class TrainingRun:
    """The identity and resume point of a training in ``ckpt_dir``; a checkpointable object.

    With ``settings``, a fresh training records them in ``training_run.json``, and a resumed one compares its own
    with them at :meth:`start` and refuses any change (naming each changed key) except of :data:`RESUMABLE_SETTINGS`:
    a resumed training continues the same run, whose MLflow parameters cannot change.

    Args:
        ckpt_dir: the bundle's checkpoint folder (``models/``).
        resume: continue the latest training of this folder (``--resume true`` arrives as a string).
        settings: the settings that define the training, keyed as on the command line (the bundle's ``settings``).

    Raises:
        SettingsError: (a ``ValueError``) when ``resume`` is not a boolean or one of MONAI's true/false words.
    """

    def __init__(
        self, ckpt_dir: str | os.PathLike, resume: bool | str = False, settings: Mapping[str, Any] | None = None
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        # keys such as "_desc_" are the config's comments
        self.settings = {k: _comparable(v) for k, v in (settings or {}).items() if not str(k).startswith("_")}
        try:
            self.resume = str2bool(str(resume).strip() if not isinstance(resume, bool) else resume)
        except ValueError as err:  # MONAI's message does not name the setting
            raise SettingsError(f"resume must be true or false, got {resume!r}.") from err
        record = read_json_object(self.ckpt_dir / RECORD_NAME) if self.resume else None
        self.recorded_settings = record.get("settings") if record and isinstance(record.get("settings"), dict) else None
        if record and record.get("run_id"):
            self.run_id = str(record["run_id"])
            self.started = str(record.get("started", ""))
        else:
            self.run_id = f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"
            self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.lock_path = self.ckpt_dir / LOCK_NAME
        self._lock = FolderLock(
            self.ckpt_dir, LOCK_NAME, "training", "train in another --bundle_root",
            {"run_id": self.run_id, "started": self.started},
        )  # fmt: skip
        self._holds_lock = False
        self._previous_sigterm: Any = None

    @property
    def run_name(self) -> str:
        """The MLflow run name of this training (its identity)."""
        return self.run_id

    @cached_property
    def checkpoint(self) -> str | None:
        """The checkpoint to resume from: the latest readable ``checkpoint_epoch=N.pt``; None when not resuming.

        Raises:
            FileNotFoundError: when resuming and there is no readable checkpoint.
        """
        return latest_checkpoint(self.ckpt_dir, CHECKPOINT_PATTERN) if self.resume else None

    def start(self) -> None:
        """Take the lock, put a previous training's files aside (fresh trainings), record this training.

        Raises:
            FileNotFoundError: when resuming and there is no readable checkpoint.
            SettingsError: when resuming with settings that differ from the training's, naming each changed key.
            LockError: (a ``RuntimeError``) when another training holds the lock of ``ckpt_dir``.
            StorageError: (an ``OSError``) when ``ckpt_dir`` cannot be written (read-only, full, a file in the way).
        """
        _ = self.checkpoint  # fail before touching anything
        self.check_resumed_settings()
        try:
            self._write_start()
        except OSError as err:
            if isinstance(err, MonaiAdvError):
                raise
            raise StorageError(
                f"cannot write the training's files in {self.ckpt_dir}: {err.strerror or err} "
                f"({err.filename or self.ckpt_dir}). Give a --bundle_root that is a writable folder with free space."
            ) from err
        self._stop_on_sigterm()
        logger.info(
            f"training {self.run_id} in {self.ckpt_dir}" + (f", resuming from {self.checkpoint}" if self.resume else "")
        )

    def _write_start(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        if not self.resume:
            self._archive_previous()
        record = {"run_id": self.run_id, "started": self.started, "resumed": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if not self.resume:
            record.pop("resumed")
        recorded = self.recorded_settings if self.resume and self.recorded_settings is not None else self.settings
        if recorded:
            record["settings"] = {k: v for k, v in recorded.items() if k not in RESUMABLE_SETTINGS}
        (self.ckpt_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")

    def changed_settings(self) -> dict[str, tuple[Any, Any]]:
        """``{key: (recorded, now)}`` for the settings a resumed training changes (none when not resuming, or when the
        training recorded no settings)."""
        if not self.resume or self.recorded_settings is None or not self.settings:
            return {}
        keys = {k for k in set(self.recorded_settings) | set(self.settings) if not str(k).startswith("_")}
        keys -= set(RESUMABLE_SETTINGS)
        missing = object()
        return {
            key: (self.recorded_settings.get(key), self.settings.get(key))
            for key in sorted(keys)
            if self.recorded_settings.get(key, missing) != self.settings.get(key, missing)
        }

    def check_resumed_settings(self) -> None:
        """Refuse to resume with other settings than those the training was started with.

        Raises:
            SettingsError: naming each changed key with its recorded and new value, and how to start a new training.
        """
        changed = self.changed_settings()
        if not changed:
            return
        listing = ", ".join(f"--{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changed.items())
        raise SettingsError(
            f"--resume true would continue training {self.run_id} with other settings than it was started with "
            f"({self.ckpt_dir / RECORD_NAME}): {listing}. Resume it with its own settings (only "
            f"{', '.join('--' + k for k in RESUMABLE_SETTINGS if k != 'resume')} may change), or start a new training "
            "with these settings by leaving out --resume true (the current one is then moved to "
            f"{self.ckpt_dir / ARCHIVE_DIR}/{self.run_id}/)."
        )

    def _stop_on_sigterm(self) -> None:
        """From now on SIGTERM (a scheduler, ``docker stop``) stops the training cleanly (see :meth:`terminate`)."""
        if threading.current_thread() is threading.main_thread() and self._previous_sigterm is None:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self.terminate)

    def terminate(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """The SIGTERM handler: abandon the iteration in progress, close the MLflow runs as KILLED, and raise.

        The exception ends the trainer like any error: the checkpoints already written stay (each is complete, see
        :class:`~monai_adv.bundle.AtomicCheckpointSaver`), and the lock is released at exit. A second SIGTERM gets
        the handler that was there before.

        Raises:
            TrainingInterrupted: naming the training, the signal and the last complete checkpoint.
        """
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        found = sorted(self.ckpt_dir.glob(CHECKPOINT_PATTERN), key=lambda p: p.stat().st_mtime)
        last = f"{found[-1]} is the last complete checkpoint" if found else "no checkpoint had been written yet"
        stop = TrainingInterrupted(
            f"training {self.run_id} stopped by {signal.Signals(signum).name}: the iteration in progress was "
            f"abandoned, {last}, and the lock is released. Continue it with --resume true."
        )
        from monai_adv.bundle.tracking import request_stop

        request_stop(stop)
        for handler in _TRACKED_HANDLERS:
            run = getattr(handler, "cur_run", None)
            if run is not None:
                handler.cur_run = None  # MONAI's close() must not mark it FINISHED
                close_as_killed(handler.client, run.info.run_id)
        raise stop

    def finish(self) -> None:
        """Release the lock (also done at exit) and give SIGTERM back its previous handler."""
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if not self._holds_lock:
            return
        self._lock.release()
        self._holds_lock = False

    def _acquire_lock(self) -> None:
        self._lock.acquire()
        self._holds_lock = True

    def _archive_previous(self) -> None:
        files = sorted(self.ckpt_dir.glob(CHECKPOINT_PATTERN))
        names = (BEST_MODEL_NAME, RECORD_NAME, HISTORY_NAME)
        files += [self.ckpt_dir / name for name in names if (self.ckpt_dir / name).is_file()]
        if not files:
            return
        previous = read_json_object(self.ckpt_dir / RECORD_NAME) or {}
        name = str(previous.get("run_id") or time.strftime("run_before_%Y%m%d_%H%M%S"))
        destination = self.ckpt_dir / ARCHIVE_DIR / name
        while destination.exists():
            destination = destination.with_name(destination.name + "_")
        destination.mkdir(parents=True)
        for path in files:
            shutil.move(str(path), destination / path.name)
        warnings.warn(
            f"a fresh training (resume=false) moved the previous training's {[p.name for p in files]} to {destination}."
        )

    def state_dict(self) -> dict[str, Any]:
        """The identity, saved with the trainer's checkpoint."""
        return {"run_id": self.run_id, "started": self.started}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check that a resumed checkpoint belongs to this training (warn if not) and take on its identity."""
        run_id = str(state_dict.get("run_id", ""))
        if run_id and run_id != self.run_id:
            warnings.warn(f"checkpoint of training {run_id} resumed as training {self.run_id} (see {RECORD_NAME}).")


def _refuse_deleted_experiment(handler: Any, uri: str) -> None:
    """MLflow refuses to log into a soft-deleted experiment ("Cannot set a deleted experiment"), after startup."""
    name = getattr(handler, "experiment_name", None)
    experiment = handler.client.get_experiment_by_name(name) if name else None
    if experiment is None or str(experiment.lifecycle_stage).lower() == "active":
        return
    raise TrackingError(
        f"the MLflow experiment {name!r} at {uri} is deleted (id {experiment.experiment_id}, in MLflow's trash): "
        f"restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
        f"{experiment.experiment_id}`, remove it for good with `mlflow gc --backend-store-uri {uri}`, or log to "
        "another experiment with --experiment_name NAME."
    )


def check_mlflow_handlers(handlers: Iterable[Any], check_timeout: float = 5.0) -> list[Any]:
    """Check the tracking store of MONAI's MLFlowHandlers now, before any data is read or training starts.

    For each ``MLFlowHandler`` in ``handlers`` (others are ignored, e.g. TensorBoard's): MLflow's HTTP retries and
    timeouts are bounded (:func:`~monai_adv.bundle.tracking.bound_http_retries`, only the variables the user has
    not set), an HTTP tracking server that does not answer within ``check_timeout`` seconds is refused, its client
    is wrapped in a :class:`~monai_adv.bundle.tracking.TrackingGuard`, and a soft-deleted experiment of the
    handler's name is refused, with how to restore it or use another name.

    The bundle calls it first with ``@validate#handlers``: ``--tracking mlflow`` gives the validator's handler the
    same tracking URI and experiment as the trainer's, and resolving the validator's handlers reads no data
    (resolving ``@train#handlers`` builds the validator through its ``ValidationHandler``, which caches the
    validation set). :func:`prepare_mlflow_handlers` calls it again for the trainer's handlers. Calling it twice on
    the same handlers is harmless.

    Args:
        handlers: handlers of an engine (the config's ``train#handlers`` or ``validate#handlers``).
        check_timeout: seconds to wait for an HTTP tracking server to answer.

    Returns:
        The MLFlowHandlers found.

    Raises:
        TrackingError: (a ``RuntimeError``) when an HTTP tracking server does not answer, or the experiment is
            soft-deleted (saying how to restore or rename it).
    """
    from monai.handlers import MLFlowHandler

    from monai_adv.bundle.tracking import TrackingGuard, bound_http_retries, check_tracking_server

    found = [h for h in handlers or [] if isinstance(h, MLFlowHandler)]
    if found:
        bound_http_retries()
    checked: set[str] = set()
    for handler in found:
        uri = str(getattr(handler.client, "tracking_uri", ""))
        if uri not in checked:
            check_tracking_server(uri, timeout=check_timeout)
            checked.add(uri)
        if not isinstance(handler.client, TrackingGuard):
            handler.client = TrackingGuard(handler.client)
        _refuse_deleted_experiment(handler, uri)
    return found


def prepare_mlflow_handlers(
    handlers: Iterable[Any],
    params: Mapping[str, Any] | None = None,
    resume: bool = False,
    validation_handlers: Iterable[Any] | None = None,
    check_timeout: float = 5.0,
) -> list[Any]:
    """Make MONAI's MLFlowHandlers safe for a long training, give them ``params``, and reopen a resumed run.

    ``--tracking mlflow`` appends an ``MLFlowHandler`` to ``train#handlers`` and ``validate#handlers``. For each:

    - :func:`check_mlflow_handlers`: MLflow's HTTP retries and timeouts are bounded, an HTTP tracking server that
      does not answer within ``check_timeout`` seconds is refused in one line instead of stalling the trainer's
      start, and a soft-deleted experiment of the same name is refused, with how to restore it or use another name;
    - its client is wrapped in a :class:`~monai_adv.bundle.tracking.TrackingGuard`: a logging call that fails
      (the server died mid-run) is a warning, training and checkpoints go on, and a summary of what was not logged
      comes at the end;
    - the trainer's handlers log ``params`` (their ``experiment_param``) when their run starts;
    - MONAI's handler never writes into a FINISHED run: when resuming a training that had completed, the run of
      that name is set back to RUNNING, so the resumed epochs join it.

    Args:
        handlers: the trainer's handlers (others than MLFlowHandler are ignored).
        params: flat parameters to log, e.g. ``AdversarialAugmentationHandler.params``.
        resume: whether this training resumes an earlier one.
        validation_handlers: the validator's handlers (guarded and checked, not given ``params``).
        check_timeout: seconds to wait for an HTTP tracking server to answer.

    Returns:
        The trainer's MLFlowHandlers found.

    Raises:
        TrackingError: (a ``RuntimeError``) when an HTTP tracking server does not answer, or the experiment is
            soft-deleted (saying how to restore or rename it).
    """
    found = check_mlflow_handlers(handlers, check_timeout)
    check_mlflow_handlers(validation_handlers or [], check_timeout)
    _TRACKED_HANDLERS.extend(h for h in found if h not in _TRACKED_HANDLERS)
    for handler in found:
        if params:
            handler.experiment_param = {**(handler.experiment_param or {}), **{k: str(v) for k, v in params.items()}}
        if resume and handler.run_name:
            experiment = handler.client.get_experiment_by_name(handler.experiment_name)
            if experiment is None:
                continue
            runs = handler.client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{handler.run_name}'"
            )
            if runs and all(run.info.status == "FINISHED" for run in runs):
                handler.client.update_run(runs[0].info.run_id, status="RUNNING")
    return found
