"""The bank of real-face embeddings D_F (seed Eq. 8) and its nearest-neighbour search.

File format (safetensors): tensor ``embeddings`` [M, D] (float16 or float32, unit rows) and metadata
``files`` (JSON list of the M source file names, relative to the image folder), ``format``
(``fastfair-face-bank-1``) and free-form build settings (python -m fastfair.faces.build_bank records a JSON
mapping: ``embedder``, a checkpoint path or ``module:function``, ``flip``, ...).
"""
import filecmp
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fastfair.files import save_safetensors
from fastfair.optional import MissingPackage

BANK_FORMAT = "fastfair-face-bank-1"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class FaceBank:
    """Unit embeddings [M, D] (kept float32 for the search) and their source file names.

    nearest(queries) runs without grad: by chunked matrix products on the queries' device, or with
    ``use_faiss=True`` by faiss's exact inner-product index on the CPU (same neighbours; an option for a CPU
    search of a very large bank, never chosen by itself: on a GPU the matrix products are the faster).
    """

    def __init__(self, embeddings: torch.Tensor, files: Optional[List[str]] = None,
                 info: Optional[Dict[str, str]] = None, use_faiss: bool = False):
        if embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"bank embeddings must be [M, D] with M >= 1, got {tuple(embeddings.shape)}")
        files = list(files) if files is not None else [str(i) for i in range(embeddings.shape[0])]
        if len(files) != embeddings.shape[0]:
            raise ValueError(f"{len(files)} file names for {embeddings.shape[0]} bank embeddings")
        self.embeddings = F.normalize(embeddings.detach().float(), dim=-1)
        self.files, self.info = files, dict(info or {})
        if use_faiss and not faiss_available():
            raise MissingPackage("use_faiss=True but faiss is not importable: pip install faiss-cpu (or faiss-gpu)")
        self.use_faiss = bool(use_faiss)
        self._index = None

    def __len__(self):
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def settings(self) -> dict:
        """build_bank's recorded settings ({} for settings that are not a JSON mapping: a bank built otherwise)."""
        return json_mapping(self.info.get("settings") or "{}") or {}

    @property
    def flip(self) -> Optional[bool]:
        """Whether its embeddings add the mirrored face's (build_bank's recorded settings; None: not recorded)."""
        flip = self.settings.get("flip")
        return flip if isinstance(flip, bool) else None

    @property
    def embedder(self) -> Optional[str]:
        """The embedder build_bank recorded (--embedder's checkpoint path or --embedder-factory's
        'module:function'); None: not recorded."""
        embedder = self.settings.get("embedder")
        return embedder if isinstance(embedder, str) and embedder else None

    def check_embedder(self, embedder: Callable, where: str, embedding_fn: Optional[str] = None,
                       embedding: Optional[str] = None) -> None:
        """Raise ValueError unless ``embedder`` (configured as faces.embedding_fn or faces.embedding) embeds as
        this bank (the file ``where``) was built: the same dimension, probed with one blank face, and, where the
        bank records its embedder, the same one (`same_embedder`). Otherwise the face loss would fail only at its
        first step, or, at the same dimension, pull faces toward embeddings of another model."""
        configured = f"faces.embedding_fn={embedding_fn}" if embedding_fn else f"faces.embedding={embedding}"
        recorded = self.embedder
        fix = ("rebuild the bank with this embedder (python -m fastfair.faces.build_bank --images DIR "
               "--out NEW_BANK.safetensors --embedder CHECKPOINT or --embedder-factory module:function) and set "
               "faces.bank to it")
        if recorded and is_function_spec(recorded):
            fix += f", or set faces.embedding_fn={recorded}"
        elif recorded:
            file = self.settings.get("embedder_file")
            path = file.get("path") if isinstance(file, dict) and file.get("path") else recorded  # absolute
            fix += f", or set faces.embedding={path} (and no faces.embedding_fn)"
        size = getattr(embedder, "input_size", 112)
        with torch.no_grad():
            probe = embedder(torch.zeros(1, 3, size, size, device=self.embeddings.device))
        shape = tuple(probe.shape) if torch.is_tensor(probe) else type(probe).__name__
        if not torch.is_tensor(probe) or probe.dim() != 2 or probe.shape[1] != self.dim:
            raise ValueError(f"the faces.bank {where} holds {self.dim}-dimensional embeddings (built with "
                             f"{recorded or 'an embedder it does not record'}), but {configured} embeds a face as "
                             f"{shape}, not [1, {self.dim}]: {fix}")
        if recorded and not same_embedder(recorded, embedding_fn, embedding, self.settings.get("embedder_file")):
            raise ValueError(f"the faces.bank {where} was built with the embedder {recorded}, not {configured}: "
                             f"the face loss would compare faces embedded by two models; {fix}")

    def to(self, device) -> "FaceBank":
        self.embeddings = self.embeddings.to(device)
        return self

    @classmethod
    def load(cls, path: str, device="cpu", use_faiss: bool = False) -> "FaceBank":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt", device=str(device)) as handle:
                metadata = dict(handle.metadata() or {})
                if "embeddings" not in handle.keys():
                    raise ValueError(f"{path} is not a face bank: it has no 'embeddings' tensor")
                embeddings = handle.get_tensor("embeddings")
        except SafetensorError as error:  # e.g. the public code's pickled face features
            raise ValueError(f"{path}: not a safetensors face bank ({error}); build one from a folder of face "
                             "images with python -m fastfair.faces.build_bank") from None
        files = json.loads(metadata.pop("files", "null"))
        return cls(embeddings, files, metadata, use_faiss=use_faiss)

    def save(self, path: str, dtype=torch.float32):
        metadata = {**self.info, "format": BANK_FORMAT, "files": json.dumps(self.files)}
        save_safetensors({"embeddings": self.embeddings.to(dtype)}, path, metadata)

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor, chunk_size: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries [N, D] -> (indices [N] long, cosine similarities [N] float32) of each nearest bank row; a query
        holding a NaN or infinity (a diverged step's face) has none: similarity NaN, index 0 (a placeholder, so
        `neighbours` stays a plain gather; its face loss is NaN anyway, and the step skipped)."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [N, {self.dim}], got {tuple(queries.shape)}")
        finite = torch.isfinite(queries.detach()).all(dim=1)
        queries = F.normalize(queries.detach().float(), dim=-1)
        index, best = self._nearest_faiss(queries) if self.use_faiss else self._nearest_torch(queries, chunk_size)
        nan = torch.full_like(best, float("nan"))
        return torch.where(finite, index, torch.zeros_like(index)), torch.where(finite, best, nan)

    def _nearest_torch(self, queries, chunk_size):
        self.embeddings = bank = self.embeddings.to(queries.device)  # moved once, not on every call
        best = torch.full((queries.shape[0],), -float("inf"), device=queries.device)
        index = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
        for start in range(0, len(self), chunk_size):
            # in float32 even under training's autocast, which would run the matmul in half precision (bf16: 2.7 %
            # of the nearest faces were others than the exact search's)
            with torch.autocast(queries.device.type, enabled=False):
                similarity, where = (queries @ bank[start:start + chunk_size].T).max(dim=1)
            better = similarity > best
            best = torch.where(better, similarity, best)
            index = torch.where(better, where + start, index)
        return index, best

    def _nearest_faiss(self, queries):
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(self.embeddings.cpu().numpy())
        similarity, index = self._index.search(queries.cpu().numpy(), 1)
        return (torch.from_numpy(index[:, 0]).long().to(queries.device),
                torch.from_numpy(similarity[:, 0]).to(queries.device))

    def neighbours(self, queries: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """The nearest bank embedding of each query, [N, D] (no grad): the target of the face loss."""
        index, _ = self.nearest(queries, chunk_size)
        return self.embeddings.to(queries.device)[index.to(self.embeddings.device)]


def json_mapping(text: str) -> Optional[dict]:
    """The JSON mapping ``text`` holds; None for invalid JSON or another JSON value (settings written otherwise)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def is_function_spec(embedder: str) -> bool:
    """Whether a recorded embedder is a 'package.module:function' (--embedder-factory), not a checkpoint path."""
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", embedder)) and not os.path.exists(embedder)


def same_embedder(recorded: str, embedding_fn: Optional[str] = None, embedding: Optional[str] = None,
                  recorded_file: Optional[dict] = None) -> bool:
    """Whether the configured faces.embedding_fn / faces.embedding is the embedder a bank recorded.

    A 'module:function': the same string, or both import to the same function (a re-export). A checkpoint
    (recorded_file: build_bank's {path, size, mtime_ns} of it): the same file or a byte-identical copy; where the
    recorded file is not here (a bank built on another machine), the same file name (and size, when recorded).
    """
    if is_function_spec(recorded):
        if not embedding_fn:
            return False
        if embedding_fn == recorded:
            return True
        from fastfair.hooks import load_callable

        try:
            return load_callable(recorded, "embedder") is load_callable(embedding_fn, "faces.embedding_fn")
        except ValueError:  # not importable here
            return False
    if embedding_fn or not embedding or not os.path.isfile(embedding):
        return False
    recorded_file = recorded_file if isinstance(recorded_file, dict) else {}
    path = recorded_file.get("path") or recorded  # an older bank: the path as typed (maybe relative)
    if os.path.isfile(path):
        return os.path.samefile(path, embedding) or filecmp.cmp(path, embedding, shallow=False)
    size = recorded_file.get("size")
    return (os.path.basename(path) == os.path.basename(embedding)
            and (size is None or os.path.getsize(embedding) == size))
