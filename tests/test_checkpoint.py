"""The model directory's writes are atomic (`nmt.atomic`): a failure (a full disk) keeps the
previous version and leaves no temporary."""

import errno

import pytest

from nmt import atomic, checkpoint
from nmt.errors import NmtError


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    atomic.write_text(target, "old")

    def full_disk(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NmtError, match="disk full"):
        atomic.write_file(target, full_disk)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_failed_directory_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "export"
    with atomic.directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(NmtError, match="disk full"):
        with atomic.directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "old"
    with atomic.directory(target) as tmp:  # a complete new version replaces the old one
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"]


def test_a_failed_checkpoint_keeps_the_older_ones(tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(2, 2)
    checkpoint.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=3)

    def broken_save(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(NmtError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_reading_a_config_of_another_format_version_names_the_problem(tmp_path):
    (tmp_path / "config.json").write_text('{"format": "nmt-model", "version": 99}')
    with pytest.raises(NmtError, match="version 99"):
        checkpoint.read_config(tmp_path)


def _record_syncs(monkeypatch) -> list[tuple[str, str]]:
    """(event, path) for every fsync (the path read back from the descriptor) and rename, in order."""
    import os

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        replace(src, dst)
        events.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    return events


def test_a_write_reaches_the_disk_before_its_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    """A power cut after a write returned must find the new version: the data is synced before the
    rename, and the directory that holds the new name after it."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to name a descriptor's file")
    target = tmp_path / "config.json"
    events = _record_syncs(monkeypatch)
    atomic.write_text(target, "new")
    tmp = str(atomic.temporary_name(target))
    assert events == [("fsync", tmp), ("rename", str(target)), ("fsync", str(tmp_path))]

    events.clear()
    model = tmp_path / "model"
    with atomic.directory(model) as staged:
        (staged / "sub").mkdir()
        (staged / "sub" / "a.bin").write_bytes(b"a")
        (staged / "b.txt").write_text("b")
        atomic.write_text(staged / "c.json", "c", staged=True)  # written atomically inside it: synced by it, once
    staged = str(staged)
    synced_before = [p for e, p in events[: events.index(("rename", str(model)))] if e == "fsync"]
    assert sorted(synced_before) == sorted([f"{staged}/b.txt", f"{staged}/c.json", f"{staged}/sub/a.bin",
                                            f"{staged}/sub", staged])
    assert events[-2:] == [("rename", str(model)), ("fsync", str(tmp_path))]
    assert (model / "sub" / "a.bin").read_bytes() == b"a"


@pytest.mark.parametrize("code, fails", [(errno.EINVAL, False), (errno.EIO, True)])
def test_a_folder_that_cannot_be_synced_after_the_rename(tmp_path, monkeypatch, code, fails):
    """A filesystem that cannot fsync a directory (EINVAL) is let be; a real failure (EIO) of the
    sync after the rename is a one-line error that says the new version is written, and leaves
    nothing aside: no temporary, no old version (a staged directory's own folders, synced before
    its rename, and the files written into it sync here)."""
    import os

    writes = {"t0": lambda target, text: atomic.write_text(target, text),
              "t1": lambda target, text: _write_directory(target, text)}
    for name, write in writes.items():
        write(tmp_path / name, "old")
    fsync = os.fsync

    def folders_fail(fd):  # the folder that holds the new versions, synced after their renames
        if os.path.samestat(os.fstat(fd), os.stat(tmp_path)):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", folders_fail)
    for name, write in writes.items():
        target = tmp_path / name
        if fails:
            with pytest.raises(NmtError) as e:
                write(target, "new")
            assert str(e.value) == f"{target}: written, but its folder could not be synced to the disk ({os.strerror(code)})"
        else:
            write(target, "new")
        content = target.read_text() if target.is_file() else (target / "a.txt").read_text()
        assert content == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t0", "t1"]


def _write_directory(target, text):
    with atomic.directory(target) as staged:
        (staged / "a.txt").write_text(text)
        atomic.write_text(staged / "b.txt", text, staged=True)  # a file written atomically inside it
