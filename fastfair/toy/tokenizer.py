"""A CLIP byte-level BPE tokenizer built from the toy vocabulary, so nothing is downloaded.

Vocabulary: CLIP's 512 base symbols (the 256 byte characters, alone and with the end-of-word
marker ``</w>``), a chain of merges per toy word (``d o`` -> ``do``, ``do c`` -> ``doc``, ... ->
``doctor</w>``) so each toy word is one token, and the start/end tokens. Any other text still
tokenizes (into characters), as with CLIP. Saved with ``vocab.json`` + ``merges.txt`` (read by the
slow ``CLIPTokenizer`` of older transformers) and the fast tokenizer's files.
"""
import os
import re
import tempfile
from typing import Dict, Iterable, List, Tuple

from tokenizers import pre_tokenizers

from fastfair.pipeline_folder import write_vocab_and_merges

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 32  # toy prompts with 5 prefix tokens stay well inside; shorter is faster


def words_of(texts: Iterable[str]) -> List[str]:
    """The distinct lowercase words (letter runs) of texts, in order of appearance."""
    seen = {}
    for text in texts:
        for word in re.findall(r"[a-z]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def _bpe(vocab: Dict[str, int], merges: List[Tuple[str, str]]):
    from tokenizers.models import BPE

    return BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)


def vocabulary_and_merges(words: Iterable[str]) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """CLIP-style vocab {token: id} and merge rules (left, right) making every word a single token.

    Each word gets a left-to-right merge chain; where another word's merge fires first and leaves the
    word in pieces, merges of those pieces are appended (they rank last, so no finished word changes).
    """
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    merges: Dict[Tuple[str, str], None] = {}
    words = list(words)
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.setdefault((merged, piece), None)
            merged += piece
            tokens.append(merged)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    pending = words
    while pending:  # each round joins the first two pieces of every word still in pieces
        model, still_split = _bpe(vocab, list(merges)), []
        for word in pending:
            pieces = [token.value for token in model.tokenize(word)]
            if len(pieces) > 1:
                merges.setdefault((pieces[0], pieces[1]), None)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
                still_split.append(word)
        pending = still_split
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    return vocab, list(merges)


def build_tokenizer(texts: Iterable[str]):
    """A CLIP tokenizer (tokenizers-backed) whose vocabulary holds every word of texts as one token."""
    import transformers

    vocab, merges = vocabulary_and_merges(words_of(texts))
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)
    with tempfile.TemporaryDirectory() as folder:  # transformers 4 builds it from vocab.json and merges.txt
        write_vocab_and_merges(folder, vocab, merges)
        return transformers.CLIPTokenizerFast(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                              model_max_length=MODEL_MAX_LENGTH)
