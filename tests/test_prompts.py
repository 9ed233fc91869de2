"""fastfair.prompts: shipped set sizes and disjointness, templates, the resumable mixture sampler."""
import collections
import json
import re
import sys
import types

import pytest

from fastfair.config import DataConfig, PromptSetConfig
from fastfair.prompts import (
    OCCUPATION_TEMPLATE, PROMPT_DIR, SPORT_TEMPLATE, PromptMixture, build_prompt_mixture, factory_prompts,
    fill_template, indefinite_article, list_prompt_sets, load_prompt_file, load_prompt_set, read_lines,
    same_text_key, template_field,
)

SIZES = {  # seed 0120 and 0134: (train, test)
    "occupations": (1000, 50), "sports": (250, 50), "styled_occupations": (150, 19), "descriptors": (40, 10),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_shipped_sets_have_the_seed_sizes_and_are_disjoint(name):
    train, test = read_lines(PROMPT_DIR / f"{name}_train.txt"), read_lines(PROMPT_DIR / f"{name}_test.txt")
    min_train, n_test = SIZES[name]
    assert len(test) == n_test and (len(train) >= min_train if name == "occupations" else len(train) == min_train)
    assert not {line.lower() for line in train} & {line.lower() for line in test}
    assert len(load_prompt_set(name, "train")) == len(train) and len(load_prompt_set(name, "test")) == n_test


# a test item under another name in training is seen all the same
SYNONYMS = {"lawyer": ["attorney"], "paralegal": ["legal assistant"], "janitor": ["custodian"],
            "hairdresser": ["hairstylist"], "journalist": ["reporter", "war correspondent", "photojournalist"],
            "bartender": ["mixologist"], "real estate agent": ["real estate broker"],
            "software engineer": ["software developer"], "judge": ["magistrate"], "police officer": ["state trooper"],
            "photographer": ["photojournalist"], "veterinarian": ["veterinary surgeon"],
            # agent nouns and near-synonyms (2026-12-02): the word pattern below sees neither
            "golf": ["golfer", "footgolf"], "boxing": ["boxer"], "archery": ["archer"],
            "weightlifting": ["weightlifter", "lifting weights"], "marathon running": ["ultramarathon"],
            "kindergarten teacher": ["preschool teacher"], "professor": ["university lecturer"]}
SYNONYMS["software engineer"] += ["computer programmer"]


# words that end in a test item without being one (the compound check below would see them)
UNRELATED_COMPOUNDS = {"alchemist", "alchemists", "throwing", "researcher", "researchers"}


def test_no_test_item_is_named_in_any_training_prompt():
    """Held-out occupations and sports must stay unseen: none may appear, as a whole word or phrase (plural too),
    at the end of a compound ('kickboxing' taught 'boxing', 'biochemist' 'chemist'; 2026-12-03) or through a synonym,
    inside a training prompt of any shipped set ('pastry chef' taught 'chef'; the multi-concept config trains on all
    four sets, so 'a portrait of a librarian ...' in styled_occupations taught 'librarian')."""
    training = [(name, prompt) for name in SIZES for prompt in load_prompt_set(name, "train")]
    seen = []
    for name in ("occupations", "sports"):
        for item in read_lines(PROMPT_DIR / f"{name}_test.txt"):
            for words in [item] + SYNONYMS.get(item, []):
                pattern = re.compile(r"\b(\w*)" + re.escape(words) + r"(s|es)?\b", re.IGNORECASE)
                seen += [f"{name} test {item!r} in {where} training prompt {prompt!r}"
                         for where, prompt in training for found in pattern.finditer(prompt)
                         if not found.group(1) or found.group(0).lower() not in UNRELATED_COMPOUNDS]
    assert not seen, "\n".join(seen)


def test_no_line_repeats_and_no_blank_lines():
    for path in PROMPT_DIR.glob("*.txt"):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines == read_lines(path), path.name  # read_lines also raises on a case-insensitive repeat


def test_list_prompt_sets_names_the_shipped_files():
    assert sorted(list_prompt_sets()) == sorted(SIZES)
    assert {path.name for path in PROMPT_DIR.glob("*.txt")} == {
        f"{name}_{split}.txt" for name in SIZES for split in ("train", "test")}


def test_templated_prompts():
    assert "a photo of the face of an electrical and electronics repairer, a person" in load_prompt_set(
        "occupations", "test")  # the seed's unseen test prompt (0126)
    assert load_prompt_set("sports", "train")[0].startswith("a person playing ")
    styled = load_prompt_set("styled_occupations", "test")
    assert styled == read_lines(PROMPT_DIR / "styled_occupations_test.txt")  # full prompts, no template
    styled_tagged = load_prompt_set("styled_occupations", "test", template="{prompt}, 4k")
    assert styled_tagged == [prompt + ", 4k" for prompt in styled]


@pytest.mark.parametrize("item, article", [
    ("nurse", "a"), ("electrician", "an"), ("urologist", "a"), ("university lecturer", "a"),
    ("umpire", "an"), ("IT manager", "an"), ("UX designer", "a"), ("FBI agent", "an"), ("hourly worker", "an"),
    ("X-ray technician", "an"), ("x-ray technician", "an"), ("U-boat captain", "a"), ("T-shirt printer", "a"),
    ("e-commerce manager", "an"), ("one-man band", "a"),
    # numbers as read aloud, accented letters as their base letter, "uni" words that are "un-" + "i..."
    ("8-ball player", "an"), ("11-year-old chess player", "an"), ("18th-century reenactor", "an"),
    ("1st-grade teacher", "a"), ("100-meter sprinter", "a"), ("110-meter hurdler", "a"), ("80s DJ", "an"),
    ("11,000-seat arena usher", "an"), ("1,100-seat arena usher", "a"), ("2nd-shift nurse", "a"),
    ("1800s farmer", "an"), ("1812 veteran", "an"), ("1100s monk", "an"), ("1900s farmer", "a"),
    ("élan coach", "an"), ("Éclair baker", "an"), ("über driver", "an"), ("uninsured driver", "an"),
    ("unimpressed critic", "an"), ("unidentified caller", "an"), ("uniformed officer", "a"), ("unicyclist", "a"),
])
def test_indefinite_article(item, article):
    assert indefinite_article(item) == article
    assert fill_template(OCCUPATION_TEMPLATE, item) == f"a photo of the face of {article} {item}, a person"


def test_fill_template_keeps_other_text_and_capitals():
    assert fill_template("A {job} at work", "engineer") == "An engineer at work"
    assert fill_template("an {job}, a portrait", "baker") == "a baker, a portrait"
    assert fill_template("banana {x}", "apple") == "banana apple"  # 'a' only as a word
    assert fill_template(SPORT_TEMPLATE, "ice hockey") == "a person playing ice hockey"
    assert fill_template("{{literal}} {x}", "y") == "{literal} y"


@pytest.mark.parametrize("template", ["no field", "{a} {b}", "{}", "{a!r}", "{a:>5}"])
def test_template_field_rejects_anything_but_one_plain_field(template):
    with pytest.raises(ValueError, match="exactly one plain named field"):
        template_field(template)


def test_user_files_and_bad_arguments(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("# my jobs\nastronomer\n\n  baker \n")
    assert load_prompt_file(path) == ["astronomer", "baker"]
    assert load_prompt_file(path, OCCUPATION_TEMPLATE)[0] == "a photo of the face of an astronomer, a person"
    path.write_bytes("\ufeff# my jobs\nastronomer\n".encode())  # a byte-order mark before the comment
    assert load_prompt_file(path) == ["astronomer"]
    path.write_text("baker\nBaker\n")
    with pytest.raises(ValueError, match=r"jobs\.txt:2: 'Baker' repeats line 1"):
        read_lines(path)
    with pytest.raises(ValueError, match="unknown prompt set 'poems'"):
        load_prompt_set("poems")
    with pytest.raises(ValueError, match="split must be one of"):
        load_prompt_set("sports", "val")


def test_invisible_characters_at_line_ends_are_stripped_like_spaces(tmp_path):
    # two files joined (the second's byte-order mark mid-file), a zero-width space alone or after a word: each
    # became a prompt of its own (or a repeat that was not seen as one)
    path = tmp_path / "jobs.txt"
    path.write_bytes("astronomer\n\ufeff# more jobs\n\ufeffbaker\n\u200b\n \u2060 \nchef\u200b\n".encode())
    assert load_prompt_file(path) == ["astronomer", "baker", "chef"]
    path.write_bytes("baker\n\ufeffbaker\n".encode())
    with pytest.raises(ValueError, match=r"jobs\.txt:2: 'baker' repeats line 1"):
        read_lines(path)
    assert factory_prompts(["\u200b", "x\u200by\ufeff"], "f") == ["x\u200by"]  # inside a prompt: kept


def test_lines_end_only_at_line_breaks_as_editors_number_them(tmp_path):
    """A form feed or U+2028 inside a line stays in its prompt (str.splitlines would cut it in two and renumber
    the lines after); \r\n and a lone \r end a line."""
    path = tmp_path / "jobs.txt"
    path.write_bytes("x\u2028y\nfoo\fbar\r\nbaker\rbaker\n".encode("utf-8"))
    with pytest.raises(ValueError, match=r"jobs\.txt:4: 'baker' repeats line 3"):
        read_lines(path)
    path.write_bytes("x\u2028y\nfoo\fbar\r\nbaker\r".encode("utf-8"))
    assert read_lines(path) == ["x\u2028y", "foo\fbar", "baker"]


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_bytes("baker\ncaf\u00e9 owner\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"jobs\.txt:2: not UTF-8 text .*save the file as UTF-8"):
        load_prompt_file(path)
    path.write_bytes("baker\rnurse\r\ncaf\u00e9 owner\r".encode("latin-1"))  # lines as the reader splits them
    with pytest.raises(ValueError, match=r"jobs\.txt:3: not UTF-8 text"):
        load_prompt_file(path)


@pytest.mark.parametrize("first, again", [
    ("dental hygienist", "dental  hygienist"),  # a run of spaces
    ("dental hygienist", "dental\thygienist"),
    ("caf\u00e9 owner", "cafe\u0301 owner"),  # NFC and NFD: the same text on screen
    ("Stra\u00dfe sweeper", "STRASSE sweeper"),  # case folding, not lower()
])
def test_repeats_that_differ_only_in_spacing_case_or_unicode_form_are_refused(tmp_path, first, again):
    path = tmp_path / "jobs.txt"
    path.write_text(f"{first}\nbarista\n{again}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"jobs\.txt:3: .* repeats line 1 \(compared ignoring case, runs of spaces "
                                         r"and Unicode normal form\)"):
        read_lines(path)
    assert same_text_key(first) == same_text_key(again)


def test_items_with_their_own_article_are_refused_under_a_template_with_one(tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("# mine\nbaker\nan accountant\n")
    with pytest.raises(ValueError, match=r"jobs\.txt:3: 'an accountant' has its own article, but the template .*"
                                         r"'a photo of the face of an an accountant, a person'.*drop 'an'"):
        load_prompt_file(path, OCCUPATION_TEMPLATE)
    with pytest.raises(ValueError, match="has its own article"):
        build_prompt_mixture(DataConfig(sets={"occupations": PromptSetConfig(file=str(path))}), seed=0)
    # a template without an article before its field, or none: the article is the prompt's own
    assert load_prompt_file(path, SPORT_TEMPLATE)[1] == "a person playing an accountant"
    assert load_prompt_file(path) == ["baker", "an accountant"]


def test_a_factorys_prompts_follow_a_files_rules(monkeypatch):
    module = types.ModuleType("my_prompt_factories")
    module.text = lambda split: "a photo of a nurse"  # one prompt, not one per character
    module.unordered = lambda split: {"a nurse", "a pilot"}
    module.numbers = lambda split: ["a nurse", 3]
    module.repeats = lambda split: ["a nurse", "", "a pilot", "  A  nurse "]
    module.blanks = lambda split: [" a nurse ", "", "  ", "a pilot"]
    monkeypatch.setitem(sys.modules, "my_prompt_factories", module)

    def build(name):
        data = DataConfig(sets={"mine": PromptSetConfig(factory=f"my_prompt_factories:{name}")})
        return build_prompt_mixture(data, seed=0).sets["mine"]
    with pytest.raises(ValueError, match=r"data.sets.mine.factory=my_prompt_factories:text returned a str: return a "
                                         r"list of prompt strings"):
        build("text")
    with pytest.raises(ValueError, match=r"returned a set: return a list"):
        build("unordered")
    with pytest.raises(ValueError, match=r"not strings \(prompt 2: 3\)"):
        build("numbers")
    with pytest.raises(ValueError, match=r"factory=my_prompt_factories:repeats: prompt 4: 'A  nurse' repeats prompt 1"):
        build("repeats")
    assert build("blanks") == ["a nurse", "a pilot"]


SETS = {"big": [f"b{i}" for i in range(30)], "small": [f"s{i}" for i in range(7)]}


def test_mixture_follows_the_weights_and_covers_each_set_per_pass():
    mixture = PromptMixture(SETS, {"big": 3.0, "small": 1.0}, seed=1)
    draws = [mixture.draw() for _ in range(4000)]
    counts = collections.Counter(name for name, _ in draws)
    assert abs(counts["big"] / 4000 - 0.75) < 0.03  # binomial std 0.007
    small = [prompt for name, prompt in draws if name == "small"]
    for start in range(0, len(small) - 7, 7):  # every pass shows each prompt once, reshuffled
        assert sorted(small[start:start + 7]) == sorted(SETS["small"])
    assert small[:7] != small[7:14]


@pytest.mark.parametrize("scale", [1e-300, 5e307])
def test_mixture_follows_weights_at_the_ends_of_the_float_range(scale):
    # at 5e307 their sum (2e308) overflowed to inf: every draw went to the last set
    mixture = PromptMixture(SETS, {"big": 3.0 * scale, "small": 1.0 * scale}, seed=1)
    counts = collections.Counter(mixture.draw()[0] for _ in range(2000))
    assert abs(counts["big"] / 2000 - 0.75) < 0.04  # binomial std 0.01


def test_mixture_resumes_exactly_from_its_state():
    straight = PromptMixture(SETS, {"big": 1.0, "small": 2.0}, seed=5)
    expected = [straight.draw() for _ in range(60)]
    first = PromptMixture(SETS, {"big": 1.0, "small": 2.0}, seed=5)
    head = [first.draw() for _ in range(23)]
    state = json.loads(json.dumps(first.state_dict()))  # plain data: fits any checkpoint format
    resumed = PromptMixture(SETS, {"big": 1.0, "small": 2.0}, seed=5)
    resumed.load_state_dict(state)
    assert head + [resumed.draw() for _ in range(37)] == expected
    other_seed = PromptMixture(SETS, {"big": 1.0, "small": 2.0}, seed=6)
    assert [other_seed.draw() for _ in range(60)] != expected
    with pytest.raises(ValueError, match="prompt mixture state is for seed 5"):
        other_seed.load_state_dict(state)


def test_a_resume_with_the_sets_listed_in_another_order_continues_the_same_draws():
    """The draw and each set's shuffle depend on a set's position: data.sets reordered between a stop and its resume
    (YAML key order, a base file's sets first) passed every check and changed the sequence."""
    sets = {**SETS, "third": [f"t{i}" for i in range(11)]}
    weights = {"big": 1.0, "small": 2.0, "third": 0.5}
    straight = PromptMixture(sets, weights, seed=3)
    expected = [straight.draw() for _ in range(200)]
    first = PromptMixture(sets, weights, seed=3)
    head = [first.draw() for _ in range(41)]
    state = json.loads(json.dumps(first.state_dict()))
    reordered = dict(reversed(list(sets.items())))
    resumed = PromptMixture(reordered, dict(reversed(list(weights.items()))), seed=3)
    resumed.load_state_dict(state)
    assert head + [resumed.draw() for _ in range(159)] == expected
    del state["order"]  # a state saved before the order was: resumes in the current order, as before
    PromptMixture(reordered, weights, seed=3).load_state_dict(state)


def test_a_resume_refuses_prompts_changed_at_the_same_size():
    state = PromptMixture(SETS, {"big": 1.0, "small": 1.0}, seed=1).state_dict()
    changed = dict(SETS, small=[f"t{i}" for i in range(7)])  # another file, as many lines
    with pytest.raises(ValueError, match=r"prompt set\(s\) \['small'\]: the prompts differ .*data.sets.small"):
        PromptMixture(changed, {"big": 1.0, "small": 1.0}, seed=1).load_state_dict(state)
    del state["prompts"]  # a state saved before the check: resumes as before
    PromptMixture(changed, {"big": 1.0, "small": 1.0}, seed=1).load_state_dict(state)


def test_mixture_weights_are_checked_and_zero_weight_sets_left_out():
    assert {PromptMixture(SETS, {"big": 0.0, "small": 1.0}).draw()[0] for _ in range(20)} == {"small"}
    for weights, message in (({"big": 1.0}, "same sets"), ({"big": -1.0, "small": 1.0}, "finite and >= 0"),
                             ({"big": 0.0, "small": 0.0}, "weight > 0")):
        with pytest.raises(ValueError, match=message):
            PromptMixture(SETS, weights)
    with pytest.raises(ValueError, match="no prompts"):
        PromptMixture({"empty": []}, {"empty": 1.0})


def test_mixture_from_a_data_config(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("chess\ngo\n")
    data = DataConfig(sets={"sports": PromptSetConfig(weight=1.0),
                            "mine": PromptSetConfig(weight=1.0, file=str(path), template=SPORT_TEMPLATE)},
                      split="test")
    mixture = build_prompt_mixture(data, seed=0)
    assert mixture.sets["sports"] == load_prompt_set("sports", "test")
    assert mixture.sets["mine"] == ["a person playing chess", "a person playing go"]
    # a file of one's own under a shipped set's name: its lines are that set's items, in that set's template;
    # under another name without a template, full prompts
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("electrician\nnurse\n")
    data = DataConfig(sets={"occupations": PromptSetConfig(file=str(jobs)), "plain": PromptSetConfig(file=str(jobs))})
    mixture = build_prompt_mixture(data, seed=0)
    assert mixture.sets["occupations"] == ["a photo of the face of an electrician, a person",
                                           "a photo of the face of a nurse, a person"]
    assert mixture.sets["plain"] == ["electrician", "nurse"]
    # whole prompts under a shipped name (such a file was taken as is before): refused rather than wrapped twice
    whole = tmp_path / "whole.txt"
    whole.write_text("a photo of the face of an astronaut, a person\na photo of the face of a cook, a person\n")
    with pytest.raises(ValueError, match=r"data.sets.occupations.file .*line 1 .*reads like a whole prompt.*"
                                         r"data.sets.occupations.template='\{occupation\}'"):
        build_prompt_mixture(DataConfig(sets={"occupations": PromptSetConfig(file=str(whole))}), seed=0)
    kept = build_prompt_mixture(DataConfig(sets={"occupations": PromptSetConfig(file=str(whole),
                                                                                 template="{occupation}")}), seed=0)
    assert kept.sets["occupations"][1] == "a photo of the face of a cook, a person"


def test_a_set_without_prompts_and_a_template_without_a_field_are_named(tmp_path):
    """An empty prompt file or factory was named only as a set ('prompt sets with weight > 0 but no prompts'); a
    template without a field raised a bare StopIteration from the library."""
    from types import SimpleNamespace

    from fastfair.prompts import build_prompt_mixture

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    spec = SimpleNamespace(weight=1.0, factory=None, file=str(empty), template="a photo of {thing}")
    with pytest.raises(ValueError, match=rf"data.sets.mine.file={empty} holds no prompt; give it prompts or weight 0"):
        build_prompt_mixture(SimpleNamespace(sets={"mine": spec}, split="train"), 0)
    with pytest.raises(ValueError, match="template 'a photo' must hold exactly one plain named field"):
        load_prompt_set("occupations", "train", "a photo")


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0])
def test_a_mixture_weight_must_be_finite_and_not_negative(weight):
    """Used as a library (a run config refuses these first): a NaN weight dropped its set silently, an infinite one
    made every draw NaN-driven."""
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        PromptMixture({"a": ["x"], "b": ["y"]}, {"a": 1.0, "b": weight})
