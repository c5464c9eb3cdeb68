"""Checkpoints that survive a kill: written atomically, the previous one kept until the new one is complete.

MONAI's ``CheckpointSaver`` writes with Ignite's ``DiskSaver(atomic=False)``, and Ignite's ``Checkpoint``
removes the file it replaces *before* writing the new one: a kill during the write can leave no complete
checkpoint. :class:`AtomicCheckpointSaver` is the same Ignite ``Checkpoint`` with a save handler that writes to a
temporary file, renames it into place, and only then removes the file it replaces.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from monai_adv.errors import CheckpointError, MissingFileError, StorageError

__all__ = [
    "AtomicCheckpointSaver",
    "KeepPreviousDiskSaver",
    "check_checkpoint_fits",
    "checkpoint_entries",
    "latest_checkpoint",
    "require_file",
]


class KeepPreviousDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver(atomic=True)`` that removes a replaced checkpoint only after the new one is in place.

    Ignite's ``Checkpoint`` calls :meth:`remove` for the file it drops before it calls the saver; here the removal
    waits until the next write has been renamed into place.

    Args:
        dirname: folder of the checkpoints (created if absent; other files in it are left alone).
        filename: a fixed file name (e.g. ``"model.pt"``) used instead of Ignite's generated one.
        kwargs: passed to ``torch.save``.

    Raises:
        StorageError: (an ``OSError``) when ``dirname`` cannot be created (a file in the way, a read-only or full
            disk), naming it.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None, **kwargs: Any) -> None:
        try:
            super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        except OSError as err:  # ignite creates the folder here: a file in the way, a read-only or full disk
            raise StorageError(
                f"cannot write the training's files in {dirname}: {err.strerror or err} ({err.filename or dirname}). "
                "Give a --bundle_root that is a writable folder with free space."
            ) from err
        self.filename = filename
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        """Write ``checkpoint`` atomically, then remove the file it replaces.

        Raises:
            StorageError: (an ``OSError``) when the file cannot be written (disk full, read-only), naming it; the
                previous checkpoint is kept.
        """
        target = self.filename or filename
        try:
            super().__call__(checkpoint, target, metadata)
        except OSError as err:
            raise StorageError(
                f"cannot write checkpoint {self.dirname / target}: {err.strerror or err}. Free disk space or make "
                f"{self.dirname} writable; the previous checkpoint, if any, is kept."
            ) from err
        pending, self.pending_removal = self.pending_removal, []
        for old in pending:
            if old != target and (self.dirname / old).exists():
                super().remove(old)

    def remove(self, filename: str) -> None:
        """Remove ``filename`` once the next checkpoint is complete."""
        self.pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver:
    """Save checkpoints atomically: either every ``save_interval`` epochs (or iterations), or the best model by
    the engine's key metric. Arguments as in MONAI's ``CheckpointSaver``, of which this does these two jobs.

    The best model is never saved while its key metric or any of its tensors is NaN or infinite (a warning says
    so, and the previous best model stays).

    File names are MONAI's: ``checkpoint_epoch=N.pt`` (``checkpoint_iteration=N.pt``), or ``key_metric_filename``.
    :meth:`state_dict` / :meth:`load_state_dict` hold the best score so far: save them with the trainer's
    checkpoint so that after a resume a worse model does not replace the best one.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects to save, each with ``state_dict()`` (e.g. ``{"model": net, "optimizer": opt}``).
        save_interval: save every N epochs (``epoch_level``) or iterations; 0 to save the best model instead.
        n_saved: how many interval checkpoints to keep.
        epoch_level: count ``save_interval`` in epochs (True) or iterations (False).
        save_key_metric: save when the engine's key metric (or ``key_metric_name``) is the best so far.
        key_metric_name: the metric in ``engine.state.metrics``; default the engine's key metric.
        key_metric_filename: fixed file name of the best model (e.g. ``"model.pt"``).
        key_metric_negative_sign: lower is better.
        name: logger name; default the engine's logger.

    Raises:
        ValueError: when both or neither of ``save_interval > 0`` and ``save_key_metric`` are given.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 0,
        n_saved: int | None = 1,
        epoch_level: bool = True,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_filename: str | None = None,
        key_metric_negative_sign: bool = False,
        name: str | None = None,
    ) -> None:
        if (int(save_interval) > 0) == bool(save_key_metric):
            raise ValueError(
                "give either save_interval > 0 (a checkpoint every N epochs or iterations) or save_key_metric=True "
                f"(the best model), got save_interval={save_interval!r}, save_key_metric={save_key_metric!r}."
            )
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = int(save_interval)
        self.epoch_level = epoch_level
        self.save_key_metric = bool(save_key_metric)
        self.key_metric_name = key_metric_name
        self.key_metric_sign = -1.0 if key_metric_negative_sign else 1.0
        self.logger = logging.getLogger(name) if name else None
        self.best_epoch = -1  # epoch of the best model saved so far (key-metric mode)
        if self.save_key_metric:
            score_function, score_name, n_saved = self._key_metric_score, "key_metric", 1
            handler = KeepPreviousDiskSaver(save_dir, filename=key_metric_filename)
        else:
            score_function, score_name = self._step_score, "epoch" if epoch_level else "iteration"
            handler = KeepPreviousDiskSaver(save_dir)
        self.checkpoint = Checkpoint(
            to_save=dict(save_dict),
            save_handler=handler,
            filename_prefix="",
            score_function=score_function,
            score_name=score_name,
            n_saved=n_saved,
        )

    def _step_score(self, engine: Engine) -> int:
        return engine.state.epoch if self.epoch_level else engine.state.iteration

    def _key_metric_score(self, engine: Engine) -> float:
        metric_name = self.key_metric_name or getattr(engine.state, "key_metric_name", None)
        if metric_name is None:
            raise ValueError("save_key_metric=True needs key_metric_name, or an engine with a key metric.")
        return self.key_metric_sign * float(engine.state.metrics[metric_name])

    def attach(self, engine: Engine) -> None:
        """Save at the end of each epoch (best model), or every ``save_interval`` epochs or iterations."""
        if self.logger is None:
            self.logger = engine.logger
        if self.save_key_metric:
            engine.add_event_handler(Events.STARTED, self._restore_best)
            event = Events.EPOCH_COMPLETED
        elif self.epoch_level:
            event = Events.EPOCH_COMPLETED(every=self.save_interval)
        else:
            event = Events.ITERATION_COMPLETED(every=self.save_interval)
        engine.add_event_handler(event, self)

    def _non_finite(self) -> list[str]:
        """Names of the saved objects' tensors that hold NaN or infinite values."""
        found = []
        for name, obj in self.save_dict.items():
            state = obj.state_dict() if hasattr(obj, "state_dict") else {}
            for key, value in state.items() if isinstance(state, Mapping) else []:
                if (
                    isinstance(value, torch.Tensor)
                    and value.is_floating_point()
                    and not bool(torch.isfinite(value).all())
                ):
                    found.append(f"{name}.{key}")
        return found

    def __call__(self, engine: Engine) -> None:
        if self.save_key_metric:
            score = self._key_metric_score(engine)
            non_finite = self._non_finite()
            if not math.isfinite(score) or non_finite:
                warnings.warn(
                    f"not saving the best model at epoch {engine.state.epoch}: "
                    + (f"its key metric is {score}" if not math.isfinite(score) else "")
                    + (" and " if not math.isfinite(score) and non_finite else "")
                    + (f"{len(non_finite)} of its tensors are not finite (e.g. {non_finite[0]})" if non_finite else "")
                    + f"; {self.save_dir} keeps the previous best model, if any.",
                    stacklevel=2,
                )
                return
        saved_before = self.checkpoint.state_dict()
        self.checkpoint(engine)
        if self.save_key_metric:
            if self.checkpoint.state_dict() != saved_before:
                self.best_epoch = engine.state.epoch
        else:
            self.logger.info(f"Saved checkpoint at {self.checkpoint.score_name}: {self._step_score(engine)}")

    def _restore_best(self, engine: Engine) -> None:
        """A MONAI workflow that has not compared a metric yet learns the resumed best (for its "best" log lines)."""
        saved = self.checkpoint.state_dict()
        items = next(iter(saved.values()), [])
        if items and getattr(engine.state, "best_metric_epoch", None) == -1:
            engine.state.best_metric = self.key_metric_sign * float(max(p for p, _ in items))
            engine.state.best_metric_epoch = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        """Ignite's record of the scores and file names saved so far, as plain floats and strings (so that
        ``torch.load(weights_only=True)`` reads it back), and the epoch of the best model."""
        state: dict[str, Any] = {
            key: [(float(p), str(f)) for p, f in items] for key, items in self.checkpoint.state_dict().items()
        }
        state["best_epoch"] = int(self.best_epoch)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the record of saved scores (see :meth:`state_dict`)."""
        state = dict(state_dict)
        self.best_epoch = int(state.pop("best_epoch", -1))
        self.checkpoint.load_state_dict({key: [tuple(item) for item in items] for key, items in state.items()})


@functools.lru_cache(maxsize=8)
def _keys_of_version(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(torch.load(path, map_location="cpu", weights_only=True).keys())


def _checkpoint_keys(path: str | os.PathLike) -> tuple[str, ...]:
    """The entries of the checkpoint at ``path``, read once per version of the file.

    Resuming asks twice (:func:`latest_checkpoint` to find a readable one, :func:`checkpoint_entries` for its
    entries) before ``CheckpointLoader`` reads it: the cache, keyed by the file's modification time and size,
    saves one full read; a rewritten file is read again.

    Raises:
        Exception: whatever ``torch.load`` raises for a file it cannot read (not cached).
    """
    stat = os.stat(path)
    return _keys_of_version(os.fspath(path), stat.st_mtime_ns, stat.st_size)


def _epoch_of(path: Path) -> int:
    digits = "".join(ch for ch in path.stem.rsplit("=", 1)[-1] if ch.isdigit())
    return int(digits) if digits else -1


def latest_checkpoint(folder: str | os.PathLike, pattern: str = "checkpoint_epoch=*.pt") -> str:
    """The most recent *readable* file matching ``pattern`` in ``folder`` (by the epoch in its name, then time).

    A file that ``torch.load`` cannot read (e.g. truncated by a kill) is skipped with a warning that names it,
    and the previous one is used.

    Raises:
        FileNotFoundError: when no checkpoint matches, or none of them can be read.
    """
    found = sorted(Path(folder).glob(pattern), key=lambda p: (_epoch_of(p), p.stat().st_mtime), reverse=True)
    if not found:
        raise MissingFileError(f"no checkpoint matching {pattern!r} in {folder}: nothing to resume from.")
    for path in found:
        try:
            _checkpoint_keys(path)
        except Exception as err:  # noqa: BLE001 - whatever fails to load (truncated, empty, junk) cannot be resumed
            warnings.warn(
                f"skipping unreadable checkpoint {path} ({type(err).__name__}: {err}); trying an earlier one."
            )
            continue
        return str(path)
    raise MissingFileError(
        f"none of the checkpoints in {folder} can be read ({[p.name for p in found]}): nothing to resume from."
    )


def checkpoint_entries(
    load_dict: Mapping[str, Any], path: str | os.PathLike | None, optional: tuple[str, ...] = ("random_states",)
) -> dict[str, Any]:
    """``load_dict`` for ``CheckpointLoader``, without the ``optional`` entries that the checkpoint at ``path`` lacks.

    Ignite refuses a checkpoint that lacks an entry of ``load_dict``; a checkpoint written before an entry was
    added to the bundle's ``save_dict`` (the random states) still resumes, with a warning naming what is not
    restored.

    Args:
        load_dict: the objects to restore, by checkpoint entry.
        path: the checkpoint (None: nothing is loaded, ``load_dict`` is returned as it is).
        optional: the entries that may be missing.
    """
    if path is None:
        return dict(load_dict)
    entries = _checkpoint_keys(path)
    missing = [k for k in optional if k in load_dict and k not in entries]
    if missing:
        warnings.warn(
            f"{path} has no {missing} (written by an earlier version): the continued training starts those from "
            "the seed, so it will not draw what an uninterrupted training would have."
        )
    return {k: v for k, v in load_dict.items() if k not in missing}


def require_file(path: str | os.PathLike, what: str = "file") -> str:
    """Return ``path`` if it is a file, else raise an error that says which input it was.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
    """
    if not Path(path).is_file():
        raise MissingFileError(f"{what} {path} does not exist.")
    return str(path)


NETWORK_SETTINGS = ("features", "in_channels", "out_channels", "spatial_dims", "image_size")


def _convolutions(state: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in state.items() if k.endswith("weight") and getattr(v, "ndim", 0) in (4, 5)]


def _described(state: Mapping[str, Any]) -> str:
    """What the weights say about the network: input channels and spatial dims (first convolution), output
    channels (last one)."""
    convolutions = _convolutions(state)
    if not convolutions:
        return ""
    (_, first), (_, last) = convolutions[0], convolutions[-1]
    return f"in_channels {first[1]}, out_channels {last[0]}, spatial_dims {len(first) - 2}, first features {first[0]}"


def check_checkpoint_fits(
    network: torch.nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], key: str = "model"
) -> None:
    """Refuse a checkpoint saved from a network of another size, naming the settings to repeat.

    ``load_state_dict`` of a BasicUNet with other ``features`` (or channels, or spatial dims) fails with a size
    mismatch for every layer, hundreds of lines that do not say which command-line setting differs. This compares
    names and shapes first and raises one error that names the differing tensors, what the checkpoint's weights say
    (input/output channels, spatial dims, first features), the settings recorded in ``training_run.json`` next to
    it (when there is one), and the overrides to repeat: ``--features``, ``--in_channels``, ``--out_channels``,
    ``--spatial_dims`` (and ``--image_size`` for the inputs).

    Args:
        network: the network the weights are for (a ``DistributedDataParallel`` wrapper is looked through).
        checkpoint: a checkpoint file (``model.pt``, or a training checkpoint holding ``key``) or a state dict.
        key: the entry of a training checkpoint that holds the network's weights.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) when the file does not exist.
        CheckpointError: (a ``ValueError``) when tensors are missing, unexpected or of another shape.
    """
    source = "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        require_file(checkpoint, "checkpoint")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    else:
        state = checkpoint
    if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
        state = state[key]
    module = getattr(network, "module", network)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    different = [
        f"{k}: checkpoint {tuple(state[k].shape)}, network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or different):
        return
    found = []
    if different:
        found.append(f"{len(different)} tensor(s) of another shape (e.g. {different[0]})")
    if missing:
        found.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    weights, network_has = _described(state), _described(expected)
    recorded = ""
    if isinstance(checkpoint, (str, os.PathLike)):
        record_path = Path(checkpoint).parent / "training_run.json"
        try:
            settings = json.loads(record_path.read_text()).get("settings") or {}
        except (OSError, ValueError):
            settings = {}
        shown = [f"--{k} {json.dumps(settings[k])}" for k in NETWORK_SETTINGS if k in settings]
        if shown:
            recorded = f" Its training ({record_path}) used {' '.join(shown)}."
    raise CheckpointError(
        f"{source} was saved from a network of another size: {', '.join(found)}."
        + (f" Its weights have {weights}; this network has {network_has}." if weights and network_has else "")
        + recorded
        + " Repeat the training's --features, --in_channels, --out_channels and --spatial_dims (and --image_size) "
        "when evaluating, inferring or attacking it."
    )
