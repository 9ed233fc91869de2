"""fastfair.config: shipped configs, YAML includes, overrides, did-you-mean, validation, file checks."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from fastfair.config import (
    CLASSIFIER_ARCHITECTURES, DIFFUSERS_SUBFOLDERS, ConfigError, TrainConfig, check_files, check_packages,
    config_to_dict, deepspeed_config, load_config, parse_override, resume_changes, save_config, validate,
)
from fastfair.targets import load_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(path for path in CONFIGS.glob("*.yaml") if not path.name.startswith("_"))
DS_JSONS = sorted((CONFIGS / "ds").glob("*.json"))


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


GENDER = {"name": "gender", "classes": {"female": 0, "male": 1}, "probabilities": "uniform"}
RACE = {"name": "race", "classes": {"WMELH": 2, "Black": 3, "Indian": 4, "Asian": 5}, "probabilities": "uniform"}


def minimal(tmp_path, **extra) -> Path:
    """A valid config file: gender and race targets from one classifier, fp32 on CPU."""
    data = {"output_dir": str(tmp_path / "run"), "model": {"dtype": "fp32"}, "precision": {"mixed": "fp32"},
            "classifiers": {"c": {"path": "clf.safetensors", "attributes": {"gender": [0, 1], "race": [2, 3, 4, 5]}}},
            "targets": {"form": "independent", "attributes": [GENDER, RACE]}}
    return write(tmp_path / "run.yaml", {**data, **extra})


def test_the_brief_configs_are_shipped():
    names = {path.stem for path in SHIPPED}
    assert {"gender", "race", "gender_race", "gender_race_age", "multi_concept", "prefix", "unet_lora",
            "text_unet_lora"} <= names
    assert {path.name for path in DS_JSONS} == {"zero1_fp16.json", "zero2_fp16.json", "zero1_bf16.json",
                                                 "zero2_bf16.json"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    for world_size in (1, 8):  # 8 GPUs as in the seed
        validate(cfg, world_size=world_size, device="cuda")
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("name, expected", [
    ("gender", dict(max_steps=10000, n=24, c=0.8, face=1.0, img=(8.0, 1.6, 0.32))),
    ("race", dict(max_steps=12000, n=32, c=0.8, face=0.1, img=(6.0, 3.6, 1.08))),
    ("gender_race", dict(max_steps=14000, n=32, c=0.6, face=0.1,
                         img=(8.0, {"gender": 1.6, "race": 4.8}, {"gender": 0.32, "race": 1.44}))),
])
def test_shipped_hyperparameters_follow_the_seed(name, expected):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.max_steps, cfg.checkpoint_every, cfg.optim.lr) == (expected["max_steps"], 200, 5e-5)
    assert (cfg.batch.images_per_prompt, cfg.loss.confidence_threshold) == (expected["n"], expected["c"])
    assert cfg.loss.lambda_face == expected["face"]
    weights = (cfg.loss.lambda_img_1, cfg.loss.lambda_img_2, cfg.loss.lambda_img_3)
    assert weights == pytest.approx(expected["img"]) if isinstance(weights[1], float) else weights == expected["img"]
    assert (cfg.finetune.target, cfg.finetune.lora.rank) == ("text_lora", 50)
    assert cfg.keep_every == cfg.checkpoint_every  # "reports the best checkpoint": none is pruned
    # a face-less image: lambda_img_1 in the public gender and race scripts, the smallest lambda_img_2 in its gender
    # x race one
    assert cfg.loss.lambda_img_no_face == {"gender": 8.0, "race": 6.0}.get(name)
    # the original face is the face loss's target where every attribute's confidence reaches the public script's level
    assert cfg.loss.original_face_confidence == (0.8 if name == "gender_race" else 0.9)
    if name == "gender_race":
        assert load_config(CONFIGS / "gender_race_age.yaml").loss.original_face_confidence == 0.75


def test_variants_inherit_and_change_only_their_part():
    gender = load_config(CONFIGS / "gender.yaml")
    for name, target in (("prefix", "prefix"), ("unet_lora", "unet_lora"), ("text_unet_lora", "text_unet_lora")):
        variant = load_config(CONFIGS / f"{name}.yaml")
        assert variant.finetune.target == target and variant.output_dir != gender.output_dir
        assert (variant.loss, variant.targets, variant.classifiers) == (gender.loss, gender.targets, gender.classifiers)
    prefix = load_config(CONFIGS / "prefix.yaml").finetune
    assert (prefix.prefix_tokens, prefix.prefix_init) == (5, "random_tokens")  # the public prefix script's start
    joint, = load_targets(load_config(CONFIGS / "gender_race.yaml").targets).groups()
    assert joint.attributes == ("gender", "race") and joint.target.tolist() == [1 / 8] * 8
    conditional, = load_targets(load_config(CONFIGS / "gender_race_age.yaml").targets).groups()
    assert conditional.attributes == ("gender", "race", "age")
    assert conditional.target.tolist() == pytest.approx([1 / 8 * 0.75, 1 / 8 * 0.25] * 8, abs=1e-15)
    mixture = load_config(CONFIGS / "multi_concept.yaml").data.sets
    assert set(mixture) == {"occupations", "sports", "styled_occupations", "descriptors"}


def test_base_include_merges_under_the_files_own_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "root.yaml", {"max_steps": 7, "optim": {"lr": 0.1, "betas": [0.5, 0.6]},
                                           "sampler": {"num_steps": 9}})
    write(tmp_path / "sub" / "mid.yaml", {"base": "root.yaml", "optim": {"lr": 0.2}, "seed": 3})
    top = minimal(tmp_path, base=["sub/mid.yaml"], optim={"betas": [0.1, 0.2]}, sampler={"guidance_scale": 2})
    cfg = load_config(top)
    assert (cfg.max_steps, cfg.seed, cfg.sampler.num_steps, cfg.sampler.guidance_scale) == (7, 3, 9, 2.0)
    assert (cfg.optim.lr, cfg.optim.betas) == (0.2, [0.1, 0.2])  # nested key from mid; list replaced by top


def test_base_errors_name_the_files(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular base"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "missing.yaml"})
    with pytest.raises(ConfigError, match=r"missing\.yaml \(named by base: in .*c\.yaml\)"):
        load_config(tmp_path / "c.yaml")


def test_an_empty_base_is_none_and_a_base_that_names_no_file_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base:        # - gender.yaml, left out for now\noutput_dir: x\n")
    assert load_config(tmp_path / "a.yaml").output_dir == "x"  # was a TypeError traceback
    for base in ("3", "{file: x.yaml}", "[x.yaml, 3]"):
        (tmp_path / "b.yaml").write_text(f"base: {base}\n")
        with pytest.raises(ConfigError, match=r"b\.yaml: base: expected a file name or a list of them, got"):
            load_config(tmp_path / "b.yaml")


def test_a_section_left_empty_keeps_its_bases_settings_and_bases_take_a_home_path(tmp_path, monkeypatch):
    write(tmp_path / "base.yaml", {"optim": {"lr": 0.25}, "seed": 4})
    (tmp_path / "run.yaml").write_text("base: base.yaml\noptim:\n  # lr: 0.5\n")  # every key commented out
    assert load_config(tmp_path / "run.yaml").optim.lr == 0.25  # was: optim: expected a mapping, got None
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "home.yaml").write_text("base: ~/base.yaml\n")
    assert load_config(tmp_path / "sub" / "home.yaml").seed == 4  # not sub/~/base.yaml
    (tmp_path / "pkg.yaml").write_text("base: pkg://no_such_package_here/x.yaml\n")
    with pytest.raises(ConfigError, match=r"pkg\.yaml: .*no_such_package_here"):
        load_config(tmp_path / "pkg.yaml")


def test_a_key_given_twice_in_one_mapping_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of a repeated key: a second optim: block dropped the first one's settings."""
    (tmp_path / "run.yaml").write_text("optim:\n  lr: 1.0e-4\nseed: 1\noptim:\n  scheduler: cosine\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: key 'optim' is given twice in one mapping \(lines 1 and 4\), "
                                          r"and YAML keeps only the last: merge them into one"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=r"override 'optim=\{lr: 1, lr: 2\}': key 'lr' is given twice"):
        parse_override("optim={lr: 1, lr: 2}")


