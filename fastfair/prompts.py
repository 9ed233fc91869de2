"""Prompt sets shipped with fastfair (seed 0120, 0134) and a resumable mixture sampler.

Shipped sets (``fastfair/data/prompts/<name>_<split>.txt``, one item per line, train/test disjoint: no test
occupation or sport is named, whole or through a synonym, in any set's training prompts; tests/test_prompts.py):

| name                 | train | test | a line is                          |
|----------------------|-------|------|------------------------------------|
| `occupations`        | 1008  | 50   | an occupation, put in OCCUPATION_TEMPLATE |
| `sports`             | 250   | 50   | a sport, put in SPORT_TEMPLATE     |
| `styled_occupations` | 150   | 19   | a full prompt (occupation with style and context) |
| `descriptors`        | 40    | 10   | a full prompt describing a person  |

The seed trains on 1000 occupations and tests on 50 (0120); its lists do not ship with it, so these are authored:
the test split is the seed's size, the training split is 1008 (a file of your own, one occupation per line:
``data.sets.<name>.file``).
"""
import bisect
import itertools
import math
import re
import string
import unicodedata
import zlib
from collections.abc import Sequence as SequenceABC
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
# The 'an' prefixes are tried first: "an uninsured driver", "an unidentified caller" but "a uniformed officer".
_A_PREFIXES = ("uni", "use", "usu", "uro", "uti", "ure", "eu", "one", "once")
_AN_PREFIXES = ("hour", "honest", "honor", "heir", "unin", "unimp", "uniden")
_ARTICLE_AT_END = re.compile(r"(^|\s)(a|an)(?= $)", re.IGNORECASE)


def list_prompt_sets() -> List[str]:
    return list(SET_TEMPLATES)


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase's first word, by sound: 'an electrician', 'a urologist', 'an IT manager',
    'an X-ray technician' (a letter spelled out, before a hyphen too: 'a U-boat captain'), 'an 8-ball player'."""
    word = phrase.split()[0]
    if word[0].isdecimal():  # as read aloud: "an 8-ball player", "an 11-year-old", "an 18,000-seat arena"
        written = re.match(r"[\d,]*", word)[0]
        digits = written.replace(",", "")
        # eleven, eighteen (thousand, million...), and years read in hundreds ("an 1800s farmer", "an 1812 veteran")
        year = len(written) == 4
        eleven = digits[:2] in ("11", "18") and (len(digits) % 3 == 2 or year)
        return "an" if digits[0] == "8" or eleven else "a"
    # an accented letter sounds as its base letter ("an élan coach")
    word = "".join(char for char in unicodedata.normalize("NFD", word) if not unicodedata.combining(char))
    if (len(word) > 1 and word.isupper()) or word[1:2] == "-":
        return "an" if word[0].upper() in _AN_LETTERS else "a"
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


def same_text_key(text: str) -> str:
    """What two lines that say the same compare on: Unicode NFC (a 'café' typed as e + accent is one), runs of
    whitespace as one space, case folded."""
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def _unique(numbered, where: str, unit: str) -> None:
    """ValueError on an entry that repeats an earlier one (same_text_key); numbered: (number, text) pairs."""
    seen = {}
    for number, text in numbered:
        first = seen.setdefault(same_text_key(text), number)
        if first != number:
            raise ValueError(f"{where}{number}: {text!r} repeats {unit} {first} (compared ignoring case, runs of "
                             "spaces and Unicode normal form): remove one")


def _strip(text: str) -> str:
    """text without whitespace or invisible format characters (Unicode Cf: a byte-order mark where two files were
    joined, a zero-width space) at its ends: str.strip keeps those, and a line of them alone became a prompt."""
    def blank(char: str) -> bool:
        return char.isspace() or unicodedata.category(char) == "Cf"

    start, end = 0, len(text)
    while start < end and blank(text[start]):
        start += 1
    while end > start and blank(text[end - 1]):
        end -= 1
    return text[start:end]


def _numbered_lines(path) -> List[Tuple[int, str]]:
    """(line number, stripped line (`_strip`)) of a text file's non-blank, non-'#' lines, repeats refused."""
    data = Path(path).read_bytes()
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) would stick to the first line, hiding a '#'
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:  # Python's message names neither the file nor the line
        line = data[:error.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n").count(b"\n") + 1  # as split below
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason} at byte {error.start}): save the file as "
                         "UTF-8") from None
    # lines end at \n, \r\n or \r alone, as editors number them (str.splitlines also splits at form feeds,
    # U+2028 and others, which would renumber the lines and cut a prompt in two)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    numbered = [(number, _strip(line)) for number, line in enumerate(lines, start=1)]
    numbered = [(number, line) for number, line in numbered if line and not line.startswith("#")]
    _unique(numbered, f"{path}:", "line")
    return numbered


