"""Labelled face folders for classifier training: FairFace- and CelebA-style label tables.

Tables: a CSV with a header (FairFace: ``file,age,gender,race,...``; CelebA as CSV:
``image_id,5_o_Clock_Shadow,...,Young`` with 1/-1), or CelebA's ``list_attr_celeba.txt`` (a count
line, a line of 40 names, then ``file v1 ... v40``). Attributes:
- ``gender``: a ``gender`` column (Male/Female, M/F) or CelebA's ``Male`` (1 / -1 or 0) -> female/male;
- ``race``: FairFace's seven races mapped to seed 0120's four groups (White, Middle Eastern,
  Latino_Hispanic -> WMELH; Black; Indian; East/Southeast Asian -> Asian), or the four names;
- ``age``: FairFace's buckets or a number (< 40 young, else old), or CelebA's ``Young`` column;
- ``celeba40``: all 40 CelebA columns, each no/yes;
- any other name: a column of class names (classes sorted: numerically when all are integers, else as text
  ignoring case).
  Names that differ only by case, surrounding spaces or an integer's leading zeros (``07``, ``7``) are one class,
  spelled as in its first row; an empty cell is refused.
Column names match ignoring case and surrounding spaces (``Gender``, `` gender``, ``File``). An image listed in
several rows is used once (``unique_rows``).
"""
import csv
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from fastfair.classifiers.heads import AGE, BINARY, CELEBA_ATTRIBUTES, GENDER, RACE, Attribute, AttributeHead

FILE_COLUMNS = ("file", "image_id", "filename", "image", "path")
RACE_GROUPS = {"white": "WMELH", "middle eastern": "WMELH", "latino hispanic": "WMELH", "wmelh": "WMELH",
               "east asian": "Asian", "southeast asian": "Asian", "asian": "Asian", "black": "Black",
               "indian": "Indian"}