def test_merge_keys_expand_and_an_entry_beside_one_overrides_it(tmp_path):
    """YAML anchors and merge keys (<<: *name), which yaml.safe_load reads: the repeated-key check looks at a
    mapping's own entries only, so an entry written beside the merge overrides the merged one."""
    minimal(tmp_path)
    data = (tmp_path / "run.yaml").read_text()
    (tmp_path / "run.yaml").write_text(data + "optim:\n  <<: {lr: 0.002, weight_decay: 0.1}\n  lr: 0.005\n")
    optim = load_config(tmp_path / "run.yaml").optim
    assert (optim.lr, optim.weight_decay) == (0.005, 0.1)
    (tmp_path / "run.yaml").write_text(
        "output_dir: run\nclassifiers:\n  c: &file {path: clf.safetensors, attributes: {gender: [0, 1]}}\n"
        "  d:\n    <<: *file\n    attributes: {race: [2, 3, 4, 5]}\n")
    classifiers = load_config(tmp_path / "run.yaml").classifiers
    assert classifiers["d"].path == classifiers["c"].path and list(classifiers["d"].attributes) == ["race"]


def test_an_unhashable_key_is_a_yaml_error_naming_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("? [lr, eps]\n: 0.1\n")
    with pytest.raises(ConfigError, match=r"(?s)run\.yaml: not valid YAML .*unhashable key"):
        load_config(tmp_path / "run.yaml")


def test_yaml_1_1_octal_and_base_60_ints_in_a_file_are_refused_naming_the_key(tmp_path):
    (tmp_path / "run.yaml").write_text("seed: 1\nmax_steps: 0100\n")
    with pytest.raises(ConfigError, match=re.escape("run.yaml: max_steps (line 2): 0100 is read as 64 by YAML 1.1 "
                                                    "(octal) and as 100 by YAML 1.2: write the one you mean without "
                                                    "the leading zero")):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("optim:\n  betas: [0.9, 1:30]\n")
    with pytest.raises(ConfigError, match=re.escape("betas[1] (line 2): 1:30 is read as 90 by YAML 1.1 (base 60) "
                                                    "and as a text by YAML 1.2")):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("seed: 07\nmax_steps: 0\n")  # the same number in both: read
    assert (load_config(tmp_path / "run.yaml").seed, load_config(tmp_path / "run.yaml").max_steps) == (7, 0)


@pytest.mark.parametrize("override, attribute, value", [
    ("optim.lr=1e-4", "optim.lr", 1e-4),  # PyYAML alone would read a string
    ("sampler.num_steps_range=[19, 23]", "sampler.num_steps_range", [19, 23]),
    ("sampler.num_steps_range=null", "sampler.num_steps_range", None),
    ("optim.grad_clip=1", "optim.grad_clip", 1.0),
    ("precision.tf32=false", "precision.tf32", False),
    ("output_dir=2024", "output_dir", "2024"),  # a str field keeps the raw text
    ("resume=", "resume", ""),
    ("deepspeed.config=", "deepspeed.config", None),
    ("loss.lambda_img_2={gender: 1, race: 2.5}", "loss.lambda_img_2", {"gender": 1.0, "race": 2.5}),
    ("data.sets.sports.weight=0.5", "data.sets.sports", {"weight": 0.5, "file": None, "template": None, "factory": None}),
    ("targets.form=joint", "targets.form", "joint"),
    # text as typed: YAML cut the first at its comment, made the second a mapping, refused the third
    ("output_dir=runs/my run #2", "output_dir", "runs/my run #2"),
    ("output_dir=runs/a: b", "output_dir", "runs/a: b"),
    ("data.sets.mine.template={job} at work", "data.sets.mine.template", "{job} at work"),
    ("output_dir='quoted #1'", "output_dir", "quoted #1"),
    ("logging.tensorboard_dir=null", "logging.tensorboard_dir", None),
])
def test_overrides_are_parsed_and_typed(tmp_path, override, attribute, value):
    data = config_to_dict(load_config(minimal(tmp_path), [override]))
    for name in attribute.split("."):
        data = data[name]
    assert data == value and type(data) is type(value)


