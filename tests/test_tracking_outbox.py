"""The tracking outbox: a durable, ordered journal one process owns at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.tracking.outbox import OUTBOX_DIR, Outbox, OutboxBusy, OutboxError, find_outboxes


def test_entries_survive_a_killed_writer_in_order_with_their_files(tmp_path: Path) -> None:
    folder = tmp_path / OUTBOX_DIR
    child = f"""
import os
from pathlib import Path
from fedge.tracking.outbox import Outbox
box = Outbox(Path({str(folder)!r}))
box.append("metrics", {{"run_id": "r", "metrics": [["acc", 0.5, 1, 0]]}})
uid = box.new_uid()
(box.files_for(uid) / "model.bin").write_bytes(b"weights")
box.sync_files(uid)
box.append("register", {{"tags": {{"fedge.trigger_tick": "3"}}}}, uid=uid)
box.append("alias", {{"alias": "champion", "version": 2, "ref": uid}})
os._exit(9)  # no close, no flush: only what append put on disk
"""
    killed = subprocess.run(
        [sys.executable, "-c", child], check=False, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == 9, killed.stderr

    box = Outbox(folder, create=False)  # the dead writer's lock went with it
    pending = box.entries("pending")
    assert [e.kind for e in pending] == ["metrics", "register", "alias"]
    assert pending[1].payload == {"tags": {"fedge.trigger_tick": "3"}}
    staged = folder / "files" / pending[1].uid / "model.bin"
    assert staged.read_bytes() == b"weights"

    box.mark_done(pending[0].seq)
    box.mark_done(pending[1].seq, {"version": 2})
    assert not staged.exists(), "a landed entry's files go"
    box.mark_failed(pending[2].seq, "RESOURCE_DOES_NOT_EXIST")
    assert box.next_pending() is None
    assert box.counts() == {"pending": 0, "done": 2, "failed": 1}
    assert box.entry(pending[1].uid).result == {"version": 2}  # type: ignore[union-attr]
    assert box.retry_failed() == 1
    assert box.next_pending() == box.entries("pending")[0]
    box.close()


def test_one_process_owns_an_outbox_at_a_time(tmp_path: Path) -> None:
    folder = tmp_path / OUTBOX_DIR
    first = Outbox(folder)
    with pytest.raises(OutboxBusy, match=f"pid {os.getpid()}"):
        Outbox(folder)
    first.close()
    second = Outbox(folder)
    second.remove()
    assert not folder.exists()


def test_missing_or_corrupt_journal_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="no tracking outbox"):
        Outbox(tmp_path / "nothing", create=False)
    folder = tmp_path / OUTBOX_DIR
    folder.mkdir()
    (folder / "journal.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError) as caught:
        Outbox(folder)
    assert "\n" not in str(caught.value) and "move it aside" in str(caught.value)


def test_outboxes_are_found_under_a_run_a_scenario_or_an_output_folder_oldest_first(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    made = []
    for run in ("sine2/b-later", "sine2/a-earlier", "circle2/c-last"):
        made.append(out / run / OUTBOX_DIR)
    for folder in (made[1], made[0], made[2]):  # creation order, not name order
        Outbox(folder).close()
    (out / "sine2" / "no-outbox").mkdir()

    assert find_outboxes(out) == [made[1], made[0], made[2]]
    assert find_outboxes(out / "sine2") == [made[1], made[0]]
    assert find_outboxes(out / "sine2" / "b-later") == [made[0]]
    assert find_outboxes(made[2]) == [made[2]]
    assert find_outboxes(out / "sine2" / "no-outbox") == []
