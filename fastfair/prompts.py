"""Prompt sets shipped with fastfair (seed 0120, 0134) and a resumable mixture sampler.

Shipped sets (``fastfair/data/prompts/<name>_<split>.txt``, one item per line, train/test disjoint):

| name                 | train | test | a line is                          |
|----------------------|-------|------|------------------------------------|
| `occupations`        | 1062  | 50   | an occupation, put in OCCUPATION_TEMPLATE |
| `sports`             | 250   | 50   | a sport, put in SPORT_TEMPLATE     |
| `styled_occupations` | 150   | 19   | a full prompt (occupation with style and context) |
| `descriptors`        | 40    | 10   | a full prompt describing a person  |

The seed trains on 1000 occupations and tests on 50 (0120); its lists do not ship with it, so these are authored:
the test split is the seed's size, the training split is 1062 (a file of your own, one occupation per line:
``data.sets.<name>.file``).
"""
import bisect
import itertools
import re
import string
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PROMPT_DIR = Path(__file__).parent / "data" / "prompts"
SPLITS = ("train", "test")
OCCUPATION_TEMPLATE = "a photo of the face of a {occupation}, a person"
SPORT_TEMPLATE = "a person playing {sport}"
SET_TEMPLATES: Dict[str, Optional[str]] = {  # None: the lines are full prompts
    "occupations": OCCUPATION_TEMPLATE,
    "sports": SPORT_TEMPLATE,
    "styled_occupations": None,
    "descriptors": None,
}

# Letters whose spoken name starts with a vowel sound, for acronyms read letter by letter ("an FBI agent").
_AN_LETTERS = set("AEFHILMNORSX")
# Vowel letter but consonant sound ("a urologist", "a union organizer") and the reverse ("an hour").
_A_PREFIXES = ("uni", "use", "usu", "uro", "uti", "ure", "eu", "one", "once")
_AN_PREFIXES = ("hour", "honest", "honor", "heir")
_ARTICLE_AT_END = re.compile(r"(^|\s)(a|an)(?= $)", re.IGNORECASE)


def list_prompt_sets() -> List[str]:
    return list(SET_TEMPLATES)


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase's first word, by sound: 'an electrician', 'a urologist', 'an IT manager'."""
    word = phrase.split()[0]
    if len(word) > 1 and word.isupper():
        return "an" if word[0] in _AN_LETTERS else "a"
    word = word.lower()
    if word.startswith(_AN_PREFIXES):
        return "an"
    if word.startswith(_A_PREFIXES):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


def template_field(template: str) -> str:
    """The name of the template's one replacement field; ValueError unless there is exactly one, plain."""
    fields = [part for part in string.Formatter().parse(template) if part[1] is not None]
    if len(fields) != 1 or not fields[0][1] or fields[0][2] or fields[0][3]:
        raise ValueError(f"template {template!r} must hold exactly one plain named field, e.g. '{{occupation}}'")
    return fields[0][1]


def fill_template(template: str, item: str) -> str:
    """The template with its field replaced by item; an 'a'/'an' just before the field agrees with item."""
    template_field(template)
    pieces = []
    for literal, name, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if name is not None:
            pieces = [_ARTICLE_AT_END.sub(lambda m: m[1] + _like(m[2], indefinite_article(item)), "".join(pieces))]
            pieces.append(item)
    return "".join(pieces)


def _like(original: str, word: str) -> str:
    return word.capitalize() if original[0].isupper() else word


def read_lines(path) -> List[str]:
    """The non-blank lines of a text file, stripped, '#' lines skipped; ValueError on a repeated line."""
    lines, seen = [], {}
    # utf-8-sig: a byte-order mark (Windows editors write one) would stick to the first line, hiding a '#'
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() in seen:
            raise ValueError(f"{path}:{number}: {line!r} repeats line {seen[line.lower()]} (case-insensitive)")
        seen[line.lower()] = number
        lines.append(line)
    return lines


def load_prompt_file(path, template: Optional[str] = None) -> List[str]:
    """Prompts from a text file: each line put in template, or taken as is when template is None."""
    lines = read_lines(path)
    return [fill_template(template, line) for line in lines] if template else lines