def test_a_home_folder_in_the_written_folders_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(minimal(tmp_path), ["output_dir=~/runs/a", "logging.tensorboard_dir=~/tb", "resume=~/ck"])
    assert (cfg.output_dir, cfg.logging.tensorboard_dir, cfg.resume) == tuple(
        str(tmp_path / "home" / name) for name in ("runs/a", "tb", "ck"))  # not a folder named '~' here
    assert load_config(minimal(tmp_path), ["output_dir=runs/b"]).output_dir == "runs/b"  # relative stays


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr': did you mean 'optim.lr'?"),
    ("lr=1", "unknown config key 'lr': did you mean 'optim.lr'?"),
    ("optm.lr=1", "unknown config key 'optm': did you mean 'optim'?"),
    ("sampler.guidance=3", "did you mean 'sampler.guidance_scale'?"),
    ("data.sets.sports.wieght=1", "unknown config key 'data.sets.sports.wieght': did you mean 'data.sets.sports.weight'"),
    ("classifiers.c.atributes={}", "did you mean 'classifiers.c.attributes'"),
    # other trainers' names, and a misplaced name matched against settings only (it was 'batch', a section)
    ("model.path=x", "unknown config key 'model.path': (keys here: pretrained, "),  # not 'batch', a section
    ("optim.learning_rate=1", "unknown config key 'optim.learning_rate': did you mean 'optim.lr'?"),
    ("batch_size=4", "did you mean 'batch.images_per_prompt'?"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("max_steps=1.5", "max_steps: expected int, got 1.5"),
    ("precision.tf32=1", "precision.tf32: expected bool, got 1"),
    ("optim.betas=[0.9, x]", "optim.betas[1]: expected float"),
    ("model.pretrained.path=x", "'model.pretrained' is str: it has no key 'path'"),
    ("max_steps", "expected key.sub=value"),
    ("optim..lr=1", "empty key component"),
    ("targets.attributes.0.probabilities={female: 0.7, male: 0.3}",
     "list items cannot be set by index ('0' after 'targets.attributes'); give the whole list, e.g. "
     "targets.attributes=[...]"),
    # inf passes every bound and NaN fails them with a confusing message: both refused where they are read
    ("optim.lr=.inf", "optim.lr: expected a finite number, got inf"),
    ("optim.eps=nan", "optim.eps: expected a finite number, got 'nan'"),
    ("loss.lambda_img_no_face=-.inf", "loss.lambda_img_no_face: expected a finite number, got -inf"),
    ("loss.lambda_img_1={gender: .inf}", "loss.lambda_img_1.gender: expected a finite number, got inf"),
    # YAML 1.1 octal and base 60, which YAML 1.2 reads as 17, 100 and a text
    ("seed=017", "override 'seed=017': 017 is read as 15 by YAML 1.1 (octal) and as 17 by YAML 1.2: write the one "
                 "you mean without the leading zero"),
    ("seed=1:30", "override 'seed=1:30': 1:30 is read as 90 by YAML 1.1 (base 60) and as a text by YAML 1.2: "
                  "write 90, or quote '1:30' for a text"),
    ("max_steps=0100", "0100 is read as 64 by YAML 1.1 (octal) and as 100 by YAML 1.2"),
    ("optim.betas=[0.9, 010]", "010 is read as 8 by YAML 1.1 (octal)"),
    ("sampler.guidance_scale=1:30.5", "1:30.5 is read as 90.5 by YAML 1.1 (base 60) and as a text by YAML 1.2: "
                                      "write 90.5, or quote"),  # base-60 floats too (it was read as 90.5)
    # Python's None is a text to YAML: a folder named None was made for the tensorboard logs
    ("logging.tensorboard_dir=None", "logging.tensorboard_dir=None: read as the text 'None' (a path named None); for "
                                     "none write logging.tensorboard_dir=null"),
    ("model.config=none", "model.config=none: read as the text 'none'"),
    ("optim.LR=1", "unknown config key 'optim.LR': did you mean 'optim.lr'?"),  # difflib minds case
    ("data.sets.1.weight=1", "data.sets is a mapping keyed by name, not a list: give the name, e.g. "
                             "data.sets.NAME.weight=..."),
    ("max_steps=1e3", "max_steps: expected int, got '1e3': write 1000"),
])
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError) as error:
        parse_override(override)
    assert message in str(error.value)


def test_an_override_reaches_into_a_per_attribute_loss_weight(tmp_path):
    cfg = load_config(CONFIGS / "gender_race.yaml", ["loss.lambda_img_2.race=3.0"])
    assert cfg.loss.lambda_img_2 == {"gender": 1.6, "race": 3.0}
    with pytest.raises(ConfigError, match=re.escape("override 'loss.lambda_img_2.race=3.0': loss.lambda_img_2 is 1.6, "
                                                    "not a mapping: give it whole, e.g. "
                                                    "loss.lambda_img_2={race: 3.0, ...}")):
        load_config(CONFIGS / "gender.yaml", ["loss.lambda_img_2.race=3.0"])


def test_a_tuple_in_a_config_built_in_python_is_no_change_on_resume(tmp_path):
    cfg = load_config(minimal(tmp_path))
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))  # the checkpoint's config.yaml
    cfg.finetune.lora.text_modules = tuple(cfg.finetune.lora.text_modules)
    assert resume_changes(saved, cfg) == {}


def test_a_resume_names_a_setting_an_older_checkpoint_lacks_by_its_default(tmp_path):
    cfg = load_config(minimal(tmp_path))
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    del saved["finetune"]["lora"]["dropout"]  # saved before the setting existed: the run had its default
    assert resume_changes(saved, cfg) == {}
    cfg.finetune.lora.dropout = 0.5  # moved off it: named with the value the run had
    assert resume_changes(saved, cfg) == {"finetune.lora.dropout": (0.0, 0.5)}
    cfg.finetune.lora.dropout = 0.0
    saved["data"]["sets"] = {"sports": saved["data"]["sets"]["occupations"]}  # a run on another prompt set
    changes = resume_changes(saved, cfg)  # an entry the run's mapping lacked is a change, at its default too
    assert changes["data.sets.occupations.weight"] == ("(not set)", 1.0)


def test_a_resume_names_a_retention_change(tmp_path):
    """keep_last/keep_every are not among the settings a resume may change: a smaller one would prune checkpoints
    the run has kept. Where it stops and its optimizer settings are."""
    cfg = load_config(minimal(tmp_path))
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    cfg.max_steps, cfg.optim.lr = cfg.max_steps + 1, cfg.optim.lr * 2
    assert resume_changes(saved, cfg) == {}
    cfg.keep_last, cfg.keep_every = cfg.keep_last + 1, cfg.keep_every + cfg.checkpoint_every
    assert resume_changes(saved, cfg) == {"keep_every": (saved["keep_every"], cfg.keep_every),
                                          "keep_last": (saved["keep_last"], cfg.keep_last)}