def read_lines(path) -> List[str]:
    """The non-blank lines of a UTF-8 text file, stripped, '#' lines skipped; ValueError on a line that repeats
    another (same_text_key) or on a file that is not UTF-8, naming the file and line."""
    return [line for _, line in _numbered_lines(path)]


def _refuse_own_articles(numbered, template: str, where: str) -> None:
    """Under a template with 'a'/'an' just before its field, an item starting with an article of its own would read
    'a photo of the face of an an accountant'."""
    template_field(template)  # exactly one field, or a ValueError naming the template
    literal = next(literal for literal, field, *_ in string.Formatter().parse(template) if field is not None)
    if not _ARTICLE_AT_END.search(literal):
        return
    for number, item in numbered:
        if item.split()[0].lower() in ("a", "an", "the"):
            raise ValueError(f"{where}{number}: {item!r} has its own article, but the template {template!r} puts "
                             f"one before each item ({fill_template(template, item)!r}): drop "
                             f"{item.split()[0]!r} from the line")


def load_prompt_file(path, template: Optional[str] = None) -> List[str]:
    """Prompts from a text file: each line put in template, or taken as is when template is None."""
    numbered = _numbered_lines(path)
    if not template:
        return [line for _, line in numbered]
    _refuse_own_articles(numbered, template, f"{path}:")
    return [fill_template(template, line) for _, line in numbered]


