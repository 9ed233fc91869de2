"""fastfair.files.atomic_path: a classifier, its state and a face bank are written whole, as plain files."""
import errno
import os

import pytest

from fastfair.files import atomic_path, write_text


def test_written_file_has_a_plain_files_mode_and_a_failed_write_keeps_the_old(tmp_path):
    target = tmp_path / "clf.safetensors"
    umask = os.umask(0o022)
    try:
        with atomic_path(str(target)) as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"new")
    finally:
        os.umask(umask)
    # mkstemp makes 0600 files: a group sharing the run could not read the classifier or the bank
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(str(target)) as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors"]


def test_write_text_replaces_whole_or_not_at_all(tmp_path):
    """Reports and records (metrics.json, build.json, export.json) went through open(path, 'w'), which empties the
    old file before a write that may fail (a full disk; here text that cannot be encoded)."""
    target = tmp_path / "metrics.json"
    write_text(target, '{"bias": 0.5}')
    with pytest.raises(UnicodeEncodeError):
        write_text(target, '{"bias": "\ud800"}')
    assert target.read_text() == '{"bias": 0.5}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_state_dicts_are_unwrapped_from_their_containers(tmp_path):
    """{'state_dict': ...} and {'model': ...} checkpoints, and DataParallel's 'module.' prefix, read as the bare
    state dict."""
    import torch

    from fastfair.files import load_state_dict

    weights = {"conv.weight": torch.ones(2, 2), "fc.bias": torch.zeros(3)}
    for name, saved in (("model.pt", {"model": weights, "epoch": 3}),
                        ("wrapped.pth", {"state_dict": {f"module.{k}": v for k, v in weights.items()}}),
                        ("bare.bin", weights)):
        torch.save(saved, tmp_path / name)
        loaded = load_state_dict(str(tmp_path / name))
        assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights), name


def test_the_bytes_are_on_disk_before_the_rename_publishes_them(tmp_path, monkeypatch):
    """A crash right after the rename must leave the old file or the whole new one: the temporary file is fsynced
    before os.replace."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(handle):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{handle}"))))
        fsync(handle)

    def recorded_replace(source, target):
        events.append(("replace", os.path.realpath(source)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    with atomic_path(str(tmp_path / "bank.pt")) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(b"bank")
        written = os.path.realpath(temporary)
    assert events == [("fsync", written), ("replace", written)]


@pytest.mark.parametrize("code, raised", [(errno.EINVAL, False), (errno.ENOTSUP, False), (errno.EIO, True)])
def test_a_folder_sync_ignores_only_filesystems_that_cannot_sync_folders(tmp_path, monkeypatch, code, raised):
    """fsync_dir: a network or FUSE mount that refuses to sync a folder has nothing more to offer; a disk error
    (EIO) is not hidden, or a checkpoint would count as saved that may not be."""
    from fastfair.files import fsync_dir

    def failing(handle):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing)
    if raised:
        with pytest.raises(OSError) as error:
            fsync_dir(tmp_path)
        assert error.value.errno == code
    else:
        fsync_dir(tmp_path)


@pytest.mark.parametrize("name, content", [("foreign.pt", b"\xff\xd8 a JPEG renamed"),
                                           ("cut.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{")])
def test_a_weights_file_that_cannot_be_read_is_a_value_error_naming_it(tmp_path, name, content):
    """Every loader of user weight files (classifiers, the face embedder, --init) reads through load_state_dict: a
    foreign or cut-short file is one named error, not the unpickler's or safetensors' traceback."""
    from fastfair.files import load_state_dict

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: not a weights file this can read \(.safetensors, or a torch "
                                         r"file of tensors\): \w+"):
        load_state_dict(str(tmp_path / name))