def test_a_resume_may_trade_memory_for_time_but_not_change_the_gradient(tmp_path):
    """Settings that compute the same gradient with less memory (a resume on a smaller GPU) may change; those that
    change the gradient (grad_steps, coefficients) are named."""
    cfg = load_config(minimal(tmp_path))
    saved = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    s = cfg.sampler
    s.recompute_chunk, s.recompute_images, s.keep_graph_steps, s.keep_attention_steps = 4, 2, 3, 5
    s.memory_budget_gb, s.lean_graph, cfg.loss.judge_images = 20.0, not s.lean_graph, 2
    assert resume_changes(saved, cfg) == {}
    s.grad_steps, s.coefficients = 5, "exact"
    assert set(resume_changes(saved, cfg)) == {"sampler.grad_steps", "sampler.coefficients"}


def test_unknown_yaml_key_at_depth_names_the_full_dotted_key(tmp_path):
    path = minimal(tmp_path, finetune={"lora": {"rnak": 4}})
    with pytest.raises(ConfigError, match=r"unknown config key 'finetune\.lora\.rnak': did you mean "
                                          r"'finetune\.lora\.rank'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"sampler: expected a mapping, got 3"):
        load_config(minimal(tmp_path, sampler=3))
    (tmp_path / "broken.yaml").write_text("optim: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "latin.yaml").write_bytes("# caf\xe9\nseed: 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8 text .* save it as UTF-8"):
        load_config(tmp_path / "latin.yaml")
    with pytest.raises(ConfigError, match=rf"a folder, not a config file: {tmp_path}"):
        load_config(tmp_path)


def test_save_config_is_atomic_and_complete(tmp_path):
    cfg = load_config(minimal(tmp_path), ["seed=5"])
    target = tmp_path / "out" / "config.yaml"
    save_config(cfg, target)
    save_config(cfg, target)  # replacing an existing file
    assert [path.name for path in target.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert yaml.safe_load(target.read_text()) == config_to_dict(cfg)
    assert load_config(target) == cfg


def test_a_minimal_config_validates_on_cpu(tmp_path):
    validate(load_config(minimal(tmp_path)), world_size=2, device="cpu")


@pytest.mark.parametrize("overrides, message", [
    (["model.dtype=fp16"], "model.dtype=fp16 needs a CUDA device; this run is on cpu"),
    (["precision.mixed=fp16"], "precision.mixed=fp16 needs a CUDA device"),
    (["finetune.target=lora"], "finetune.target='lora' is not allowed: use one of prefix, text_lora"),
    (["sampler.coefficients=exactly"], "sampler.coefficients='exactly' is not allowed"),
    (["optim.name=sgd"], "optim.name='sgd' is not allowed: use one of adamw, adamw8bit"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4 is not allowed"),
    (["max_steps=0"], "max_steps=0 must be >= 1"),
    (["checkpoint_every=0"], "checkpoint_every=0 must be >= 1"),
    (["finetune.lora.rank=-2"], "finetune.lora.rank=-2 must be >= 1"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["optim.ema_decay=1"], "optim.ema_decay=1.0 must be < 1"),
    (["loss.confidence_threshold=1.5"], "loss.confidence_threshold=1.5 must be <= 1"),
    (["data.sets.sports.weight=-1"], "data.sets.sports.weight=-1.0 must be >= 0"),
    (["loss.lambda_img_2={race: -1}"], "loss.lambda_img_2.race=-1.0 must be >= 0"),
    (["sampler.num_steps_range=[23, 19]"], "sampler.num_steps_range=[23, 19] must be [low, high]"),
    (["sampler.num_steps_range=[20]"], "must be [low, high]"),
    (["sampler.num_steps_range=[5, 9]", "sampler.num_steps=7", "sampler.grad_steps=6"],
     "sampler.grad_steps=6 exceeds the fewest"),
    (["sampler.num_steps_range=[5, 9]"], "sampler.num_steps=20 lies outside sampler.num_steps_range=[5, 9], which "
     "replaces it in training (each iteration draws its count from the range): set num_steps inside the range, or "
     "sampler.num_steps_range=null for a fixed count"),
    # python -m fastfair.generate (diffusers' pipeline) samples every scale <= 1 without guidance
    (["sampler.guidance_scale=0.5"], "sampler.guidance_scale=0.5 must be >= 1"),
    (["sampler.memory_budget_gb=20", "sampler.keep_graph_steps=3"], "both set"),
    (["sampler.memory_budget_gb=20", "sampler.keep_attention_steps=3"], "keep_attention_steps are both set"),
    (["batch.images_per_prompt=9"], "batch.images_per_prompt=9 is not divisible by the world size 2"),
    (["output_dir="], "output_dir is empty"),
    (["keep_every=300", "checkpoint_every=200"], "keep_every=300 is not a multiple of checkpoint_every=200"),
    (["keep_every=150", "checkpoint_every=200"], "some of those checkpoints would never be written (a divisor"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1)"),
    (["targets={}"], "targets is empty"),
    (["targets.form=sideways"], "targets.form must be one of"),  # fastfair.targets' own check
    (["classifiers={}"], "classifiers is empty"),
    (["classifiers.c.attributes={gender: [0, 1]}"], "targets attribute 'race' is predicted by no classifier"),
    (["classifiers.c.attributes={gender: [1, 2], race: [3, 4, 5, 6]}"],
     "targets attribute 'gender' reads classifier outputs [0, 1] but classifiers.c.attributes.gender is [1, 2]"),
    (["loss.lambda_img_3={gender: 1, rase: 2}"], "loss.lambda_img_3 names ['rase'], not targets attributes"),
    (["data.sets.occupations.weight=0"], "no prompt set with weight > 0"),
    (["data.sets.poems.weight=1"], "data.sets.poems.file to a text file or data.sets.poems.factory to"),
    (["data.sets.occupations.template=a {x} and {y}"], "data.sets.occupations.template: template"),
    (["finetune.target=unet_lora", "finetune.lora.unet_modules=[]"], "finetune.lora.unet_modules is empty"),
    (["faces.detector=callable"], "faces.detector=callable needs faces.detector_fn"),
    (["faces.detector_fn=pkg.mod:fn"], "faces.detector_fn=pkg.mod:fn is read only with faces.detector=callable, but "
     "faces.detector=opencv: set faces.detector=callable or faces.detector_fn=null"),
    (["faces.detector_path=/models"], "faces.detector_path=/models is insightface's model folder, but "
     "faces.detector=opencv: set faces.detector=insightface or faces.detector_path=null"),
    (["faces.detector=opencvv"], "faces.detector='opencvv': expected one of opencv, insightface, mtcnn, none, "
     "callable, or a comma-separated list of opencv, insightface, mtcnn, none tried in order per image"),
    (["faces.detector=callable,opencv", "faces.detector_fn=pkg.mod:fn"], "faces.detector='callable,opencv': "
     "expected one of"),
    (["faces.detector=mtcnn,opencv", "faces.detector_path=/models"], "faces.detector_path=/models is "
     "insightface's model folder, but faces.detector=mtcnn,opencv"),
    (["classifiers.d={path: d.pt, attributes: {gender: [0, 1]}}"],
     "classifiers.c and classifiers.d both predict 'gender': keep it in the attributes of one of them"),
    (["data.sets.mine={file: /p.txt, factory: 'pkg.mod:fn'}"], "data.sets.mine sets both file=/p.txt and "
     "factory=pkg.mod:fn: give one of file / factory"),
    (["data.sets.mine={factory: 'pkg.mod:fn', template: 'a {x}'}"], "data.sets.mine sets both template='a {x}' and "
     "factory=pkg.mod:fn: a factory's prompts are used as it returns them"),
    (["classifiers.c.attributes={gender: [0, 1], race: [1, 2, 3, 4]}"], "output indices must be distinct"),
    (["classifiers.c.attributes={gender: [0, 1], race: []}"], "classifiers.c.attributes: give each attribute"),
    (["model.attention=xformers"], "model.attention=xformers needs CUDA"),
    (["seed=20240101123456"], "seed=20240101123456 must be <= 4294967295"),
    (["finetune.lora.dropout=0.1"], "finetune.lora.dropout=0.1: fastfair runs the models in eval mode"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas=[0.9, 1.0] must be two numbers in [0, 1)"),  # the bounds themselves
    (["optim.betas=[-0.1, 0.999]"], "optim.betas=[-0.1, 0.999] must be two numbers in [0, 1)"),
    (["classifiers.c.attributes={gender: [0, -1], race: [2, 3, 4, 5]}"], "output indices must be distinct and >= 0"),
    (["loss.judge_images=2", "loss.recompute_judges=false"], "loss.judge_images=2 slices the decoder's and judges' "
     "recompute, but loss.recompute_judges=false keeps every slice's activations"),
    (["loss.judge_images=0"], "loss.judge_images=0 must be >= 1"),
])
def test_validate_names_the_key_and_the_fix(tmp_path, overrides, message):
    cfg = load_config(minimal(tmp_path), overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg, world_size=2, device="cpu")
    assert message in str(error.value)


def test_validate_lists_every_problem_and_checks_its_arguments(tmp_path):
    cfg = load_config(minimal(tmp_path), ["max_steps=0", "optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"(?s)max_steps=0.*optim\.lr=-1\.0"):
        validate(cfg)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        validate(load_config(minimal(tmp_path)), world_size=0)


def test_a_detector_list_ignores_spaces_and_empty_entries(tmp_path):
    """faces.detector (and evaluate's --detector) as a comma list: 'insightface, mtcnn,' is insightface then mtcnn."""
    from fastfair.config import detector_names

    assert detector_names(" insightface, mtcnn,") == ["insightface", "mtcnn"]
    validate(load_config(minimal(tmp_path), ["faces.detector=opencv,"]))


def test_fp16_is_fine_on_cuda_and_bf16_on_cpu(tmp_path):
    validate(load_config(minimal(tmp_path), ["model.dtype=fp16", "precision.mixed=fp16"]), device="cuda:1")
    validate(load_config(minimal(tmp_path), ["model.dtype=bf16", "precision.mixed=bf16"]), device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision.mixed=fp16 needs a CUDA device"):
        validate(load_config(minimal(tmp_path), ["precision.mixed=fp16"]), device=torch.device("cpu"))
    validate(load_config(minimal(tmp_path), ["model.dtype=fp16", "precision.mixed=fp32"]), device="cuda")


@pytest.mark.parametrize("dtype,mixed", [("fp16", "bf16"), ("bf16", "fp16")])
def test_frozen_weights_of_one_half_type_under_autocast_to_the_other_are_refused(tmp_path, dtype, mixed):
    with pytest.raises(ConfigError, match=f"model.dtype={dtype} with precision.mixed={mixed}: autocast would cast "
                                          "each frozen weight to the other half type"):
        validate(load_config(minimal(tmp_path), [f"model.dtype={dtype}", f"precision.mixed={mixed}"]), device="cuda")


def test_a_config_path_starting_with_a_tilde_is_read_from_home(tmp_path, monkeypatch):
    config = minimal(tmp_path)
    monkeypatch.setenv("HOME", str(config.parent))
    assert load_config(f"~/{config.name}") == load_config(config)


def diffusers_folder(root: Path, skip=()) -> Path:
    for name in DIFFUSERS_SUBFOLDERS:
        if name not in skip:
            (root / name).mkdir(parents=True)
    return root


def config_with_files(tmp_path, **paths) -> TrainConfig:
    """A config whose every file exists (empty files stand in for weights) unless paths overrides one."""
    tmp_path.mkdir(exist_ok=True)
    files = {}
    for name in ("clf.safetensors", "bank.safetensors", "sfnet.pth", "clip.bin"):
        files[name] = tmp_path / name
        files[name].touch()
    (tmp_path / "dino").mkdir()
    settings = {"model.pretrained": diffusers_folder(tmp_path / "sd"), "classifiers.c.path": files["clf.safetensors"],
                "faces.bank": files["bank.safetensors"], "faces.embedding": files["sfnet.pth"],
                "semantics.clip_path": files["clip.bin"], "semantics.dino_path": tmp_path / "dino", **paths}
    return load_config(minimal(tmp_path), [f"{key}={value}" for key, value in settings.items()])


def test_check_files_accepts_a_complete_layout(tmp_path):
    check_files(config_with_files(tmp_path))
    (tmp_path / "model.safetensors").touch()
    (tmp_path / "sd" / "model_index.json").touch()  # a single file's architecture: a diffusers folder
    check_files(config_with_files(tmp_path / "b", **{"model.pretrained": tmp_path / "model.safetensors",
                                                     "model.config": tmp_path / "sd"}))


@pytest.mark.parametrize("setting, message", [
    ({"model.pretrained": ""}, "model.pretrained is empty: point it at a diffusers folder with unet/, vae/"),
    ({"model.pretrained": "nowhere"}, "model.pretrained={cwd}/nowhere does not exist: expected a diffusers folder"),
    ({"model.pretrained": "half"}, "lacks vae/, scheduler/: expected a diffusers folder with unet/"),
    ({"model.pretrained": "weights.bin"}, "is not a checkpoint file: expected"),
    ({"faces.bank": "missing.safetensors"}, "faces.bank={cwd}/missing.safetensors does not exist"),
    ({"semantics.dino_path": ""}, "semantics.dino_path is empty"),
    ({"resume": "no/such/checkpoint"}, "resume=no/such/checkpoint does not exist"),
    ({"deepspeed.config": str(CONFIGS / "ds" / "zero2_fp16.json")},
     "enables ['fp16'] but precision.mixed=fp32: use a JSON whose fp16 and bf16 sections are absent or disabled"),
    ({"model.config": "half"}, "model.config={cwd}/half is read only with a single-file model.pretrained, but "),
    ({"faces.detector": "insightface,mtcnn"}, "faces.detector_path is empty"),  # insightface's models, in a list too
    # a folder where a file is read, and the other way round: named here, not by the loader after the model loads
    # ("No such device (os error 19)" for a bank folder)
    ({"faces.bank": "adir"}, "faces.bank={cwd}/adir is a folder: give the file itself"),
    ({"faces.embedding": "adir"}, "faces.embedding={cwd}/adir is a folder: give the file itself"),
    ({"classifiers.c.path": "adir"}, "classifiers.c.path={cwd}/adir is a folder: give the file itself"),
    ({"semantics.clip_path": "adir"}, "semantics.clip_path={cwd}/adir is a folder: give the file itself"),
    ({"semantics.clip_backend": "transformers", "semantics.clip_path": "weights.bin"},
     "semantics.clip_path={cwd}/weights.bin is a file: give the folder that holds the model"),
    ({"semantics.dino_path": "weights.bin"}, "semantics.dino_path={cwd}/weights.bin is a file: give the folder"),
    ({"faces.detector": "insightface", "faces.detector_path": "weights.bin"},
     "faces.detector_path={cwd}/weights.bin is a file: give the folder"),
    ({"data.sets.mine": "{file: adir}"}, "data.sets.mine.file={cwd}/adir is a folder: give the file itself"),
    # DeepSpeed scales an fp16 loss only with its fp16 section (precision.loss_scale is not used under it)
    ({"deepspeed.config": "fp32.json", "model.dtype": "fp16"},
     "model.dtype=fp16 with deepspeed.config={cwd}/fp32.json, which enables no fp16 (so no loss scaling"),
])
def test_check_files_names_the_key_and_the_expected_layout(tmp_path, monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)
    diffusers_folder(tmp_path / "half", skip=("vae", "scheduler"))
    (tmp_path / "weights.bin").touch()
    (tmp_path / "adir").mkdir()
    (tmp_path / "fp32.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}}))
    cfg = config_with_files(tmp_path, **setting)
    with pytest.raises(ConfigError) as error:
        check_files(cfg)
    assert message.format(cwd=tmp_path) in str(error.value)  # relative paths: absolute from the current folder


def test_files_and_folders_of_the_right_kind_pass(tmp_path):
    (tmp_path / "clip").mkdir(parents=True)
    (tmp_path / "prompts.txt").write_text("a doctor\n")
    check_files(config_with_files(tmp_path / "files", **{
        "semantics.clip_backend": "transformers", "semantics.clip_path": tmp_path / "clip",
        "data.sets.mine": f"{{file: {tmp_path / 'prompts.txt'}}}",
        # a factory reads its path in its own format: a folder too
        "classifiers.c.path": tmp_path / "clip", "classifiers.c.factory": "fastfair.toy:train_classifier"}))


@pytest.mark.parametrize("setting, needs", [
    (["deepspeed.config=ds.json"], ["deepspeed.config={cwd}/ds.json needs the deepspeed package"]),
    (["optim.name=adamw8bit"], ["optim.name=adamw8bit needs the bitsandbytes package, which is not installed: pip "
                                "install bitsandbytes, or use optim.name=adamw"]),
    (["semantics.clip_backend=open_clip"], ["semantics.clip_backend=open_clip needs the open_clip package, which is "
                                            "not installed: pip install 'fastfair[clip]', or "
                                            "semantics.clip_backend=transformers"]),
    (["faces.detector=opencv"], ["faces.detector=opencv needs the cv2 package"]),
    (["faces.detector=insightface,mtcnn"], ["faces.detector=insightface,mtcnn needs the insightface package",
                                            "faces.detector=insightface,mtcnn needs the onnxruntime package",
                                            "faces.detector=insightface,mtcnn needs the facenet_pytorch package"]),
    # what the settings leave unused is not asked for
    ([], []),
    (["semantics.clip_backend=open_clip", "semantics.factory=fastfair.toy:toy_semantics"], []),
])
def test_missing_optional_packages_are_named_before_any_model_loads(tmp_path, monkeypatch, setting, needs):
    """Each optional package a setting needs is looked for at the start (the trainer's checks), as a missing one
    failed only where it was first imported, after the Stable Diffusion model had loaded."""
    import importlib.util

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)  # nothing installed
    cfg = load_config(minimal(tmp_path), ["faces.detector=none", "semantics.clip_backend=transformers", *setting])
    if not needs:
        check_packages(cfg)
        return
    with pytest.raises(ConfigError) as error:
        check_packages(cfg)
    for message in needs:
        assert message.format(cwd=tmp_path) in str(error.value)
    assert str(error.value).count("needs the") == len(needs)


@pytest.mark.parametrize("setting, module", [("optim.name=adamw8bit", "bitsandbytes"), ("faces.detector=opencv", "cv2"),
                                             ("semantics.clip_backend=open_clip", "open_clip")])
def test_a_package_that_imports_here_is_not_refused(setting, module):
    """The module names looked for are those imported (no false refusal where the package is installed)."""
    pytest.importorskip(module)
    check_packages(load_config(CONFIGS / "toy.yaml", ["semantics.factory=null", "semantics.clip_backend=transformers",
                                                    setting]))


@pytest.mark.parametrize("setting, message", [
    (["classifiers.c.architecture=resnet9000"], "classifiers.c.architecture='resnet9000' is not a fastfair classifier "
                                                "architecture: use one of mobilenet_v3_large, small_cnn"),
    (["semantics.clip_model=''"], "semantics.clip_model='': name a built-in open_clip architecture, e.g. ViT-H-14"),
    (["semantics.clip_model=hf-hub:org/model"], "semantics.clip_model='hf-hub:org/model': name a built-in open_clip"),
])
def test_names_the_libraries_know_are_checked_with_the_settings(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(minimal(tmp_path), setting))


def test_the_config_knows_every_classifier_architecture_and_a_factory_may_name_its_own(tmp_path):
    from fastfair.classifiers.model import ARCHITECTURES

    assert sorted(CLASSIFIER_ARCHITECTURES) == sorted(ARCHITECTURES)
    validate(load_config(minimal(tmp_path), ["classifiers.c.architecture=resnet9000",
                                             "classifiers.c.factory=fastfair.toy:train_classifier"]))
    validate(load_config(minimal(tmp_path), ["semantics.clip_model=''",
                                             "semantics.factory=fastfair.toy:toy_semantics"]))


def test_face_files_are_needed_only_with_the_face_loss(tmp_path):
    check_files(config_with_files(tmp_path, **{"faces.bank": "", "faces.embedding": "", "loss.face_loss": "false"}))


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda path: path.stem)
def test_deepspeed_jsons_are_concrete_and_match_their_names(path, tmp_path):
    ds = json.loads(path.read_text())
    assert "auto" not in path.read_text()
    stage, precision = path.stem.split("_")
    assert ds["zero_optimization"]["stage"] == int(stage[-1])
    assert {name for name in ("fp16", "bf16") if ds.get(name, {}).get("enabled")} == {precision}
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    cfg = config_with_files(tmp_path, **{"deepspeed.config": path, "precision.mixed": precision,
                                         "batch.images_per_prompt": 32, "optim.grad_clip": 1.0})
    check_files(cfg)
    resolved = deepspeed_config(cfg, world_size=8)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["train_batch_size"]) == (4, 32)
    assert (resolved["gradient_accumulation_steps"], resolved["gradient_clipping"]) == (1, 1.0)
    cfg.deepspeed.zero_stage = 3
    assert deepspeed_config(cfg, 8)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("settings, mixed, message", [
    ({"bfloat16": {"enabled": True}}, "bf16", None),  # DeepSpeed's older name of the bf16 section
    ({"bfloat16": {"enabled": True}}, "fp32", "enables ['bf16'] but precision.mixed=fp32"),
    ({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}, "fp32",
     "has optimizer and scheduler section(s), which fastfair does not use"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "fp32",
     "offloads the optimizer (zero_optimization.offload_optimizer)"),
    # DeepSpeed's own non-finite check off: a NaN step was applied to the weights and the EMA
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "fp32",
     "sets zero_optimization.compute_grad_norm false, which turns off DeepSpeed's check for non-finite"),
    ({"bf16": {"enabled": True, "check_grad_overflow": False}}, "bf16", "sets bf16.check_grad_overflow false"),
    ({"bf16": {"enabled": True, "check_grad_overflow": True}}, "bf16", None),
    # in fp16 and bf16 DeepSpeed checks for overflow whatever compute_grad_norm says
    ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}, "bf16": {"enabled": True}}, "bf16", None),
    # DeepSpeed reads "3" as stage 3, which the stage-3 refusal missed: the run died at its first U-Net call
    ({"zero_optimization": {"stage": "3"}}, "fp32", "sets ZeRO stage 3, which partitions the parameters"),
    ({"zero_optimization": {"stage": "2"}}, "fp32", None),  # DeepSpeed reads it as 2
    ({"zero_optimization": {"stage": "two"}}, "fp32", 'zero_optimization.stage is "two", expected the number 0, 1'),
    ({"zero_optimization": {"stage": 3}}, "fp32", "sets ZeRO stage 3, which partitions the parameters"),
    # shapes that crashed the check with an AttributeError
    ({"zero_optimization": True}, "fp32", "zero_optimization is true, expected an object (DeepSpeed's older"),
    ({"fp16": "on"}, "fp32", 'fp16 is "on", expected an object'),
])
def test_deepspeed_json_sections_fastfair_would_misread_or_ignore_are_named(tmp_path, settings, mixed, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **settings}))
    cfg = config_with_files(tmp_path / "files", **{"deepspeed.config": path, "precision.mixed": mixed})
    if message is None:
        check_files(cfg)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_files(cfg)