def factory_prompts(prompts, where: str) -> List[str]:
    """A prompt-set factory's result held to a file's rules: a list (or tuple) of strings, each stripped, blank
    ones skipped, a repeat refused (same_text_key). where: how errors name the factory."""
    # a str would give one prompt per character; a set or dict has no fixed order across processes and ranks
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, SequenceABC):
        raise ValueError(f"{where} returned a {type(prompts).__name__}: return a list of prompt strings")
    wrong = [f"{index}: {prompt!r}" for index, prompt in enumerate(prompts, start=1) if not isinstance(prompt, str)]
    if wrong:
        raise ValueError(f"{where} returned prompts that are not strings (prompt {wrong[0]}): return a list of "
                         "prompt strings")
    numbered = [(number, stripped) for number, prompt in enumerate(prompts, start=1) if (stripped := _strip(prompt))]
    _unique(numbered, f"{where}: prompt ", "prompt")
    return [prompt for _, prompt in numbered]


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
        self.weights = {name: float(weights[name]) for name in self.names}
        self.seed = int(seed)
        self._arrange(self.names)
        self.draws = 0
        self.taken = {name: 0 for name in self.names}

    def _arrange(self, names: Sequence[str]) -> None:
        """Put the sets in this order: the draw and each set's shuffle depend on a set's position."""
        self.names = list(names)
        self.sets = {name: self.sets[name] for name in self.names}
        # weights over their largest: a sum of huge weights (1e308 each) would overflow to inf and send every draw
        # to the last set
        largest = max(self.weights[name] for name in self.names)
        scaled = [self.weights[name] / largest for name in self.names]
        total = math.fsum(scaled)
        self._cumulative = [c / total for c in itertools.accumulate(scaled)]
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
        # at the same size; a state saved before it existed skips that check. "order": the sets' order, which the
        # draws depend on, so a resume whose config lists the same sets in another order continues the same sequence
        return {"seed": self.seed, "draws": self.draws, "taken": dict(self.taken), "order": list(self.names),
                "sizes": {name: len(prompts) for name, prompts in self.sets.items()},
                "prompts": {name: zlib.crc32("\n".join(prompts).encode("utf-8")) for name, prompts in self.sets.items()}}

    def changed_sets(self, state: dict) -> List[str]:
        """The sets whose prompts differ from those `state` (a `state_dict()`) was saved with: another count, or the
        same count of other prompts (a state saved before the prompts' checksum was recorded: counts only)."""
        mine = self.state_dict()
        return [name for name in self.names if state["sizes"].get(name) != mine["sizes"][name]
                or state.get("prompts", {}).get(name, mine["prompts"][name]) != mine["prompts"][name]]

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a mixture with the same seed, sets and weights; the same sets listed in
        another order (a config's data.sets reordered) are put back in the state's order, so the sequence goes on."""
        mine = self.state_dict()
        if state["seed"] != self.seed or set(state["sizes"]) != set(mine["sizes"]):
            raise ValueError(f"prompt mixture state is for seed {state['seed']} and sets {sorted(state['sizes'])}, "
                             f"this mixture has seed {self.seed} and sets {sorted(mine['sizes'])}")
        changed = self.changed_sets(state)
        if changed:
            then, now = state["sizes"][changed[0]], mine["sizes"][changed[0]]
            raise ValueError(f"prompt set(s) {changed}: the prompts differ from those the checkpoint trained on "
                             f"(data.sets.{changed[0]}: {then} prompts then, {now} now; a changed file, template or "
                             "shipped list); restore them or train a new run")
        order = state.get("order")  # a state saved before it was recorded: the sets' current order
        if order is not None and sorted(order) == sorted(self.names) and list(order) != self.names:
            self._arrange(order)
        self.draws = int(state["draws"])
        self.taken = {name: int(count) for name, count in state["taken"].items()}


def _refuse_whole_prompts(path, name: str, template: str) -> None:
    """A file under a shipped set's name holds that set's items; one whose lines already hold the template's
    words (whole prompts, as such a file was read before 2026-11-30) is refused rather than wrapped twice."""
    words = max((literal.strip(" ,.") for literal, *_ in string.Formatter().parse(template)), key=len)
    for number, line in _numbered_lines(path):
        if words and words.lower() in line.lower():
            field = template_field(template)
            raise ValueError(f"data.sets.{name}.file {path}: line {number} ({line!r}) reads like a whole prompt, "
                             f"but under the name {name} each line is put in {template!r}; for whole prompts set "
                             f"data.sets.{name}.template='{{{field}}}' (or give the set another name)")


def build_prompt_mixture(data, seed: int) -> PromptMixture:
    """The mixture a `fastfair.config.DataConfig` describes."""
    sets, weights = {}, {}
    for name, spec in data.sets.items():
        if spec.weight == 0:  # left out: its prompts are not read (a file it names need not exist)
            continue
        if spec.factory:
            from fastfair.hooks import call_hook

            where = f"data.sets.{name}.factory={spec.factory}"
            sets[name] = factory_prompts(call_hook(spec.factory, f"data.sets.{name}.factory", (data.split,),
                                                   "factory(split) -> a list of prompts"), where)
        elif spec.file:  # under a shipped set's name its lines are that set's items (occupations), in its template
            template = spec.template or SET_TEMPLATES.get(name)
            if template and not spec.template:
                _refuse_whole_prompts(spec.file, name, template)
            sets[name] = load_prompt_file(spec.file, template)
        else:
            sets[name] = load_prompt_set(name, data.split, spec.template)
        if not sets[name]:  # the mixture would name the set only
            source = (f".factory={spec.factory} returned" if spec.factory else f".file={spec.file} holds"
                      if spec.file else f": the shipped {data.split} list holds")
            raise ValueError(f"data.sets.{name}{source} no prompt; give it prompts or weight 0")
        weights[name] = spec.weight
    return PromptMixture(sets, weights, seed)
