"""Target distributions over classifier attributes (seed paragraphs 0082, 0097, 0132).

Config (a YAML-parsed dict)::

    form: conditional            # independent | joint | conditional (default: conditional when an
                                 # attribute has `given`, else independent)
    normalize: false             # true: rescale probabilities that do not sum to 1
    attributes:
      - name: gender
        classes: {male: 0, female: 1}       # class name -> index in the classifier's output
        probabilities: {male: 0.5, female: 0.5}
      - name: race
        classes: [{name: white, index: 2}, {name: black, index: 3}, {name: asian, index: 4}]
        probabilities: uniform
      - name: age
        classes: {young: 5, old: 6}
        given: [gender, race]               # age | gender, race
        probabilities: {young: 0.75, old: 0.25}   # the same in every (gender, race) cell, or one
                                                  # table per cell: {male: {white: {young: ..}, ..}, ..}

Each declared attribute is a categorical variable read from classifier logits: its classes' logits
are the listed output indices, and its probabilities their softmax.

What the alignment loss aligns (`Targets.groups()`), one `AlignmentGroup` per independent set:
- independent: one group per attribute, K = its classes, target = its distribution;
- joint: one group over the product cells of all attributes (row-major in declaration order),
  target = the joint distribution they imply (the product of the marginals, times the conditionals);
- conditional: attributes linked by `given` form one joint group with the implied distribution
  P(gender) P(race) P(age | gender, race), so the 75/25 holds inside every gender x race cell; the
  other attributes stay independent groups.
A group's K-vector for an image is the product of its attributes' probabilities (the classifier's
heads are treated as independent); `AlignmentGroup.log_probs` returns its log, the sum of the
per-attribute log-softmaxes, which the cross-entropy takes as logits. Eq. 4-6 then run over the K
cells literally, with one threshold C on a cell's confidence. (The public gender x race script
differs: its transport cost is the L2 distance between the concatenated per-attribute vectors and
it thresholds each attribute on its own, so an image can be aligned in gender while its race
target is uncertain.)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from numbers import Real
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

FORMS = ("independent", "joint", "conditional")
SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Attribute:
    """One categorical attribute: class names, their classifier output indices, its distribution.

    table: [K] probabilities, or [K_given_1, ..., K_given_m, K] conditional probabilities.
    """

    name: str
    classes: tuple
    indices: tuple
    given: tuple
    table: np.ndarray


@dataclass(frozen=True)
class AlignmentGroup:
    """A set of attributes aligned jointly: cells (row-major product of their classes), target [K]."""

    attributes: tuple
    sizes: tuple  # number of classes of each attribute
    cells: tuple
    target: torch.Tensor

    def attribute_classes(self, cells: torch.Tensor) -> dict:
        """{attribute: [N] class index} of [N] cell indices (e.g. argmax q); a cell -1 (none) is -1 in each."""
        out, none = {}, cells < 0
        for name, size in zip(reversed(self.attributes), reversed(self.sizes)):
            out[name] = torch.where(none, -1, cells % size)
            cells = cells // size
        return {name: out[name] for name in self.attributes}

    def log_probs(self, attribute_logits: Mapping) -> torch.Tensor:
        """[N, K] log-probabilities of the cells = sum of the attributes' log-softmaxes; float32 from half
        logits, float64 from float64 ones."""
        log_p = None
        for name in self.attributes:
            logits = attribute_logits[name]
            part = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            log_p = part if log_p is None else (log_p[:, :, None] + part[:, None, :]).flatten(1)
        return log_p


@dataclass(frozen=True)
class Targets:
    """Validated target distributions; build with `Targets.from_dict(config)`."""

    form: str
    attributes: tuple

    @classmethod
    def from_dict(cls, config: Mapping) -> "Targets":
        _check_keys(config, {"form", "normalize", "attributes"}, "targets")
        normalize = config.get("normalize", False)
        if not isinstance(normalize, bool):
            raise TypeError(f"targets.normalize must be true or false, got {normalize!r}")
        specs = config.get("attributes")
        if not isinstance(specs, (list, tuple)) or not specs:
            raise ValueError("targets.attributes: declare at least one attribute (a list of mappings)")
        attributes = []
        for i, spec in enumerate(specs):
            attributes.append(_parse_attribute(spec, f"targets.attributes[{i}]", attributes, normalize))
        has_given = any(a.given for a in attributes)
        form = config.get("form", "conditional" if has_given else "independent")
        if form not in FORMS:
            raise ValueError(f"targets.form must be one of {FORMS}, got {form!r}")
        if form == "independent" and has_given:
            raise ValueError("targets.form is 'independent' but an attribute has 'given'; "
                             "use form: conditional (or joint)")
        if form == "conditional" and not has_given:
            raise ValueError("targets.form is 'conditional' but no attribute has 'given'")
        return cls(form, tuple(attributes))

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(f"no attribute {name!r}; declared: {[a.name for a in self.attributes]}")

    def attribute_logits(self, logits) -> dict:
        """Per-attribute logits {name: [N, K_a]} from the classifier output [N, C] (one classifier
        for all attributes), or from a mapping {name: [N, C_name]} (one classifier per attribute)."""
        out = {}
        for a in self.attributes:
            if isinstance(logits, Mapping) and a.name not in logits:
                raise KeyError(f"attribute_logits: no logits for attribute {a.name!r}; the mapping has "
                               f"{sorted(logits)}, the targets declare {[b.name for b in self.attributes]}")
            source = logits[a.name] if isinstance(logits, Mapping) else logits
            what = f"logits[{a.name!r}]" if isinstance(logits, Mapping) else "logits"
            if not torch.is_tensor(source) or source.ndim != 2:
                got = tuple(source.shape) if torch.is_tensor(source) else type(source).__name__
                raise ValueError(f"attribute_logits: {what} must be a [N, C] tensor of classifier outputs, got {got}")
            if source.shape[-1] <= max(a.indices):
                raise ValueError(f"attribute {a.name!r} reads classifier output index {max(a.indices)} "
                                 f"but the classifier gives {source.shape[-1]} outputs")
            out[a.name] = source[:, list(a.indices)]
        return out

    def groups(self) -> tuple:
        """The alignment groups (see the module docstring)."""
        if self.form == "joint":
            return (self._group([a.name for a in self.attributes]),)
        # attributes linked by `given` are aligned together (union-find over declaration order)
        root = {a.name: a.name for a in self.attributes}

        def find(name):
            while root[name] != name:
                name = root[name]
            return name

        for a in self.attributes:
            for parent in a.given:
                root[find(a.name)] = find(parent)
        members = {}
        for a in self.attributes:
            members.setdefault(find(a.name), []).append(a.name)
        return tuple(self._group(names) for names in members.values())

    def _group(self, names) -> AlignmentGroup:
        attributes = [self.attribute(n) for n in names]
        position = {n: i for i, n in enumerate(names)}
        cells, target = [], []
        for cell in itertools.product(*[range(len(a.classes)) for a in attributes]):
            p = 1.0
            for a, k in zip(attributes, cell):
                p *= a.table[tuple(cell[position[g]] for g in a.given) + (k,)]
            cells.append(tuple(a.classes[k] for a, k in zip(attributes, cell)))
            target.append(p)
        return AlignmentGroup(tuple(names), tuple(len(a.classes) for a in attributes), tuple(cells),
                              torch.tensor(target, dtype=torch.float64))


def load_targets(config: Mapping) -> Targets:
    """`Targets.from_dict`: validate a YAML-parsed `targets` section."""
    return Targets.from_dict(config)


def _check_keys(config, allowed, where):
    if not isinstance(config, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(config).__name__}")
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _parse_attribute(spec, where, declared, normalize) -> Attribute:
    _check_keys(spec, {"name", "classes", "probabilities", "given"}, where)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
    if any(a.name == name for a in declared):
        raise ValueError(f"{where}.name: duplicate attribute name {name!r}")
    where = f"{where} ({name})"
    classes, indices = _parse_classes(spec.get("classes"), f"{where}.classes")
    given = spec.get("given", [])
    given = [given] if isinstance(given, str) else given
    if not isinstance(given, (list, tuple)) or not all(isinstance(g, str) for g in given):
        raise TypeError(f"{where}.given must be an attribute name or a list of them, got {given!r}")
    parents = []
    for g in given:
        if g == name:
            raise ValueError(f"{where}.given: an attribute cannot be conditioned on itself ({g!r})")
        parent = next((a for a in declared if a.name == g), None)
        if parent is None:
            raise ValueError(f"{where}.given: {g!r} is not a declared attribute; condition only on "
                             f"attributes declared before it: {[a.name for a in declared]}")
        if parent in parents:
            raise ValueError(f"{where}.given: {g!r} is listed twice")
        parents.append(parent)
    if "probabilities" not in spec:
        raise ValueError(f"{where}.probabilities is missing (a mapping class -> probability, or 'uniform')")
    table = _parse_table(spec["probabilities"], parents, classes, f"{where}.probabilities", normalize)
    return Attribute(name, classes, indices, tuple(given), table)


def _parse_classes(spec, where):
    if isinstance(spec, Mapping):
        pairs = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        pairs = []
        for i, item in enumerate(spec):
            _check_keys(item, {"name", "index"}, f"{where}[{i}]")
            pairs.append((item.get("name"), item.get("index")))
    else:
        raise TypeError(f"{where} must be a mapping {{class name: classifier index}} or a list of "
                        f"{{name, index}}, got {type(spec).__name__}")
    if not pairs:
        raise ValueError(f"{where}: empty attribute; declare at least two classes")
    if len(pairs) < 2:
        raise ValueError(f"{where}: only one class {[n for n, _ in pairs]}; declare at least two classes")
    names = [n for n, _ in pairs]
    for n, index in pairs:
        if not isinstance(n, str) or not n:
            raise ValueError(f"{where}: class names must be non-empty strings, got {n!r}{_yaml_bool_hint([n])}")
        if names.count(n) > 1:
            raise ValueError(f"{where}: duplicate class name {n!r}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{where}.{n}: the classifier output index must be an int >= 0, got {index!r}")
    indices = [i for _, i in pairs]
    if len(set(indices)) < len(indices):
        raise ValueError(f"{where}: two classes read the same classifier output index {indices}")
    return tuple(names), tuple(indices)


def _parse_table(spec, parents, classes, where, normalize):
    """[*K_parents, K] probabilities; a flat distribution is shared by every conditioning cell."""
    # keyed by the parent's classes, e.g. {male: uniform, ...}: known by its keys (one of them a parent class and
    # none a class of this attribute), so a table missing a cell is named as such, not read as a distribution
    per_cell = (bool(parents) and isinstance(spec, Mapping) and not set(spec) & set(classes)
                and bool(set(spec) & set(parents[0].classes)))
    flat = spec == "uniform" or (isinstance(spec, Mapping) and not per_cell
                                 and not any(isinstance(v, Mapping) for v in spec.values()))
    if flat:
        dist = _parse_distribution(spec, classes, where, normalize)
        return np.broadcast_to(dist, tuple(len(p.classes) for p in parents) + (len(classes),)).copy()
    if not parents:
        raise ValueError(f"{where}: expected a mapping class -> probability over {list(classes)} or 'uniform', "
                         f"got {spec!r}")
    _check_cells(spec, parents[0], where)
    return np.stack([_parse_table(spec[c], parents[1:], classes, f"{where}.{c}", normalize)
                     for c in parents[0].classes])


def _check_cells(spec, parent, where):
    if not isinstance(spec, Mapping) or set(spec) != set(parent.classes):
        got = sorted(spec, key=str) if isinstance(spec, Mapping) else spec  # YAML may have made a key a bool
        raise ValueError(f"{where}: a conditional table needs one entry per class of {parent.name!r} "
                         f"{list(parent.classes)}, got {got}{_yaml_bool_hint(got)}; or give one distribution for "
                         "every cell: a mapping class -> probability, or 'uniform'")


def _yaml_bool_hint(names) -> str:
    """A hint for names YAML turned into booleans (unquoted yes/no/on/off/true/false)."""
    if isinstance(names, (list, tuple)) and any(isinstance(n, bool) for n in names):
        return " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote such names, e.g. 'no')"
    return ""


def _parse_distribution(spec, classes, where, normalize):
    if spec == "uniform":
        return np.full(len(classes), 1.0 / len(classes))
    unknown = [c for c in spec if c not in classes]
    if unknown:
        raise ValueError(f"{where}: unknown class(es) {unknown}; classes are {list(classes)}"
                         f"{_yaml_bool_hint(unknown)}")
    missing = [c for c in classes if c not in spec]
    if missing:
        raise ValueError(f"{where}: no probability for class(es) {missing} (give 0 explicitly)")
    values = {}
    for c in classes:
        value = spec[c]
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 5e-1 (no dot) as a string; as the settings, accepted
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{where}.{c} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise TypeError(f"{where}.{c} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{where}.{c} is negative ({value}); probabilities must be >= 0")
        values[c] = float(value)
    dist = np.array([values[c] for c in classes])
    total = dist.sum()
    if total <= 0:
        raise ValueError(f"{where}: all probabilities are 0")
    if abs(total - 1.0) > SUM_TOLERANCE:
        if not normalize:
            raise ValueError(f"{where} sum to {total:.8g}, not 1 (tolerance {SUM_TOLERANCE}); fix them or "
                             f"set targets.normalize: true")
    return dist / total