def test_a_deepspeed_json_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    cfg = config_with_files(tmp_path / "files", **{"deepspeed.config": path})
    with pytest.raises(ConfigError, match=r"holds a JSON list: expected an object"):
        check_files(cfg)


def test_deepspeed_parses_the_shipped_jsons():
    runtime_config = pytest.importorskip("deepspeed.runtime.config")
    for path in DS_JSONS:
        parsed = runtime_config.DeepSpeedConfig(json.loads(path.read_text()))
        assert parsed.zero_optimization_stage == int(path.stem[4])
        assert parsed.float16_config.enabled == path.stem.endswith("fp16")
        assert parsed.bfloat16_config.enabled == path.stem.endswith("bf16")


def test_per_attribute_weights_must_cover_every_target_attribute():
    cfg = load_config(CONFIGS / "gender_race.yaml", [
        "targets.attributes=[{name: gender, classes: {female: 0, male: 1}, probabilities: uniform},"
        " {name: age, classes: {young: 6, old: 7}, probabilities: uniform}]",
        "classifiers.fairface.attributes={gender: [0, 1], age: [6, 7]}"])
    with pytest.raises(ConfigError, match=r"loss.lambda_img_2 gives no weight for targets attribute\(s\) \['age'\]"):
        validate(cfg, device="cuda")


