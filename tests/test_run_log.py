"""fastfair.run_log: a run's numbers in metrics.jsonl whatever is installed, each step once across a resume."""
import builtins
import json

import numpy as np
import pytest

from fastfair.run_log import METRICS_FILE, RunLog, image_file


def _steps(folder):
    return [json.loads(line)["step"] for line in (folder / METRICS_FILE).read_text().splitlines()]


def test_a_resume_drops_the_steps_logged_past_its_checkpoint(tmp_path, monkeypatch):
    made = []

    class Writer:  # records how tensorboard was asked to open its folder
        def __init__(self, folder, purge_step=None):
            made.append((folder, purge_step))

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", Writer)
    log = RunLog(tmp_path, None, 0)
    for step in (1, 2, 3):  # the run is interrupted after logging step 3; its checkpoint is at step 2
        log.scalars(step, {"loss": 0.5 * step})
    log.close()
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"step": 4, "lo')  # a line cut off by the crash
    log = RunLog(tmp_path, str(tmp_path / "tb"), 2)
    log.scalars(3, {"loss": 1.25})
    log.close()
    assert _steps(tmp_path) == [1, 2, 3]
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1]) == {"step": 3, "loss": 1.25}
    # tensorboard drops what the interrupted run logged past step 2 (it had kept both step 3's)
    assert made == [(str(tmp_path / "tensorboard"), 1), (str(tmp_path / "tb"), 3)]


def test_a_resume_deletes_the_image_grids_past_its_checkpoint_and_a_skipped_steps_nan_is_null(tmp_path):
    for step in (2, 4, 6):  # the interrupted run's grids; its checkpoint is at step 4
        image_file(tmp_path, step).parent.mkdir(exist_ok=True)
        image_file(tmp_path, step).write_bytes(b"png")
    (tmp_path / "images" / "notes.png").write_bytes(b"the user's")
    log = RunLog(tmp_path, str(tmp_path / "tb"), 4)
    log.scalars(5, {"loss": float("nan"), "skipped_steps": 1})
    log.close()
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == [
        "notes.png", "step_00000002.png", "step_00000004.png"]
    line = (tmp_path / METRICS_FILE).read_text().splitlines()[-1]
    assert "NaN" not in line and json.loads(line) == {"step": 5, "loss": None, "skipped_steps": 1.0}


def test_a_run_started_again_before_its_first_checkpoint_logs_each_step_once_in_tensorboard(tmp_path):
    """Stopped before any checkpoint, the run starts afresh: its TensorBoard curve held steps 1, 2, 1, 2, 3."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    for steps in ((1, 2), (1, 2, 3)):  # interrupted at step 2, then the same command again
        log = RunLog(tmp_path, str(tmp_path / "tb"), 0)
        for step in steps:
            log.scalars(step, {"loss": float(step)})
        log.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert _steps(tmp_path) == [1, 2, 3]


def test_without_tensorboard_the_numbers_still_reach_metrics_jsonl(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.warns(UserWarning, match="tensorboard is not installed: the run's numbers go to metrics.jsonl"):
        log = RunLog(tmp_path, None, 0)
    log.scalars(1, {"loss": 0.25, "img/clip": 0.5})
    log.image(1, "grid", np.zeros((2, 2, 3), dtype=np.uint8))  # nothing to add it to: no error
    log.close()
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == {"step": 1, "loss": 0.25, "img/clip": 0.5}


def test_a_failed_write_names_the_file_and_the_way_on(tmp_path, monkeypatch):
    """A full disk while logging gave a bare '[Errno 28] No space left on device': now the file and the way on
    (metrics.jsonl, or the tensorboard folder, whose writer thread's error surfaces at the next call)."""
    import errno

    class Full:
        def __init__(self, *args, **kwargs):
            pass

        def write(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        add_scalar = write

        def close(self):
            pass

    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", Full)
    log = RunLog(tmp_path, str(tmp_path / "tb"), 0)
    with pytest.raises(OSError, match=r"tb could not be written \(No space left on device\): free space \(or fix the "
                                      r"folder\), then resume=auto continues from the last checkpoint"):
        log.scalars(1, {"loss": 0.5})  # metrics.jsonl has it; tensorboard's writer fails
    assert _steps(tmp_path) == [1]
    log.writer = None
    log.file.close()
    log.file = Full()
    with pytest.raises(OSError, match=rf"{tmp_path}/{METRICS_FILE} could not be written \(No space left on device\): "
                                      r".*resume=auto continues from the last checkpoint"):
        log.scalars(2, {"loss": 0.25})


class _NoWriter:
    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, *args):
        pass

    def close(self):
        pass


def test_a_last_line_cut_before_its_newline_is_dropped_not_run_into(tmp_path, monkeypatch):
    """A crash can cut the last line just before its newline, leaving a whole JSON object: dropped (its step was not
    saved whole), else the resumed run's first line would be appended to it on the same line."""
    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", _NoWriter)  # tensorboard is not what this is about
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')
    log = RunLog(tmp_path, None, 2)
    log.scalars(3, {"loss": 0.25})
    log.close()
    assert _steps(tmp_path) == [1, 3]


def test_the_resume_truncation_is_atomic(tmp_path, monkeypatch):
    """The rewrite that drops the steps past the checkpoint goes to a temporary file first: a kill (here: a full disk)
    in the middle of it leaves metrics.jsonl as it was, never half written."""
    import errno
    import pathlib

    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", _NoWriter)
    before = "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3, 4))
    (tmp_path / METRICS_FILE).write_text(before)

    def cut_short(self, data, encoding=None, **kwargs):
        with open(self, "w", encoding=encoding) as handle:
            handle.write(data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", cut_short)
    with pytest.raises(OSError, match="No space left on device"):
        RunLog(tmp_path, None, 2)
    assert (tmp_path / METRICS_FILE).read_text() == before
    assert [path.name for path in tmp_path.iterdir()] == [METRICS_FILE]  # no temporary file left behind
