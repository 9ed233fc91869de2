"""README.md stays true as the code changes.

The README is the project's manual: its commands are copied and run as written, so a renamed flag, config key,
file, module or make target that it still names is a bug a reader meets first. These tests read README.md and
check what its code (inline `...` spans, fenced and indented code blocks) names against the repository itself:

1. repository paths (bench/, configs/, fastfair/, kernels/, csrc/, tests/, Makefile, setup.py, ...) exist, and so
   do the package files ``pkg://fastfair...`` names;
2. dotted config keys (``sampler.grad_steps``, ``data.sets.<n>.file``, ``optim.*``, ``keep_every=1000``) resolve
   in fastfair.config's schema, as an override ``key=value`` would;
3. every ``--flag`` of a command line (``python -m fastfair.X``, ``python fastfair/train.py`` and its
   torchrun/deepspeed launches, ``python bench/Y.py``, ``make demo ARGS="..."``) is an option of that program's
   argparse parser; a flag quoted in prose, away from its command (``--steps 30``, ``--rank SET``), is only
   checked against the union of the parsers of every program the README runs;
4. modules and names (``python -m fastfair.X``, ``fastfair.dft.sample``, ``fastfair.toy:detect_faces``) import
   and resolve, and every ``make TARGET`` is a rule of the Makefile;
5. the ```python example's calls to what it imports from fastfair bind to those functions' signatures.

Nothing here lists the README's current contents (but for FOREIGN_FLAGS, the flags of other programs that it
quotes in prose): everything is derived from README.md, the Makefile and the code, so renaming any of them without
the README fails a test. Each check is a function of the README text, so the tests at the end feed each one a
deliberately wrong line, and the real README with names renamed, and assert it is reported. The parsers are read in
process, without running anything: ``argparse.ArgumentParser.parse_known_args`` is patched to raise with the
parser when the program's ``main`` reaches it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import fnmatch
import glob
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
import typing
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Tuple
from unittest import mock

import yaml

from fastfair import config as run_config
from fastfair.hooks import PACKAGE_SCHEME, load_callable, resolve_package_path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# What names a file or folder of the repository (check 1): a path under one of these folders, or a top-level file.
REPO_FOLDERS = ("bench/", "configs/", "fastfair/", "kernels/", "csrc/", "tests/")
REPO_FILES = ("Makefile", "setup.py", "pyproject.toml", "constraints*.txt", ".ci/run")
# Outputs and placeholders, not files of the repository: a path part equal to one of these, containing one of the
# markers or starting with `step_` (a checkpoint's step_N/, step_*/; not bench/results/train_step_cpu.md).
PLACEHOLDER_PARTS = {"out", "runs", "OUTPUT_DIR", "RUN_DIR", "RUN", "DIR", "OUT_DIR"}
PLACEHOLDER_MARKERS = ("<", "NAME", "N.png")
PLACEHOLDER_PREFIX = "step_"
# File extensions: `config.yaml` or `selection.json` is a file name, not a dotted config key (check 2).
FILE_EXTENSIONS = {"json", "jsonl", "yaml", "yml", "md", "png", "py", "pt", "pth", "csv", "html", "txt", "toml",
                   "safetensors", "ckpt", "sh", "so", "whl", "tgz", "bin"}
# Check 3: commands of other programs, whose flags are theirs (pip's --no-deps, nvcc's --ptx), and launchers
# whose own flags come before the script they start (torchrun --nproc_per_node=8 fastfair/train.py ...).
EXTERNAL_PROGRAMS = {"pip", "pip3", "nvcc", "srun", "sbatch", "git", "apt-get", "conda", "bash", "sh"}
LAUNCHERS = {"torchrun", "deepspeed"}
PYTHONS = {"python", "python3"}
# Flags the README quotes in prose for programs that are not fastfair's: excluded from the union check.
FOREIGN_FLAGS = {
    "--signal": "Slurm's srun/sbatch option (how to stop a run before its time limit)",
    "--max_grad_norm": "the public reference scripts' flag (that fastfair does not clip by default)",
}


# ----------------------------------------------------------------------------- reading the README

class Span(NamedTuple):
    """A piece of README text: `kind` is "block" (one line of a fenced or indented code block), "inline" (an
    inline code span, its line breaks made spaces) or "prose" (text outside both); `line`: where it starts."""
    line: int
    text: str
    kind: str


def read_readme() -> str:
    return README.read_text(encoding="utf-8")


_INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)


def _paragraph_spans(lines: List[str], first: int) -> Iterator[Span]:
    text = "\n".join(lines)
    at = 0
    for match in _INLINE.finditer(text):
        if match.start() > at:
            yield Span(first + text.count("\n", 0, at), text[at:match.start()], "prose")
        yield Span(first + text.count("\n", 0, match.start()), match.group(2).replace("\n", " ").strip(), "inline")
        at = match.end()
    if at < len(text):
        yield Span(first + text.count("\n", 0, at), text[at:], "prose")


def markdown_spans(text: str) -> List[Span]:
    """The README cut into code block lines, inline code spans and prose (CommonMark's rules, as far as the
    README uses them: ``` fences, 4-space indented blocks after a blank line, backtick runs)."""
    spans: List[Span] = []
    paragraph: List[str] = []
    start = 0
    fence: Optional[str] = None
    previous_blank, in_indented = True, False

    def flush() -> None:
        spans.extend(_paragraph_spans(paragraph, start))
        paragraph.clear()

    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            else:
                spans.append(Span(number, line, "block"))
            continue
        if stripped.startswith("```") or stripped.startswith("~~~"):
            flush()
            fence = stripped[:3]
            previous_blank = in_indented = False
            continue
        if not stripped:
            flush()
            previous_blank = True
            continue
        if (line.startswith("    ") or line.startswith("\t")) and (previous_blank or in_indented) and not paragraph:
            spans.append(Span(number, line.strip(), "block"))
            previous_blank, in_indented = False, True
            continue
        if not paragraph:
            start = number
        paragraph.append(line)
        previous_blank = in_indented = False
    flush()
    return spans


def code_spans(text: str) -> List[Span]:
    return [span for span in markdown_spans(text) if span.kind != "prose"]


def shell_words(text: str) -> List[str]:
    """text split as a shell would (quotes and a trailing # comment removed), or on whitespace where its quotes
    do not pair up."""
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return re.sub(r"(^|\s)#.*", "", text).split()


_SEPARATORS = re.compile(r"\s*(?:&&|\|\||;|\s\|\s)\s*")


def shell_commands(text: str) -> List[str]:
    """A code span's commands: `a && b; c | d` -> [a, b, c, d]."""
    return [part for part in _SEPARATORS.split(text) if part.strip()]


def _strip(token: str) -> str:
    """A word with the prose punctuation around it removed (a trailing '/' kept: it says 'folder')."""
    return token.strip("\"'").lstrip("(").rstrip(",;:.)\"'")


def where(span: Span) -> str:
    return f"README.md:{span.line}"


# ----------------------------------------------------------------------------- 1. repository paths

def expand_braces(text: str) -> List[str]:
    """Shell brace expansion: 'a{1,2}b{x,y}' -> ['a1bx', 'a1by', 'a2bx', 'a2by']."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", text)
    if not match:
        return [text]
    return [expanded for choice in match.group(1).split(",")
            for expanded in expand_braces(text[:match.start()] + choice + text[match.end():])]


def names_repo_path(token: str) -> bool:
    return token.startswith(REPO_FOLDERS) or any(fnmatch.fnmatchcase(token, name) for name in REPO_FILES)


def is_placeholder(path: str) -> bool:
    return any(marker in path for marker in PLACEHOLDER_MARKERS) or any(
        part in PLACEHOLDER_PARTS or part.startswith(PLACEHOLDER_PREFIX) for part in path.split("/"))


def path_problems(text: str, root: Path = ROOT) -> List[str]:
    """Every repository path that a code span names must exist (a trailing '/': as a folder; a '*': matching
    something); `pkg://fastfair.../path` must name a file shipped in the package."""
    problems = []
    for span in code_spans(text):
        for word in span.text.split():
            for token in {_strip(word), _strip(word.split("=", 1)[-1])}:
                if token.startswith(PACKAGE_SCHEME + "fastfair"):
                    location = Path(resolve_package_path(token, where(span)))
                    if not location.exists():
                        problems.append(f"{where(span)}: `{token}` -> {location} does not exist")
                    continue
                if not names_repo_path(token) or is_placeholder(token):
                    continue
                for path in expand_braces(token):
                    if "*" in path:
                        if not glob.glob(str(root / path)):
                            problems.append(f"{where(span)}: `{token}`: {path} matches nothing")
                    elif not (root / path).exists():
                        problems.append(f"{where(span)}: `{token}`: {path} does not exist")
                    elif path.endswith("/") and not (root / path).is_dir():
                        problems.append(f"{where(span)}: `{token}`: {path} is not a folder")
    return sorted(set(problems))


# ----------------------------------------------------------------------------- 2. config keys

_KEY = re.compile(r"(?P<key>[a-z_][a-z0-9_]*(?:\.(?:[A-Za-z0-9_]+|<\w+>|\*))*)(?P<sep>=|:|$)(?P<value>.*)")


def config_fields() -> List[str]:
    return list(typing.get_type_hints(run_config.TrainConfig))


def config_key_candidates(token: str) -> Optional[Tuple[str, str, str]]:
    """(key, separator, value) if token is written as a run config key, else None: a dotted name whose first part
    is a field of TrainConfig or close to one (so a renamed section is reported, not ignored), or a top-level field
    written `key=value`; file names (`config.yaml`) and dotted names of importable modules are not keys."""
    match = _KEY.fullmatch(token)
    if not match:
        return None
    key, sep, value = match.group("key", "sep", "value")
    parts = key.split(".")
    fields = config_fields()
    if len(parts) == 1:
        return (key, sep, value) if sep == "=" and key in fields else None
    if parts[-1] in FILE_EXTENSIONS:
        return None
    if parts[0] in fields:
        return key, sep, value
    if importlib.util.find_spec(parts[0]) is None and difflib.get_close_matches(parts[0], fields, n=1):
        return key, sep, value
    return None


def key_problem(key: str) -> Optional[str]:
    """Why `key` (dotted; `<n>` or `NAME` for a mapping's key, a final `*` for a whole section) is not a key of
    the run config, or None. Resolved as overrides and resume_allow are (fastfair.config._field_type)."""
    parts = key.split(".")
    section = parts[-1] == "*"
    try:
        tp = run_config._field_type(parts[:-1] if section else parts)
    except run_config.ConfigError as error:
        return str(error)
    if section and not (dataclasses.is_dataclass(tp) or run_config._mapping_arm(tp) is not None or tp is typing.Any):
        return f"'{'.'.join(parts[:-1])}' is not a section (it is {run_config._type_name(tp)})"
    return None


def config_key_spans(text: str) -> Iterator[Span]:
    """The spans whose words may be config keys: inline code, and the lines of code blocks that run one of
    fastfair's programs (whose `key=value` words are overrides), never Python code's keyword arguments."""
    for span in code_spans(text):
        if span.kind == "inline" or any(classify(shell_words(command)).kind in ("module", "script", "make")
                                        for command in shell_commands(span.text)):
            yield span


def config_key_problems(text: str) -> List[str]:
    """Every dotted config key a code span names (optionally `=value` or `: value`) resolves in the schema;
    `resume_allow=[...]`'s items are keys too."""
    problems = []
    for span in config_key_spans(text):
        for word in span.text.split():
            found = config_key_candidates(_strip(word) if "=" not in word else word.rstrip(",;)"))
            if found is None:
                continue
            key, sep, value = found
            keys = [key]
            if key == "resume_allow" and sep == "=":  # validate() resolves each item as a key
                items = yaml.safe_load(value) if value else []
                keys += [str(item) for item in (items if isinstance(items, list) else [items])]
            for name in keys:
                problem = key_problem(name)
                if problem:
                    problems.append(f"{where(span)}: `{word}`: {problem}")
    return problems


# ----------------------------------------------------------------------------- 3. command-line flags

class Command(NamedTuple):
    """One shell command of a code span. kind: "module" (python -m fastfair.X), "script" (python/torchrun/
    deepspeed path.py), "make", "foreign" (another program: its flags are not fastfair's) or "other"
    (a fragment such as `--iters N` or `evaluate --detector`); args: the words after the program."""
    kind: str
    program: str
    args: List[str]


_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def classify(words: List[str]) -> Command:
    rest = list(words)
    while rest and _ASSIGNMENT.match(rest[0]):  # FASTFAIR_BUILD_NATIVE=1 pip ...
        rest.pop(0)
    if not rest:
        return Command("other", "", words)
    head = rest[0]
    if head in PYTHONS or head.endswith("/python"):
        if rest[1:2] == ["-m"] and len(rest) > 2:
            module = rest[2]
            kind = "module" if module == "fastfair" or module.startswith("fastfair.") else "foreign"
            return Command(kind, module, rest[3:])
        if len(rest) > 1 and rest[1].endswith(".py"):
            return Command("script", rest[1], rest[2:])
        return Command("foreign", head, rest[1:])
    if head in LAUNCHERS:
        script = next((i for i, word in enumerate(rest) if word.endswith(".py")), None)
        if script is None:
            return Command("foreign", head, rest[1:])
        return Command("script", rest[script], rest[script + 1:])
    if head == "make":
        return Command("make", head, rest[1:])
    if head in EXTERNAL_PROGRAMS:
        return Command("foreign", head, rest[1:])
    return Command("other", head, words)


def makefile_rules(makefile: Path = ROOT / "Makefile") -> Dict[str, List[str]]:
    """target -> its recipe lines (special targets such as .PHONY left out)."""
    rules: Dict[str, List[str]] = {}
    current: List[str] = []
    for line in makefile.read_text().splitlines():
        if line.startswith("\t"):
            current.append(line.strip())
            continue
        match = re.match(r"([^\s:#=][^:=]*?)\s*:(?!=)", line)
        if match and not line.startswith("."):
            current = []
            for target in match.group(1).split():
                rules.setdefault(target, current)
        elif line.strip() and not line.startswith("#"):
            current = []
    return rules


def make_args_program(target: str) -> Optional[Command]:
    """The command a make target hands its ARGS to (`demo: ... python -m fastfair.demo $(ARGS)`), if any."""
    for line in makefile_rules().get(target, []):
        if "$(ARGS)" in line:
            return classify(shell_words(line.replace("$(ARGS)", "")))  # $(BIN)/python -m ...: a python
    return None


class _Unavailable(LookupError):
    """A program that cannot be imported here for want of an optional package: its flags go unchecked."""


class _ParserReached(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser reached")
        self.parser = parser


def _raise_parser(self, *args, **kwargs):
    raise _ParserReached(self)


@contextlib.contextmanager
def _restored_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def _load_program(program: str, kind: str):
    """The module of `python -m program` or of the script file `program` (loaded under a private name, as
    bench scripts are not a package; the folders they put on sys.path are taken off again)."""
    if kind == "module":
        return importlib.import_module(program)
    path = ROOT / program
    name = "_readme_cli_" + re.sub(r"\W", "_", program)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with _restored_sys_path():
        spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def program_parser(kind: str, program: str) -> argparse.ArgumentParser:
    """The argparse parser of a program, read in process: its main() is called with no arguments and stopped
    where it parses them. Raises LookupError saying why when that is impossible."""
    if kind == "script" and not (ROOT / program).is_file():
        raise LookupError(f"{program} does not exist")
    try:
        module = _load_program(program, kind)
    except ImportError as error:
        if _optional_missing(error):
            raise _Unavailable(f"{program} needs the absent optional package {error.name}") from None
        raise LookupError(f"cannot import {program}: {error}") from None
    main = getattr(module, "main", None)
    if not callable(main):
        raise LookupError(f"{program} has no main() to read its parser from")
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", _raise_parser), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_intermixed_args", _raise_parser), \
            _restored_sys_path():
        try:
            main([]) if inspect.signature(main).parameters else main()
        except _ParserReached as reached:
            return reached.parser
        except BaseException as error:  # noqa: B902 - any other end means main() did not parse first
            raise LookupError(f"{program}'s main() ended before parsing its arguments ({error!r})") from None
    raise LookupError(f"{program}'s main() returned without parsing arguments")


def parser_options(parser: argparse.ArgumentParser) -> FrozenSet[str]:
    return frozenset(parser._option_string_actions)


def flag_name(word: str) -> Optional[str]:
    match = re.match(r"--[A-Za-z][A-Za-z0-9_-]*", word)
    return match.group() if match else None


_FLAG_ANYWHERE = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_-]*")


class CommandFlags(NamedTuple):
    span: Span
    text: str
    kind: str
    program: str
    flags: List[str]


def command_flags(text: str) -> Tuple[List[CommandFlags], List[Tuple[Span, str]]]:
    """(the flags of each command of a fastfair program, the flags found anywhere else): a launcher's own flags
    and those of other programs' commands are in neither."""
    commands: List[CommandFlags] = []
    loose: List[Tuple[Span, str]] = []
    for span in markdown_spans(text):
        if span.kind == "prose":
            loose += [(span, flag) for flag in _FLAG_ANYWHERE.findall(span.text)]
            continue
        for part in shell_commands(span.text):
            command = classify(shell_words(part))
            if command.kind in ("module", "script"):
                flags = [flag_name(word) for word in command.args]
                commands.append(CommandFlags(span, part, command.kind, command.program, [f for f in flags if f]))
            elif command.kind == "make":
                targets = [word for word in command.args if not _ASSIGNMENT.match(word) and not word.startswith("-")]
                args = [word.split("=", 1)[1] for word in command.args if word.startswith("ARGS=")]
                flags = [flag_name(word) for value in args for word in shell_words(value)]
                runs = [make_args_program(target) for target in targets]
                for run in [run for run in runs if run is not None and run.kind in ("module", "script")]:
                    commands.append(CommandFlags(span, part, run.kind, run.program, [f for f in flags if f]))
                if not any(run is not None for run in runs):
                    loose += [(span, flag) for flag in flags if flag]
            elif command.kind == "other":
                loose += [(span, flag) for flag in _FLAG_ANYWHERE.findall(part)]
    return commands, loose


def flag_problems(text: str) -> Tuple[List[str], List[str]]:
    """(problems, skipped): every flag of a command line is an option of that command's program; every other flag
    (in prose, or a fragment like `--rank SET`) is an option of at least one program the README runs (the union of
    their parsers), unless FOREIGN_FLAGS says whose it is. A program that needs an absent optional package is
    skipped."""
    commands, loose = command_flags(text)
    problems: List[str] = []
    skipped: List[str] = []
    union = set()
    for command in commands:
        try:
            options = parser_options(program_parser(command.kind, command.program))
        except _Unavailable as error:
            skipped.append(f"{where(command.span)}: {error}")
            continue
        except LookupError as error:
            problems.append(f"{where(command.span)}: `{command.text}`: {error}")
            continue
        union |= options
        for flag in command.flags:
            if flag not in options:
                guess = difflib.get_close_matches(flag, sorted(options), n=1)
                hint = f" (did you mean {guess[0]}?)" if guess else ""
                problems.append(f"{where(command.span)}: {flag} is not an option of {command.program}{hint}: "
                                f"`{command.text}`")
    for span, flag in loose:
        if flag not in union and flag not in FOREIGN_FLAGS:
            guess = difflib.get_close_matches(flag, sorted(union), n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            problems.append(f"{where(span)}: {flag} is an option of none of the README's programs{hint}")
    return problems, skipped


# ----------------------------------------------------------------------------- 4. modules, names, make targets

def _optional_missing(error: ImportError) -> bool:
    """An ImportError for a package outside fastfair (an optional dependency absent here)."""
    name = getattr(error, "name", None) or ""
    return bool(name) and name.split(".")[0] != "fastfair"


def resolve_name(dotted: str) -> object:
    """`fastfair.a.b.c`: the longest importable module prefix, then getattr for the rest; `pkg.mod:attr` too."""
    if ":" in dotted:
        return load_callable(dotted, "name")
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            spec = importlib.util.find_spec(module_name)
        except ImportError:
            spec = None
        if spec is None:
            continue
        thing = importlib.import_module(module_name)
        for attribute in parts[cut:]:
            thing = getattr(thing, attribute)  # AttributeError: the name is not there
        return thing
    raise ModuleNotFoundError(f"no module named {parts[0]!r}", name=parts[0])


def built_extensions() -> List[str]:
    """The extension modules setup.py builds (e.g. fastfair._C): named in quotes there."""
    return re.findall(r"[\"'](fastfair(?:\.\w+)+)[\"']", (ROOT / "setup.py").read_text())


def runnable_problem(module: str) -> Optional[str]:
    """Why `python -m module` cannot run, or None."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return f"no module {module}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        return None if importlib.util.find_spec(module + ".__main__") else f"package {module} has no __main__"
    source = Path(spec.origin).read_text() if spec.origin and spec.origin.endswith(".py") else ""
    return None if re.search(r"__name__\s*==\s*[\"']__main__[\"']", source) else \
        f"{module} has no `if __name__ == \"__main__\"` entry point"


_NAME = re.compile(r"fastfair(?:\.\w+)+(?::\w+)?|fastfair(?::\w+)")


def module_problems(text: str) -> Tuple[List[str], List[str]]:
    """(problems, skipped): every `python -m fastfair.X` runs, every `fastfair.x.y` / `fastfair.x:y` named in code
    resolves; a name whose import needs an absent optional package is skipped, one that setup.py builds
    (fastfair._C) is accepted unbuilt."""
    problems, skipped = [], []
    extensions = built_extensions()
    seen = set()
    for span in code_spans(text):
        for part in shell_commands(span.text):
            command = classify(shell_words(part))
            if command.kind == "module":
                seen.add(command.program)  # checked here as a program, not again as a name
                problem = runnable_problem(command.program)
                if problem:
                    problems.append(f"{where(span)}: `python -m {command.program}`: {problem}")
        for word in span.text.split():
            token = _strip(word.split("=", 1)[-1])
            if token.startswith(PACKAGE_SCHEME) or not _NAME.fullmatch(token) or token in seen:
                continue
            seen.add(token)
            try:
                resolve_name(token)
            except ImportError as error:
                if token.split(":")[0] in extensions or getattr(error, "name", None) in extensions:
                    skipped.append(f"{token}: built by setup.py, not built here ({error})")
                elif _optional_missing(error):
                    skipped.append(f"{token}: needs the absent optional package {error.name}")
                else:
                    problems.append(f"{where(span)}: `{token}` does not import: {error}")
            except (AttributeError, ValueError) as error:
                problems.append(f"{where(span)}: `{token}` does not resolve: {error}")
    return problems, skipped


def make_target_problems(text: str, makefile: Path = ROOT / "Makefile") -> List[str]:
    """Every `make TARGET` in a code span is a rule of the Makefile."""
    targets = makefile_rules(makefile)
    problems = []
    for span in code_spans(text):
        for part in shell_commands(span.text):
            command = classify(shell_words(part))
            if command.kind != "make":
                continue
            for word in command.args:
                if _ASSIGNMENT.match(word) or word.startswith("-"):
                    continue
                if word not in targets:
                    guess = difflib.get_close_matches(word, list(targets), n=1)
                    hint = f" (did you mean {guess[0]}?)" if guess else ""
                    problems.append(f"{where(span)}: `make {word}`: no such Makefile target{hint}")
    return problems


# ----------------------------------------------------------------------------- 5. the Python example

def python_examples(text: str) -> List[Tuple[int, str]]:
    """(line of the first code line, source) of every ```python block."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1))
            for match in re.finditer(r"^```python[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def python_example_problems(text: str) -> List[str]:
    """Each call in a ```python block to a function it imports from fastfair binds to that function's signature
    (its keyword arguments are parameters; its positional ones fit)."""
    problems = []
    for first, source in python_examples(text):
        try:
            tree = ast.parse(source)
        except SyntaxError as error:
            problems.append(f"README.md:{first + (error.lineno or 1) - 1}: the Python example does not parse: {error}")
            continue
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fastfair":
                for alias in node.names:
                    try:
                        imported[alias.asname or alias.name] = resolve_name(f"{node.module}.{alias.name}")
                    except (ImportError, AttributeError) as error:
                        problems.append(f"README.md:{first + node.lineno - 1}: from {node.module} import "
                                        f"{alias.name}: {error}")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported):
                continue
            keywords = {keyword.arg: None for keyword in node.keywords if keyword.arg is not None}
            try:
                inspect.signature(imported[node.func.id]).bind_partial(*[None] * len(node.args), **keywords)
            except TypeError as error:
                problems.append(f"README.md:{first + node.lineno - 1}: {node.func.id}(...): {error}")
    return problems


# ----------------------------------------------------------------------------- the README itself

def _report(what: str, problems: List[str]) -> str:
    return f"README.md names {len(problems)} {what}:\n  " + "\n  ".join(problems)


def test_readme_paths_exist():
    problems = path_problems(read_readme())
    assert not problems, _report("missing repository path(s)", problems)


def test_readme_config_keys_resolve():
    problems = config_key_problems(read_readme())
    assert not problems, _report("unknown config key(s)", problems)


def test_readme_command_flags_exist():
    """Flags on a command line are checked against that program's parser; flags quoted in prose away from their
    command (`--steps 30`, `--rank SET`, `--shard K/N`) only against the union of the parsers of all programs the
    README runs, as which program a sentence means is not parsed."""
    problems, skipped = flag_problems(read_readme())
    for reason in skipped:
        warnings.warn(f"README command not checked: {reason}")
    assert not problems, _report("unknown command-line flag(s)", problems)


def test_readme_modules_and_names_resolve():
    problems, skipped = module_problems(read_readme())
    for reason in skipped:
        warnings.warn(f"README name not checked: {reason}")
    assert not problems, _report("module(s) or name(s) that do not resolve", problems)


def test_readme_make_targets_exist():
    problems = make_target_problems(read_readme())
    assert not problems, _report("unknown make target(s)", problems)


def test_readme_python_example_matches_the_api():
    problems = python_example_problems(read_readme())
    assert not problems, _report("call(s) that do not fit the API", problems)


def test_the_readme_is_actually_scanned():
    """The checks above pass vacuously if the parsing finds nothing: it must find what each check looks at."""
    text = read_readme()
    spans = code_spans(text)
    assert any(span.kind == "block" for span in spans) and any(span.kind == "inline" for span in spans)
    assert any(names_repo_path(_strip(word)) for span in spans for word in span.text.split())
    assert any(config_key_candidates(_strip(word)) for span in config_key_spans(text) for word in span.text.split())
    commands, loose = command_flags(text)
    assert any(command.flags for command in commands) and loose
    assert any(classify(shell_words(part)).kind == "make" for span in spans for part in shell_commands(span.text))
    assert any(_NAME.fullmatch(_strip(word)) for span in spans for word in span.text.split())
    assert python_examples(text)


# ----------------------------------------------------------------------------- each check can fail

def test_paths_check_reports_a_missing_path_and_skips_outputs():
    text = ("Run `bench/no_such_bench.py`, see `configs/{gender,no_such_config}.yaml` and `csrc/no_such/`;\n"
            "`configs/*.nope` and `pkg://fastfair.toy/no_such_file`.\n\n"
            "    python bench/kernels.py --json bench/results/kernels_cpu.json\n\n"
            "Outputs: `out/demo/metrics.json`, `bench/results/step_N/`, `configs/NAME.yaml`, `bench/gpu_check.sh [OUT_DIR]`,"
            " `Makefile` and `setup.py`.\n")
    problems = path_problems(text)
    assert len(problems) == 5, problems
    for missing in ("bench/no_such_bench.py", "configs/no_such_config.yaml", "csrc/no_such/", "configs/*.nope",
                    "no_such_file"):
        assert any(missing in problem for problem in problems), (missing, problems)
    assert not any("gender.yaml" in problem for problem in problems)


def test_brace_expansion():
    assert expand_braces("a{1,2}/b{x,y}.c") == ["a1/bx.c", "a1/by.c", "a2/bx.c", "a2/by.c"]
    assert expand_braces("no_braces") == ["no_braces"]


def test_config_key_check_reports_unknown_keys_with_placeholders_accepted():
    text = ("Good: `sampler.grad_steps: 5`, `optim.*`, `data.sets.NAME.file`, `classifiers.<n>.factory`, "
            "`keep_every=1000`, `model.config=`, `resume_allow=[sampler.num_steps,precision]`.\n"
            "Bad: `sampler.no_such_key=3`, `optm.lr`, `optim.lr.*`, `data.sets.<n>.no_such_field`, "
            "`resume_allow=[sampler.bogus]`, `faces.detector=opencv faces.detectr_path=DIR`.\n\n"
            "    python fastfair/train.py --config configs/gender.yaml precision.mixd=bf16 output_dir=runs/x\n\n"
            "```python\nsample(unet, seed=3, sampler.not_a_key=1)\n```\n"
            "Not keys: `config.yaml`, `torch.autocast`, `fastfair.dft.sample`, `key.sub=value`.\n")
    problems = config_key_problems(text)
    for bad in ("sampler.no_such_key", "optm.lr", "optim.lr.*", "no_such_field", "sampler.bogus", "detectr_path",
                "precision.mixd"):
        assert any(bad in problem for problem in problems), (bad, problems)
    assert len(problems) == 7, problems
    assert any("did you mean 'optim" in problem for problem in problems), problems


def test_flag_check_reports_unknown_flags_per_program():
    text = ("    python -m fastfair.evaluate --model PATH --no-such-flag 1 --out DIR\n"
            "    torchrun --nproc_per_node=8 fastfair/train.py --config c.yaml --bogus-train x\n"
            "    python bench/kernels.py --json OUT.json --steps 3\n\n"
            "Run `make demo ARGS=\"--config age --no-such-demo-flag\"`; `pip install --no-deps x` is pip's;\n"
            "in prose `--totally-unknown` and `--iters N`, and `--max_grad_norm` is the public code's.\n")
    problems, _ = flag_problems(text)
    expected = ["--no-such-flag is not an option of fastfair.evaluate",
                "--bogus-train is not an option of fastfair/train.py",
                "--steps is not an option of bench/kernels.py",
                "--no-such-demo-flag is not an option of fastfair.demo",
                "--totally-unknown is an option of none"]
    for message in expected:
        assert any(message in problem for problem in problems), (message, problems)
    assert len(problems) == len(expected), problems


def test_flag_check_reports_a_program_without_a_parser():
    problems, _ = flag_problems("    python bench/no_such_bench.py --json x.json\n")
    assert len(problems) == 1 and "does not exist" in problems[0], problems


def test_module_check_reports_missing_modules_and_names():
    text = ("    python -m fastfair.no_such_module --out DIR\n\n"
            "See `fastfair.dft.no_such_function`, `fastfair.toy:no_such_hook` and `fastfair.kernels.solver_step`,\n"
            "`python -m fastfair.hooks` (no entry point) and `python -m pytest -q` (not fastfair's).\n")
    problems, _ = module_problems(text)
    for bad in ("fastfair.no_such_module", "no_such_function", "no_such_hook", "fastfair.hooks"):
        assert any(bad in problem for problem in problems), (bad, problems)
    assert len(problems) == 4, problems


def test_make_target_check_reports_a_missing_target():
    problems = make_target_problems("`make no-such-target` and `make demo ARGS=\"--iters 3\"`\n\n    make tst\n")
    assert len(problems) == 2, problems
    assert "no-such-target" in problems[0] and "did you mean test" in problems[1], problems


def test_python_example_check_reports_a_wrong_keyword():
    text = ("```python\nfrom fastfair.dft import sample\nfrom fastfair.schedule import no_such_name\n"
            "z0 = sample(unet, scheduler, z_T, cond, num_steps=20, no_such_option=1)\n"
            "ok = sample(unet, scheduler, z_T, cond, uncond, grad_steps=None)\n```\n")
    problems = python_example_problems(text)
    assert len(problems) == 2, problems
    assert "no_such_name" in problems[0] and "README.md:3" in problems[0], problems
    assert "no_such_option" in problems[1] and "README.md:4" in problems[1], problems


def _rename_everywhere(text: str, name: str, new: str) -> str:
    renamed = re.sub(r"(?<![\w./-])" + re.escape(name) + r"(?![\w-])", new, text)
    assert renamed != text, name
    return renamed


def test_every_check_fails_when_the_real_readme_drifts():
    """The real README with one name of each kind renamed (the first the checks find) fails each check."""
    text = read_readme()
    spans = code_spans(text)
    path = next(token for span in spans for token in map(_strip, span.text.split())
                if token.startswith(REPO_FOLDERS) and not is_placeholder(token) and not set("{*") & set(token))
    assert path_problems(_rename_everywhere(text, path, path.rstrip("/") + "_renamed"))
    key = next(found[0] for span in config_key_spans(text) for word in span.text.split()
               for found in [config_key_candidates(_strip(word))] if found and "." in found[0])
    assert config_key_problems(_rename_everywhere(text, key, key + "_renamed"))
    flag = next(flag for command in command_flags(text)[0] for flag in command.flags)
    assert flag_problems(_rename_everywhere(text, flag, flag + "-renamed"))[0]
    module = next(command.program for span in spans for part in shell_commands(span.text)
                  for command in [classify(shell_words(part))] if command.kind == "module")
    assert module_problems(_rename_everywhere(text, module, module + "_renamed"))[0]
    target = next(word for span in spans for part in shell_commands(span.text)
                  for command in [classify(shell_words(part))] if command.kind == "make" for word in command.args)
    assert make_target_problems(text.replace(f"make {target}", f"make {target}_renamed"))
