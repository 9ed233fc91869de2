"""fastfair.files.atomic_path: a classifier, its state and a face bank are written whole, as plain files."""
import os

import pytest

from fastfair.files import atomic_path


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
