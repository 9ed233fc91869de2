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
