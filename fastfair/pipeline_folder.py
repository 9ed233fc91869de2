"""Writing a Stable Diffusion pipeline folder that every transformers major reads the same.

transformers 5 writes CLIPTextModel's weights without their ``text_model.`` prefix, and a CLIP tokenizer as
``tokenizer.json`` alone; transformers 4 then leaves the whole text encoder at its random init (a warning only)
and cannot build the tokenizer without ``vocab.json`` and ``merges.txt``. ``save_pipeline_folder`` writes the
layout both read: every key under ``text_model.``, and the vocabulary files beside the fast tokenizer's.
"""
import json
import os
from typing import Dict, Iterable


def write_vocab_and_merges(folder: str, vocab: Dict[str, int], merges: Iterable) -> None:
    """vocab.json and merges.txt of a byte-level BPE (what the slow CLIPTokenizer reads)."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(dict(sorted(vocab.items(), key=lambda item: item[1])), handle, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(" ".join(m) + "\n" if not isinstance(m, str) else m + "\n"
                                                for m in merges))


def save_tokenizer(tokenizer, folder: str) -> None:
    """save_pretrained, plus vocab.json and merges.txt where it wrote none (a fast tokenizer under transformers 5)."""
    tokenizer.save_pretrained(folder)
    if all(os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "merges.txt")):
        return
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    write_vocab_and_merges(folder, tokenizer.get_vocab(), merges)


def prefix_text_encoder_keys(path: str) -> None:
    """Rewrite a CLIPTextModel weights file with its keys under ``text_model.``, the layout every transformers
    reads: 5.x writes them unprefixed, and 4.x then leaves the whole encoder at its random init with a warning."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    if not all(name.startswith("text_model.") for name in weights):
        save_file({"text_model." + name: tensor for name, tensor in weights.items()}, path, metadata={"format": "pt"})


def save_pipeline_folder(pipeline, folder: str) -> None:
    """The diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) in safetensors,
    readable under transformers 4 and 5 alike."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    if getattr(pipeline, "tokenizer", None) is not None:
        save_tokenizer(pipeline.tokenizer, os.path.join(folder, "tokenizer"))
    weights = os.path.join(folder, "text_encoder", "model.safetensors")
    if os.path.isfile(weights):
        prefix_text_encoder_keys(weights)