def test_path_settings_are_made_absolute_from_the_current_folder(tmp_path, monkeypatch):
    """Every path a run reads is absolute once loaded (relative: from the current folder; pkg://: in the package);
    empty ones stay empty, and names that are not paths (hooks, output_dir) are kept as written."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "gender.yaml", [
        "model.pretrained=models/sd15", "model.config=pkg://fastfair.toy/weights/pipeline", "faces.bank=bank.st",
        "data.sets.occupations.file=~/prompts.txt", "deepspeed.config=ds.json", "semantics.dino_path=''",
        "classifiers.gender.path=/abs/gender.pt", "output_dir=runs/x", "semantics.factory=pkg.mod:fn"])
    assert cfg.model.pretrained == str(tmp_path / "models" / "sd15")
    assert Path(cfg.model.config).is_dir() and Path(cfg.model.config).is_absolute()
    assert cfg.faces.bank == str(tmp_path / "bank.st") and cfg.deepspeed.config == str(tmp_path / "ds.json")
    assert cfg.data.sets["occupations"].file == str(Path.home() / "prompts.txt")
    assert cfg.classifiers["gender"].path == "/abs/gender.pt" and cfg.semantics.dino_path == ""
    assert cfg.output_dir == "runs/x" and cfg.semantics.factory == "pkg.mod:fn"


def test_later_bases_override_earlier_ones(tmp_path):
    """base: [a, b] merges b over a (and both under the file): the list reads in order, as an include does."""
    write(tmp_path / "a.yaml", {"seed": 1, "max_steps": 5, "optim": {"lr": 0.1, "eps": 0.5}})
    write(tmp_path / "b.yaml", {"seed": 2, "optim": {"lr": 0.2}})
    cfg = load_config(minimal(tmp_path, base=["a.yaml", "b.yaml"]))
    assert (cfg.seed, cfg.max_steps, cfg.optim.lr, cfg.optim.eps) == (2, 5, 0.2, 0.5)


@pytest.mark.parametrize("override, attribute, value", [
    ("output_dir=runs/lr=1e-4", "output_dir", "runs/lr=1e-4"),  # split at the first '=' only
    ('output_dir="my run #2"', "output_dir", "my run #2"),  # double quotes read as YAML reads them, as single ones
    ("data.sets.mine.template=\"{job} = work\"", "data.sets.mine.template", "{job} = work"),
])
def test_override_values_with_equals_signs_and_double_quotes(tmp_path, override, attribute, value):
    data = config_to_dict(load_config(minimal(tmp_path), [override]))
    for name in attribute.split("."):
        data = data[name]
    assert data == value


@pytest.mark.parametrize("override, message", [
    ("max_steps=true", "max_steps: expected int, got True"),  # a bool is not a count (Python's bool is an int)
    ("sampler.grad_steps=false", "sampler.grad_steps: expected int or null, got False"),
])
def test_a_bool_is_not_an_int(override, message):
    with pytest.raises(ConfigError) as error:
        parse_override(override)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides", [
    ["sampler.num_steps_range=[20, 20]"],  # low == high: one count, as the message's 1 <= low <= high says
    ["sampler.grad_steps=20"],  # every step, named
    ["sampler.num_steps_range=[8, 30]", "sampler.grad_steps=8"],  # as many as the fewest
    ["faces.detector=insightface,mtcnn", "faces.detector_path=/models"],  # the public code's fallback list
    ["faces.detector=mtcnn, insightface", "faces.detector_path=/models"],
])
def test_validate_accepts_boundary_values(tmp_path, overrides):
    validate(load_config(minimal(tmp_path), overrides), world_size=2, device="cpu")


def test_face_files_are_not_needed_with_a_zero_face_weight(tmp_path):
    check_files(config_with_files(tmp_path, **{"faces.bank": "", "faces.embedding": "", "loss.lambda_face": "0"}))


def test_a_set_with_weight_zero_is_left_out_unread(tmp_path):
    """'0 leaves the set out': its file need not exist, and the mixture reads none of it."""
    from fastfair.prompts import build_prompt_mixture

    cfg = config_with_files(tmp_path, **{"data.sets.mine.file": tmp_path / "gone.txt", "data.sets.mine.weight": 0,
                                         "data.sets.sports.weight": 0, "data.sets.occupations.weight": 1})
    assert not validate(cfg, 1, "cpu")
    check_files(cfg)
    assert "mine" not in build_prompt_mixture(cfg.data, 0).sets
    # a name neither shipped nor given a file or factory: a misspelt one, which left the real set in (was accepted)
    cfg = config_with_files(tmp_path / "misspelt", **{"data.sets.ocupations.weight": 0,
                                                      "data.sets.occupations.weight": 1})
    with pytest.raises(ConfigError, match=r"data.sets.ocupations.weight=0 leaves out a set the config does not have "
                                          r"\(shipped: .*occupations.*; the config's: occupations\): check the name"):
        validate(cfg, 1, "cpu")


def test_a_zero_stage_override_keeps_the_jsons_other_zero_settings(tmp_path):
    path = CONFIGS / "ds" / "zero2_bf16.json"
    shipped = json.loads(path.read_text())["zero_optimization"]
    cfg = config_with_files(tmp_path, **{"deepspeed.config": path, "precision.mixed": "bf16",
                                         "deepspeed.zero_stage": 1})
    resolved = deepspeed_config(cfg, world_size=1)["zero_optimization"]
    assert resolved == {**shipped, "stage": 1} and len(shipped) > 1


def test_a_mapping_override_merges_into_its_section_and_a_key_twice_is_refused(tmp_path, capsys):
    """'optim={weight_decay: 0.1}' replaced the whole section: lr and ema_decay went back to the defaults, not to
    the config's (and precision={tf32: true} turned mixed fp32 into fp16)."""
    from fastfair.config import repeated_override

    toy = CONFIGS / "toy.yaml"
    base = load_config(toy)
    merged = load_config(toy, ["optim={weight_decay: 0.1}", "precision={tf32: true}"])
    assert merged.optim.weight_decay == 0.1 and merged.precision.tf32 is True
    assert (merged.optim.lr, merged.optim.ema_decay, merged.precision.mixed) == \
        (base.optim.lr, base.optim.ema_decay, base.precision.mixed)
    assert repeated_override(["max_steps=100", "optim.lr=1", "max_steps=300"]) == (
        "max_steps is given 2 times (max_steps=100, max_steps=300), and only the last would count: give it once")
    assert repeated_override(["optim={lr: 1}", "optim.lr=2"]) is None  # a section, then one of its keys
    from fastfair.trainer import parse_args

    with pytest.raises(SystemExit):  # the trainer's command line (and the demo's) refuse it
        parse_args(["--config", "c.yaml", "max_steps=100", "--print-config", "max_steps=300"])
    assert "error: max_steps is given 2 times (max_steps=100, max_steps=300)" in capsys.readouterr().err
    from fastfair.demo import train

    with pytest.raises(ValueError, match="max_steps is given 2 times"):
        train("gender", tmp_path / "demo", None, ["max_steps=1", "max_steps=2"])


def test_environment_variables_in_paths_are_named_not_made_into_folders(tmp_path):
    """$HOME in a file's output_dir made a folder literally named $HOME under the current one."""
    cfg = load_config(minimal(tmp_path, output_dir="$HOME/runs", logging={"tensorboard_dir": "${TMPDIR}/tb"}))
    with pytest.raises(ConfigError) as error:
        validate(cfg, 1, "cpu")
    for key in ("output_dir=$HOME/runs", "logging.tensorboard_dir=${TMPDIR}/tb"):
        assert f"{key}: fastfair does not expand environment variables in paths (only ~)" in str(error.value)
    cfg = load_config(minimal(tmp_path), ["model.pretrained=$DATA/sd15"])
    with pytest.raises(ConfigError, match=r"model.pretrained=.*\$DATA/sd15 does not exist \(fastfair does not expand "):
        check_files(cfg)
