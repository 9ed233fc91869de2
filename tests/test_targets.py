"""Target distributions: parsing, alignment groups, cell probabilities, validation errors."""
import copy
import math

import pytest
import torch
import yaml

from fastfair.targets import Targets, load_targets

CONFIG_YAML = """
normalize: false
attributes:
  - name: gender
    classes: {male: 0, female: 1}
    probabilities: {male: 0.5, female: 0.5}
  - name: race
    classes:
      - {name: white, index: 2}
      - {name: black, index: 3}
      - {name: asian, index: 4}
      - {name: indian, index: 5}
    probabilities: uniform
  - name: age
    classes: {young: 6, old: 7}
    given: [gender, race]
    probabilities: {young: 0.75, old: 0.25}
"""


def config():
    return yaml.safe_load(CONFIG_YAML)


def independent_config():
    cfg = config()
    del cfg["attributes"][2]["given"]
    return cfg


def test_conditional_group_is_the_implied_joint():
    targets = load_targets(config())
    assert targets.form == "conditional"  # the default when an attribute has `given`
    (group,) = targets.groups()
    assert group.attributes == ("gender", "race", "age")
    assert len(group.cells) == 16 and group.cells[0] == ("male", "white", "young")
    assert group.cells[1] == ("male", "white", "old")  # row-major, last attribute fastest
    joint = group.target.reshape(2, 4, 2)
    assert torch.allclose(joint.sum((1, 2)), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(joint.sum((0, 2)), torch.full((4,), 0.25, dtype=torch.float64))
    cells = torch.tensor([0, 1, 7, 15])
    assert {k: v.tolist() for k, v in group.attribute_classes(cells).items()} == {
        "gender": [0, 0, 0, 1], "race": [0, 0, 3, 3], "age": [0, 1, 1, 1]}
    # no target cell (-1): no class in any attribute (Python's -1 % 2 would read as the last one)
    assert {k: v.tolist() for k, v in group.attribute_classes(torch.tensor([-1, 15])).items()} == {
        "gender": [-1, 1], "race": [-1, 3], "age": [-1, 1]}
    # 75/25 inside every gender x race cell
    within = joint / joint.sum(-1, keepdim=True)
    assert torch.allclose(within, torch.tensor([0.75, 0.25], dtype=torch.float64).expand(2, 4, 2))


def test_conditional_table_per_cell_and_independent_attributes():
    cfg = {"attributes": [
        {"name": "gender", "classes": {"male": 0, "female": 1}, "probabilities": {"male": 0.4, "female": 0.6}},
        {"name": "glasses", "classes": {"no": 2, "yes": 3}, "probabilities": {"no": 0.5, "yes": 0.5}},
        {"name": "age", "classes": {"young": 4, "old": 5}, "given": "gender",
         "probabilities": {"male": {"young": 0.9, "old": 0.1}, "female": {"young": 0.6, "old": 0.4}}},
    ]}
    groups = load_targets(cfg).groups()
    assert [g.attributes for g in groups] == [("gender", "age"), ("glasses",)]
    expected = torch.tensor([0.4 * 0.9, 0.4 * 0.1, 0.6 * 0.6, 0.6 * 0.4], dtype=torch.float64)
    assert torch.allclose(groups[0].target, expected)
    assert torch.allclose(groups[1].target, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_per_cell_table_of_uniform_cells():
    """A per-cell table may give every cell as 'uniform' (it was taken for one distribution over the parent's
    class names and refused); a cell's 'uniform' beside a mapping was already read."""
    gender = {"name": "gender", "classes": {"male": 0, "female": 1}, "probabilities": {"male": 0.4, "female": 0.6}}
    age = {"name": "age", "classes": {"young": 2, "old": 3}, "given": "gender",
           "probabilities": {"male": "uniform", "female": "uniform"}}
    (group,) = load_targets({"attributes": [gender, age]}).groups()
    assert torch.allclose(group.target, torch.tensor([0.2, 0.2, 0.3, 0.3], dtype=torch.float64))
    age["probabilities"] = {"male": "uniform", "female": {"young": 0.9, "old": 0.1}}
    (group,) = load_targets({"attributes": [gender, age]}).groups()
    assert torch.allclose(group.target, torch.tensor([0.2, 0.2, 0.54, 0.06], dtype=torch.float64))
    age["probabilities"] = "Uniform"
    with pytest.raises(ValueError, match="needs one entry per class of 'gender'.* or 'uniform'"):
        load_targets({"attributes": [gender, age]})


def test_yaml_booleans_as_class_names_get_a_hint():
    cfg = yaml.safe_load("attributes: [{name: glasses, classes: {no: 0, yes: 1}, probabilities: uniform}]")
    with pytest.raises(ValueError, match="got False .*quote such names, e.g. 'no'"):
        load_targets(cfg)
    cfg = yaml.safe_load("attributes: [{name: glasses, classes: {'no': 0, 'yes': 1}, "
                         "probabilities: {no: 0.5, yes: 0.5}}]")
    with pytest.raises(ValueError, match=r"unknown class\(es\) \[False, True\].*quote such names"):
        load_targets(cfg)
    # a parent class YAML made a boolean, as a per-cell table's key beside a string one: named with the hint (sorting
    # the keys for the message raised a TypeError)
    cfg = yaml.safe_load("attributes: [{name: beard, classes: {'no': 0, 'yes': 1}, probabilities: uniform}, "
                         "{name: age, classes: {young: 2, old: 3}, given: beard, probabilities: "
                         "{no: uniform, 'yes': uniform}}]")
    with pytest.raises(ValueError, match=r"one entry per class of 'beard' \['no', 'yes'\], got \[False, 'yes'\] "
                                         r"\(YAML reads"):
        load_targets(cfg)


def test_independent_and_joint_forms():
    groups = load_targets(independent_config()).groups()
    assert [g.attributes for g in groups] == [("gender",), ("race",), ("age",)]
    assert torch.allclose(groups[2].target, torch.tensor([0.75, 0.25], dtype=torch.float64))
    joint_cfg = independent_config()
    joint_cfg["form"] = "joint"
    (joint,) = load_targets(joint_cfg).groups()
    assert joint.attributes == ("gender", "race", "age") and len(joint.cells) == 16
    assert torch.allclose(joint.target, torch.tensor([0.5 / 4 * 0.75, 0.5 / 4 * 0.25] * 8, dtype=torch.float64))


def test_log_probs_are_the_log_product_of_attribute_softmaxes():
    targets = load_targets(config())
    logits = torch.randn(5, 8, dtype=torch.float64)
    per_attribute = targets.attribute_logits(logits)
    assert torch.equal(per_attribute["race"], logits[:, 2:6])
    (group,) = targets.groups()
    log_p = group.log_probs({k: v.double() for k, v in per_attribute.items()})
    g, r, a = (logits[:, s].softmax(-1) for s in (slice(0, 2), slice(2, 6), slice(6, 8)))
    product = (g[:, :, None, None] * r[:, None, :, None] * a[:, None, None, :]).reshape(5, 16)
    assert log_p.dtype == torch.float64  # a float64 check keeps float64 (it was cast to float32: 1e-7 off)
    assert torch.allclose(log_p.exp(), product, rtol=1e-12, atol=1e-15)
    assert group.log_probs({k: v.half() for k, v in per_attribute.items()}).dtype == torch.float32
    # one classifier per attribute: a mapping of logits
    separate = targets.attribute_logits({"gender": logits[:, :2], "race": logits, "age": logits})
    assert torch.equal(separate["gender"], logits[:, :2]) and torch.equal(separate["age"], logits[:, 6:8])


def test_normalize_rescales():
    cfg = independent_config()
    cfg["normalize"] = True
    cfg["attributes"][2]["probabilities"] = {"young": 3, "old": 1}
    assert torch.allclose(load_targets(cfg).groups()[2].target, torch.tensor([0.75, 0.25], dtype=torch.float64))


def set_field(path, value):
    """A copy of the config with cfg[path...] = value (None deletes)."""
    cfg = copy.deepcopy(config())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.parametrize("cfg, error, message", [
    (set_field(["attributes", 0, "probabilities", "male"], -0.5), ValueError,
     r"targets.attributes\[0\] \(gender\).probabilities.male is negative"),
    (set_field(["attributes", 0, "probabilities", "male"], 0.6), ValueError,
     r"targets.attributes\[0\] \(gender\).probabilities sum to 1.1, not 1 .*normalize: true"),
    (set_field(["attributes", 0, "probabilities", "man"], 0.0), ValueError,
     r"\(gender\).probabilities: unknown class\(es\) \['man'\]"),
    (set_field(["attributes", 0, "probabilities", "female"], None), ValueError,
     r"\(gender\).probabilities: no probability for class\(es\) \['female'\]"),
    (set_field(["attributes", 1, "classes", 3, "name"], "white"), ValueError,
     r"\(race\).classes: duplicate class name 'white'"),
    (set_field(["attributes", 1, "classes", 3, "index"], 2), ValueError,
     r"\(race\).classes: two classes read the same classifier output index"),
    (set_field(["attributes", 2, "given"], ["gender", "ethnicity"]), ValueError,
     r"\(age\).given: 'ethnicity' is not a declared attribute"),
    (set_field(["attributes", 1, "classes"], {}), ValueError,
     r"targets.attributes\[1\] \(race\).classes: empty attribute"),
    (set_field(["attributes"], []), ValueError, r"targets.attributes: declare at least one attribute"),
    (set_field(["attributes", 1, "name"], "gender"), ValueError,
     r"targets.attributes\[1\].name: duplicate attribute name 'gender'"),
    (set_field(["form"], "independent"), ValueError, r"form is 'independent' but an attribute has 'given'"),
    (set_field(["form"], "marginal"), ValueError, r"targets.form must be one of"),
    (set_field(["attributes", 2, "given"], None) | {"form": "conditional"}, ValueError,
     r"form is 'conditional' but no attribute has 'given'"),
    (set_field(["attributes", 2, "given"], 3), TypeError, r"\(age\).given must be an attribute name"),
    (set_field(["weights"], 1), ValueError, r"targets: unknown field\(s\) \['weights'\]"),
    (set_field(["attributes", 0, "probabilities", "male"], "half"), TypeError,
     r"\(gender\).probabilities.male must be a number"),
    (set_field(["attributes", 2, "probabilities"], {"male": {"young": 1.0, "old": 0.0}}), ValueError,
     r"\(age\).probabilities: a conditional table needs one entry per class of 'gender'"),
    (set_field(["attributes", 0, "probabilities"], None), ValueError, r"\(gender\).probabilities is missing"),
    # a cell forgotten, its cells given by name: named as a conditional table, not as unknown classes of age
    (set_field(["attributes", 2, "probabilities"], {"male": "uniform"}), ValueError,
     r"\(age\).probabilities: a conditional table needs one entry per class of 'gender'"),
])
def test_validation_errors_name_the_field(cfg, error, message):
    with pytest.raises(error, match=message):
        Targets.from_dict(cfg)


def test_attribute_logits_checks_the_classifier_width():
    with pytest.raises(ValueError, match="attribute 'age' reads classifier output index 7"):
        load_targets(config()).attribute_logits(torch.randn(2, 6))


def test_sum_tolerance_accepts_rounding():
    cfg = set_field(["attributes", 1, "probabilities"], {"white": 0.3333333, "black": 0.3333333,
                                                          "asian": 0.3333334, "indian": 0.0})
    target = load_targets(cfg).groups()[0].target
    assert math.isclose(float(target.sum()), 1.0, abs_tol=1e-12)


def test_probabilities_in_exponent_notation_are_read_as_the_settings_read_them():
    """PyYAML (YAML 1.1) reads 5e-1 without a dot as a string; float settings accept it, and so do targets."""
    import yaml

    cfg = set_field(["attributes", 0, "probabilities"], yaml.safe_load("{male: 5e-1, female: 5e-1}"))
    assert cfg["attributes"][0]["probabilities"]["male"] == "5e-1"
    assert load_targets(cfg).attribute("gender").table.tolist() == [0.5, 0.5]
