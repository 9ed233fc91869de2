"""Config hooks: code and package files named by strings in a config or on a command line.

- ``"package.module:function"`` names a function (``load_callable``): classifier, detector, face-embedding,
  semantics and prompt-set factories, e.g. the toy world's ``fastfair.toy:train_classifier``;
- ``"pkg://package/relative/path"`` names a file shipped inside an installed package
  (``resolve_package_path``), e.g. ``pkg://fastfair.toy/weights/pipeline``, so a config that ships with
  fastfair does not depend on where it is installed.
"""
import importlib
import importlib.util
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def load_callable(spec: str, key: str):
    """'package.module:function' -> the function; errors name the config key (or option) ``key``."""
    module, _, name = str(spec).partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}={spec!r}: cannot import it ({error}); expected 'package.module:function'") from None
    if not callable(function):
        raise ValueError(f"{key}={spec!r}: {name} is not callable; expected 'package.module:function'")
    return function


def resolve_package_path(value: str, key: str = "path") -> str:
    """'pkg://package/sub/path' -> the absolute path of sub/path inside the installed package; other values
    are returned unchanged. The package must be importable; the file need not exist (check_files says so)."""
    if not isinstance(value, str) or not value.startswith(PACKAGE_SCHEME):
        return value
    package, _, relative = value[len(PACKAGE_SCHEME):].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{key}={value!r}: {package!r} is not an importable package; expected "
                         f"'{PACKAGE_SCHEME}package/relative/path'")
    return str(Path(list(spec.submodule_search_locations)[0]) / relative)
