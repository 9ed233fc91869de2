"""Local weight files in and out: state dicts from .safetensors or torch pickles, atomic writes.

Atomic: write to a temporary file in the same folder, then ``os.replace`` it over the target, so a
kill during a save leaves the previous file intact.
"""
import errno
import os
import tempfile
from contextlib import contextmanager
from typing import Dict, Optional

import torch


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``.pt``/``.pth``/``.bin``, loaded weights-only); a file
    neither can read is a ValueError naming it.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and DataParallel's ``module.`` prefix
    (the public SFNet checkpoint was saved from ``nn.DataParallel``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's unpickler and safetensors raise their own types for a foreign or cut file
        raise ValueError(f"{path}: not a weights file this can read (.safetensors, or a torch file of tensors): "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def plain_mode(*paths) -> None:
    """Give files a plain file's mode, 0666 less the umask: mkstemp and safetensors (0.8) write 0600, which keeps a
    shared group from reading a run's checkpoints, exports or banks."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        try:
            os.chmod(path, 0o666 & ~umask)
        except OSError:  # a filesystem without modes (vfat, some network mounts): its files are as it makes them
            pass


# flock's errors on a filesystem that does not lock files (Lustre without -o flock, NFS without its lock daemon)
NO_FILE_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def fsync_dir(folder) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk; a filesystem that cannot sync a folder
    (some network and FUSE mounts refuse it) has nothing more to offer."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def fsync_file(path) -> None:
    """Flush a written file's bytes to disk (before a rename publishes it)."""
    with open(path, "rb") as written:
        os.fsync(written.fileno())


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, with a plain file's
    mode (0666 less the umask: mkstemp's private 0600 would keep the file from a shared group) and its bytes on
    disk first (a crash right after the rename leaves the old file or the whole new one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(handle)
    try:
        yield temporary
        plain_mode(temporary)
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text(path, text: str) -> None:
    """Write text (UTF-8) to path atomically (``atomic_path``): a failed write (a full disk) leaves the old file."""
    with atomic_path(str(path)) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None):
    """Atomically write tensors (made contiguous, on CPU) with string metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The string metadata of a safetensors file (empty dict when none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except SafetensorError as error:  # a torch pickle named .safetensors, or a cut-off file
        raise ValueError(f"{path}: not a safetensors file ({error}); a torch file (.pt/.pth/.bin) needs that "
                         "suffix") from None