GENDER_NAMES = {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female", "woman": "female"}
YOUNG_BUCKETS = {"0-2", "3-9", "10-19", "20-29", "30-39"}
OLD_BUCKETS = {"40-49", "50-59", "60-69", "more than 70", "70+"}
WHOLE_NUMBER = re.compile(r"(-?[0-9]+)(?:\.0*)?")  # an integer, or one with a zero fraction ("2.0"); ASCII digits


class LabelTable:
    """Rows of a label file: ``files`` [M], ``columns`` {name: [M] strings} and ``lines`` [M], each row's line in
    the file (1-based, as an editor numbers them; default: the header's line 1, then a row per line)."""

    def __init__(self, files: List[str], columns: Dict[str, List[str]], source: str,
                 lines: Optional[List[int]] = None):
        self.files, self.columns, self.source = files, columns, source
        self.lines = list(range(2, len(files) + 2)) if lines is None else list(lines)
        _check_distinct(list(columns), source)
        # header typed by hand: matched ignoring case and surrounding spaces
        self.folded: Dict[str, str] = {_header_key(name): name for name in columns}

    def __len__(self):
        return len(self.files)

    def find(self, name: str) -> Optional[str]:
        """The column called ``name`` (ignoring case and surrounding spaces), or None."""
        return name if name in self.columns else self.folded.get(_header_key(name))

    def has(self, name: str) -> bool:
        return self.find(name) is not None

    def where(self, rows: Sequence[int]) -> str:
        """'line L' or 'N rows (e.g. lines L1, ...)' of row indices ``rows``, for the messages."""
        if len(rows) == 1:
            return f"line {self.lines[rows[0]]}"
        return f"{len(rows)} rows (e.g. lines {', '.join(str(self.lines[row]) for row in rows[:5])})"

    def column(self, name: str) -> List[str]:
        if not self.has(name):
            raise ValueError(f"{self.source} has no column {name!r}; its columns are {sorted(self.columns)}")
        return self.columns[self.find(name)]


def _header_key(name: str) -> str:
    return name.strip().casefold()


def _check_distinct(header: Sequence[str], source: str) -> None:
    """Refuse a header naming a column twice (typed by hand: names match ignoring case and surrounding spaces)."""
    seen: Dict[str, int] = {}
    for index, name in enumerate(header):
        if not name.strip():  # unnamed columns (a spreadsheet's trailing commas) are not read
            continue
        first = seen.setdefault(_header_key(name), index)
        if first != index:
            raise ValueError(f"{source}: columns {header[first]!r} and {name!r} are one name (column names match "
                             "ignoring case and surrounding spaces); rename or delete one")


def read_label_table(path: str) -> LabelTable:
    """Parse a CSV with a header, or CelebA's whitespace-separated attribute list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark, as Excel writes
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                         "save the table as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    lines = text.splitlines()
    skipped = 0  # blank lines before the header: csv took the first as an empty header
    while lines and not lines[0].strip():
        lines.pop(0)
        skipped += 1
    if lines and lines[0].strip().isdigit():  # list_attr_celeba.txt
        if len(lines) < 2:
            raise ValueError(f"{path}: a count line and nothing else; CelebA's attribute list has a line of "
                             "attribute names next, then a row per file")
        names = lines[1].split()
        _check_distinct(names, path)
        numbered = [(skipped + 3 + i, line.split()) for i, line in enumerate(lines[2:]) if line.strip()]
        rows = [r for _, r in numbered]
        bad = [f"line {number} ({r[0]})" for number, r in numbered if len(r) != len(names) + 1][:3]
        if bad:
            raise ValueError(f"{path}: {', '.join(bad)} do not have a file name and {len(names)} values")
        return LabelTable([r[0] for r in rows], {n: [r[i + 1] for r in rows] for i, n in enumerate(names)}, path,
                          [number for number, _ in numbered])
    reader = csv.DictReader(lines)
    header = [name.strip() for name in reader.fieldnames or []]
    _check_distinct(header, path)  # a dict of columns keeps the last of a repeated name
    reader.fieldnames = header
    file_column = next((name for wanted in FILE_COLUMNS for name in header if _header_key(name) == wanted), None)
    if file_column is None:
        first = lines[0] if lines else ""
        separator = next((name for char, name in (("\t", "tabs"), (";", "semicolons")) if char in first), None)
        hint = f" (its columns look separated by {separator}: save it comma-separated)" if separator else ""
        raise ValueError(f"{path}: no file-name column; expected one of {FILE_COLUMNS}, found {header}{hint}")
    rows, numbers, read = [], [], reader.line_num  # read: the lines csv has consumed (a quoted cell spans several)
    for row in reader:
        first = read + 1
        while first < reader.line_num and lines[first - 1] == "":  # csv skips empty lines (not blank ones)
            first += 1
        rows.append(row)
        numbers.append(skipped + first)
        read = reader.line_num
    files = [(row[file_column] or "").strip() for row in rows]
    if "" in files:
        raise ValueError(f"{path}, line {numbers[files.index('')]}: no file name in column {file_column!r}; fill it "
                         "in or delete the row")
    columns = {c: [(row[c] or "").strip() for row in rows] for c in header if c and c != file_column}
    return LabelTable(files, columns, path, numbers)


def _normalized(value: str) -> str:
    return " ".join(value.replace("_", " ").replace("-", " ").lower().split())


def _lookup(table: LabelTable, column: str, mapping, classes, where: str, accepted: Optional[str] = None
            ) -> List[int]:
    """Class indices of the table's ``column`` read by ``mapping``; accepted: what the message says it reads
    (default: one of the classes)."""
    values = table.column(column)
    names = [mapping(value) for value in values]
    bad = [row for row, name in enumerate(names) if name is None]
    if bad:  # all of them at once: one rerun per bad row would be no way to clean a table
        shown = sorted({"an empty cell" if not values[row].strip() else repr(values[row]) for row in bad})
        more = ", ..." if len(shown) > 5 else ""
        raise ValueError(f"{where}, {table.where(bad)}: cannot read {', '.join(shown[:5])}{more} "
                         f"as {accepted or f'one of {classes}; map them to a class or delete those rows'}")
    return [classes.index(name) for name in names]


def _celeba_flag(value: str):
    return {"1": "yes", "-1": "no", "0": "no"}.get(class_key(value))


# what an attribute named as CelebA's (its exact spelling) reads; other spellings read class names
CELEBA_FLAGS = ("a CelebA flag (1 = yes; -1 or 0 = no), as an attribute named as CelebA's is read; to read its "
                "values as class names instead, name the attribute in lower case (e.g. smiling)")


CELEBA_COLUMN = {"gender": "Male", "age": "Young"}  # CelebA's column read for an attribute a table lacks


def _age_group(value: str):
    text = value.strip().lower()
    if text in YOUNG_BUCKETS or text in {"young"}:
        return "young"
    if text in OLD_BUCKETS or text in {"old"}:
        return "old"
    try:
        age = float(text)
    except ValueError:
        return None
    # 'nan' (a float column written as text) and 'inf' read as floats: an age they are not
    return None if not math.isfinite(age) else "young" if age < 40 else "old"


def attribute_labels(table: LabelTable, name: str) -> Tuple[Attribute, List[int]]:
    """One attribute's classes and per-row class indices (see the module docstring for the rules)."""
    where = f"{table.source}, attribute {name!r}"
    if name in ("gender", "age") and not table.has(name) and not table.has(CELEBA_COLUMN[name]):
        raise ValueError(f"{where}: needs a column {name!r} or CelebA's {CELEBA_COLUMN[name]!r}; the table's columns "
                         f"are {sorted(table.columns)} (rename the one that holds it)")
    if name == "gender":
        if table.has("gender"):
            return Attribute("gender", GENDER), _lookup(table, "gender", lambda v: GENDER_NAMES.get(
                v.strip().lower()), GENDER, where)
        flags = _lookup(table, "Male", _celeba_flag, BINARY, where + " (CelebA column 'Male')")
        return Attribute("gender", GENDER), flags  # no=female (0), yes=male (1)
    if name == "race":
        return Attribute("race", RACE), _lookup(table, "race", lambda v: RACE_GROUPS.get(_normalized(v)),
                                                RACE, where)
    if name == "age":
        if table.has("age"):
            return Attribute("age", AGE), _lookup(table, "age", _age_group, AGE, where)
        young = _lookup(table, "Young", _celeba_flag, BINARY, where + " (CelebA column 'Young')")
        return Attribute("age", AGE), [1 - flag for flag in young]  # Young=1 -> young (0)
    values = table.column(name)
    empty = [row for row, value in enumerate(values) if not value.strip()]
    if empty:
        raise ValueError(f"{table.source}, column {table.find(name)!r}: line {table.lines[empty[0]]} is empty "
                         f"({len(empty)} empty row(s) in all); give every row a class or delete the rows")
    spelling: Dict[str, str] = {}  # class key -> the first row's spelling
    for value in values:
        spelling.setdefault(class_key(value), value.strip())
    # numerically when all are integers (2.0 too), else in text order ignoring case: ('-1', '10', '9', 'b')
    numeric = all(WHOLE_NUMBER.fullmatch(v) for v in spelling.values())
    distinct = sorted(spelling.values(), key=(lambda v: int(class_key(v))) if numeric else class_key)
    if len(distinct) < 2:
        raise ValueError(f"{where}: needs at least 2 distinct values, found {distinct}")
    index = {class_key(v): i for i, v in enumerate(distinct)}
    return Attribute(name, tuple(distinct)), [index[class_key(v)] for v in values]


def class_key(name: str) -> str:
    """What identifies a class name: case, surrounding spaces, an integer's leading zeros and a zero fraction are
    typing, not meaning (``Dark `` is ``dark``, ``07`` is ``7``, ``-0`` is ``0``, ``2.0`` is ``2``: pandas writes
    an integer column holding a NaN as floats)."""
    name = name.strip()
    whole = WHOLE_NUMBER.fullmatch(name)
    return str(int(whole[1])) if whole else name.casefold()


def resolve_labels(table: LabelTable, names: Sequence[str]) -> Tuple[AttributeHead, torch.Tensor]:
    """(head, labels [M, A] long) for attribute names; ``celeba40`` expands to the 40 CelebA attributes."""
    if "celeba40" in names and len(names) > 1:
        raise ValueError(f"attributes {list(names)}: celeba40 (CelebA's 40 columns) stands alone; name the CelebA "
                         "columns wanted instead, with the other attributes")
    names = list(CELEBA_ATTRIBUTES) if list(names) == ["celeba40"] else list(names)
    attributes, columns = [], []
    for name in names:
        if name in CELEBA_ATTRIBUTES and table.has(name):
            attribute = Attribute(name, BINARY)
            labels = _lookup(table, name, _celeba_flag, BINARY, f"{table.source}, column {table.find(name)!r}",
                             CELEBA_FLAGS)
        else:
            attribute, labels = attribute_labels(table, name)
        attributes.append(attribute)
        columns.append(labels)
    return AttributeHead(attributes), torch.tensor(columns, dtype=torch.long).T.reshape(len(table), len(names))


def _row_labels(head: AttributeHead, labels: torch.Tensor, only=None) -> str:
    return ", ".join(f"{a.name}={a.classes[int(i)]}" for k, (a, i) in enumerate(zip(head.attributes, labels))
                     if only is None or k in only)


def file_key(name: str, root: Optional[str] = None) -> str:
    """What identifies a row's image: ``./a.png`` and ``a.png`` are one file; with the images' folder ``root``,
    so are ``a.png`` and ``<root>/a.png`` (absolute)."""
    return os.path.normpath(name) if root is None else os.path.abspath(os.path.join(root, name))


def unique_rows(table: LabelTable, head: AttributeHead, labels: torch.Tensor, root: Optional[str] = None
                ) -> List[int]:
    """The table's rows with one per image file (its first): a file listed again with the same labels would weigh
    double and, split by row, land in both the training and the validation split; listed with other labels it is
    refused, naming both rows."""
    first: Dict[str, int] = {}
    for row, name in enumerate(table.files):
        earlier = first.setdefault(file_key(name, root), row)
        if earlier != row and not torch.equal(labels[earlier], labels[row]):
            differ = set((labels[earlier] != labels[row]).nonzero().flatten().tolist())
            raise ValueError(f"{table.source}: {name} is listed on lines {table.lines[earlier]} "
                             f"({_row_labels(head, labels[earlier], differ)}) and {table.lines[row]} "
                             f"({_row_labels(head, labels[row], differ)}) with different labels; keep the right one")
    return sorted(first.values())


def read_group_file(path: str, root: Optional[str] = None) -> Dict[str, str]:
    """{file_key(image, root): group} from ``path``: lines ``image group`` (CelebA's identity_CelebA.txt; the group
    is the last word, so an image name may hold spaces), or a CSV with a file-name column and one other column.
    Refused, naming the lines, where a line is not such a pair or an image is given two groups."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--groups {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                         f"{error.start}); save it as UTF-8") from None
    if "," in next((line for line in lines if line.strip()), ""):
        try:
            table = read_label_table(path)
        except ValueError as error:  # e.g. no header: its message names the file, not the flag
            raise ValueError(f"--groups {error} (a group CSV has a header, e.g. 'file,group')") from None
        if len(table.columns) != 1:
            raise ValueError(f"--groups {path}: a group table has a file-name column and one group column; its "
                             f"other columns are {sorted(table.columns)}")
        pairs = list(zip(table.lines, table.files, next(iter(table.columns.values()))))
    else:
        pairs = [(number, *(line.rsplit(None, 1) + [""])[:2]) for number, line in enumerate(lines, 1) if line.strip()]
    first: Dict[str, Tuple[str, int]] = {}  # image -> (its group, the line giving it first)
    for number, name, group in pairs:
        name, group = name.strip(), group.strip()
        if not name or not group:
            raise ValueError(f"--groups {path}, line {number}: expected an image file name and its group (e.g. "
                             "'000001.jpg 2880', or under a CSV's 'file,group' header '000001.jpg,2880'), found one of "
                             "them only")
        earlier, line = first.setdefault(file_key(name, root), (group, number))
        if earlier != group:
            raise ValueError(f"--groups {path}: {name} is given group {earlier!r} on line {line} and {group!r} on "
                             f"line {number}; keep the right one")
    return {key: group for key, (group, _) in first.items()}


def row_groups(spec: str, table: LabelTable, root: Optional[str] = None) -> List[str]:
    """Each row's group, e.g. the person its photo shows, from ``spec`` (``--groups``): a column of ``table``, or a
    file ``read_group_file`` reads. Refused, naming the rows, where a row has none."""
    if table.has(spec):
        groups = table.column(spec)
        empty = [row for row, group in enumerate(groups) if not group]
        if empty:
            raise ValueError(f"--groups {spec}: {table.source}, {table.where(empty)}: no group in column "
                             f"{table.find(spec)!r}; fill it in or delete the row")
        return list(groups)
    if not os.path.isfile(spec):
        raise ValueError(f"--groups {spec}: neither a column of {table.source} (its columns are "
                         f"{sorted(table.columns)}) nor a file; name the column or the file that gives each image's "
                         "group (e.g. CelebA's identity_CelebA.txt)")
    mapping = read_group_file(spec, root)
    groups = [mapping.get(file_key(name, root)) for name in table.files]
    missing = [row for row, group in enumerate(groups) if group is None]
    if missing:
        raise ValueError(f"--groups {spec}: no group for the image of {table.source}, {table.where(missing)} "
                         f"({table.files[missing[0]]}); list every image in it")
    return groups


def align_labels(head: AttributeHead, other: AttributeHead, labels: torch.Tensor, where: str) -> torch.Tensor:
    """``labels`` [M, A] of classes ``other`` re-indexed to ``head``'s classes (matched as ``class_key``); refused,
    naming the classes, unless both name the same classes (custom attributes' classes come from the rows)."""
    columns, problems = [], []
    for a, (attribute, theirs) in enumerate(zip(head.attributes, other.attributes)):
        index = {class_key(c): i for i, c in enumerate(attribute.classes)}
        keys = [class_key(c) for c in theirs.classes]
        missing = [c for c in attribute.classes if class_key(c) not in keys]
        extra = [c for c in theirs.classes if class_key(c) not in index]
        if missing:
            problems.append(f"{attribute.name} lacks {', '.join(missing)}")
        if extra:
            problems.append(f"{attribute.name} has {', '.join(extra)}, which the training rows lack")
        columns.append(torch.tensor([index.get(k, -1) for k in keys], dtype=torch.long)[labels[:, a]])
    if problems:
        raise ValueError(f"{where}: the classes differ from the training table's ({'; '.join(problems)}); both "
                         "tables need rows of every class")
    return torch.stack(columns, dim=1)


def load_face_image(path: str, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: the centre square, resized to ``size`` (antialiased). The square is cut from the
    source, not from the whole image resized first: a 1 x 4000 image would be resized to 224 x 896000."""
    from PIL import Image

    from fastfair.image_files import open_image, to_rgb

    try:
        with open_image(path) as image:
            image = to_rgb(image, path)
            side = min(image.size)
            left, top = (image.width - side) / 2, (image.height - side) / 2
            image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
            rgb = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1


def image_problem(path: str) -> Optional[str]:
    """Why the image at ``path`` cannot be decoded (a truncated or corrupt file), or None. A JPEG is decoded at
    reduced scale (its draft mode reads the whole file at a fraction of the cost)."""
    from fastfair.image_files import open_image, to_rgb

    try:
        with open_image(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (1, 1))
            image.load()
            to_rgb(image, path)
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises SyntaxError on some malformed headers
        return str(error) or type(error).__name__
    return None


class LabelledFaces(Dataset):
    """(image [3, S, S] in [-1, 1], labels [A] long) for the table's rows ``indices``."""

    def __init__(self, root: str, table: LabelTable, labels: torch.Tensor, indices: Sequence[int], size: int):
        self.root, self.table, self.labels, self.indices, self.size = root, table, labels, list(indices), size

    def missing_files(self) -> List[str]:
        """The rows' image files that do not exist (checked before training: a missing one would end the run
        mid-epoch)."""
        return [name for name in (self.table.files[row] for row in self.indices)
                if not os.path.isfile(os.path.join(self.root, name))]

    def paths(self) -> List[str]:
        return [os.path.join(self.root, self.table.files[row]) for row in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        row = self.indices[item]
        return load_face_image(os.path.join(self.root, self.table.files[row]), self.size), self.labels[row]
