"""``FolderLock``: one writer per folder (the training lock, and the lock ``run augment`` is to take; issue 15, 9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from monai_adv.bundle import FolderLock
from monai_adv.errors import LockError

HOLDER = """
import sys, time
from monai_adv.bundle import FolderLock
FolderLock(sys.argv[1], "augment.lock", "augmentation", info={"output": sys.argv[1]}).acquire()
print("HELD", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_the_first_runs_and_takes_over_after_it_died(tmp_path):
    folder = tmp_path / "augmented"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "HELD"
        second = FolderLock(folder, "augment.lock", "augmentation", "write into another --output_dir")
        with pytest.raises(LockError) as info:
            second.acquire()
        message = str(info.value)
        assert message.startswith(f"another augmentation is running in {folder} (pid {holder.pid} on ")
        assert f"output {folder}" in message and "write into another --output_dir" in message
        assert str(folder / "augment.lock") in message
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="taking over the stale lock"), second:
        assert json.loads((folder / "augment.lock").read_text())["pid"] == os.getpid()
    assert not (folder / "augment.lock").exists()


def test_an_empty_lock_file_counts_as_being_written_for_a_while(tmp_path):
    (tmp_path / "x.lock").write_text("")
    with pytest.raises(LockError, match="pid \\? on \\?"):
        FolderLock(tmp_path, "x.lock").acquire()
    old = time.time() - 60
    os.utime(tmp_path / "x.lock", (old, old))
    with pytest.warns(UserWarning, match="stale lock"):
        FolderLock(tmp_path, "x.lock").acquire().release()