def load_prompt_set(name: str, split: str = "train", template: Optional[str] = None) -> List[str]:
    """Full prompts of a shipped set; template (one field) replaces the set's own, e.g. to add a style."""
    if name not in SET_TEMPLATES:
        raise ValueError(f"unknown prompt set {name!r}: use one of {', '.join(SET_TEMPLATES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return load_prompt_file(PROMPT_DIR / f"{name}_{split}.txt", template or SET_TEMPLATES[name])


class PromptMixture:
    """Draws (set name, prompt) pairs from weighted prompt sets; its state resumes the sequence exactly.

    Draw n picks set s with probability weights[s] / sum(weights); set s then gives its next prompt in
    a random order that is reshuffled at every pass (each prompt once per pass). All randomness is a pure
    function of (seed, counters), so `state_dict` is a few integers and every rank with the same seed
    draws the same prompts.
    """

    def __init__(self, sets: Mapping[str, Sequence[str]], weights: Mapping[str, float], seed: int = 0):
        if set(sets) != set(weights):
            raise ValueError(f"weights must name the same sets as sets: {sorted(weights)} vs {sorted(sets)}")
        if any(not np.isfinite(weight) or weight < 0 for weight in weights.values()):
            raise ValueError(f"weights must be finite and >= 0, got {dict(weights)}")
        self.names = [name for name in sets if weights[name] > 0]
        if not self.names:
            raise ValueError("at least one prompt set needs a weight > 0")
        empty = [name for name in self.names if not sets[name]]
        if empty:
            raise ValueError(f"prompt sets with weight > 0 but no prompts: {empty}")
        self.sets = {name: list(sets[name]) for name in self.names}
        self.seed = int(seed)
        total = sum(weights[name] for name in self.names)
        self._cumulative = [c / total for c in itertools.accumulate(weights[name] for name in self.names)]
        self.draws = 0
        self.taken = {name: 0 for name in self.names}
        self._orders: Dict[int, Tuple[int, np.ndarray]] = {}

    def _order(self, set_index: int, epoch: int) -> np.ndarray:
        """The shuffled order of a set in one pass (cached for the current pass only)."""
        cached_epoch, order = self._orders.get(set_index, (None, None))
        if cached_epoch != epoch:
            size = len(self.sets[self.names[set_index]])
            order = np.random.default_rng([self.seed, 1, set_index, epoch]).permutation(size)
            self._orders[set_index] = (epoch, order)
        return order

    def draw(self) -> Tuple[str, str]:
        """The next (set name, prompt)."""
        u = np.random.default_rng([self.seed, 0, self.draws]).random()
        set_index = min(bisect.bisect_right(self._cumulative, u), len(self.names) - 1)
        name = self.names[set_index]
        epoch, position = divmod(self.taken[name], len(self.sets[name]))
        self.draws += 1
        self.taken[name] += 1
        return name, self.sets[name][self._order(set_index, epoch)[position]]

    def __iter__(self):
        while True:
            yield self.draw()

    def state_dict(self) -> dict:
        # "prompts": a CRC-32 of each set's prompts, so a resume notices a prompt file (or template) that changed
        # at the same size; a state saved before it existed skips that check
        return {"seed": self.seed, "draws": self.draws, "taken": dict(self.taken),
                "sizes": {name: len(prompts) for name, prompts in self.sets.items()},
                "prompts": {name: zlib.crc32("\n".join(prompts).encode("utf-8")) for name, prompts in self.sets.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a mixture with the same seed, sets and weights."""
        mine = self.state_dict()
        if state["seed"] != self.seed or state["sizes"] != mine["sizes"]:
            raise ValueError(f"prompt mixture state is for seed {state['seed']} and set sizes {state['sizes']}, "
                             f"this mixture has seed {self.seed} and sizes {mine['sizes']}")
        changed = [name for name, crc in state.get("prompts", {}).items() if mine["prompts"].get(name) != crc]
        if changed:
            raise ValueError(f"prompt set(s) {changed}: the prompts differ from those the checkpoint trained on (a "
                             f"changed file or template: data.sets.{changed[0]}); restore them or train a new run")
        self.draws = int(state["draws"])
        self.taken = {name: int(count) for name, count in state["taken"].items()}


def _refuse_whole_prompts(path, name: str, template: str) -> None:
    """A file under a shipped set's name holds that set's items; one whose lines already hold the template's
    words (whole prompts, as such a file was read before 2026-11-30) is refused rather than wrapped twice."""
    words = max((literal.strip(" ,.") for literal, *_ in string.Formatter().parse(template)), key=len)
    for number, line in enumerate(read_lines(path), start=1):
        if words and words.lower() in line.lower():
            field = template_field(template)
            raise ValueError(f"data.sets.{name}.file {path}: line {number} ({line!r}) reads like a whole prompt, "
                             f"but under the name {name} each line is put in {template!r}; for whole prompts set "
                             f"data.sets.{name}.template='{{{field}}}' (or give the set another name)")


def build_prompt_mixture(data, seed: int) -> PromptMixture:
    """The mixture a `fastfair.config.DataConfig` describes."""
    sets, weights = {}, {}
    for name, spec in data.sets.items():
        if spec.factory:
            from fastfair.hooks import load_callable

            sets[name] = list(load_callable(spec.factory, f"data.sets.{name}.factory")(data.split))
        elif spec.file:  # under a shipped set's name its lines are that set's items (occupations), in its template
            template = spec.template or SET_TEMPLATES.get(name)
            if template and not spec.template:
                _refuse_whole_prompts(spec.file, name, template)
            sets[name] = load_prompt_file(spec.file, template)
        else:
            sets[name] = load_prompt_set(name, data.split, spec.template)
        weights[name] = spec.weight
    return PromptMixture(sets, weights, seed)
