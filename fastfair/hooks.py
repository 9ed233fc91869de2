"""Config hooks: code and package files named by strings in a config or on a command line.

- ``"package.module:function"`` names a function (``load_callable``): classifier, detector, face-embedding,
  semantics and prompt-set factories, e.g. the toy world's ``fastfair.toy:train_classifier``;
- ``"pkg://package/relative/path"`` names a file shipped inside an installed package
  (``resolve_package_path``), e.g. ``pkg://fastfair.toy/weights/pipeline``, so a config that ships with
  fastfair does not depend on where it is installed.
"""
import importlib
import importlib.util
import inspect
import os
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def load_callable(spec: str, key: str):
    """'package.module:function' -> the function; errors name the config key (or option) ``key``."""
    module, _, name = str(spec).partition(":")
    if module.startswith("."):
        raise ValueError(f"{key}={spec!r}: a relative module; name it from its top package ('package.module:function')")
    try:
        imported = importlib.import_module(module)
    except ModuleNotFoundError as error:
        where = (" (put the folder that holds it on PYTHONPATH, e.g. PYTHONPATH=. before the command)"
                 if error.name == module.split(".")[0] else "")
        raise ValueError(f"{key}={spec!r}: cannot import it ({error}){where}; expected 'package.module:function'"
                         ) from None
    except Exception as error:  # the module's own code failed (a SyntaxError, a RuntimeError at import): its key
        raise ValueError(f"{key}={spec!r}: importing {module} failed: {type(error).__name__}: {error}") from error
    try:
        function = getattr(imported, name)
    except AttributeError:
        raise ValueError(f"{key}={spec!r}: cannot import it (module {module!r} has no attribute {name!r}); expected "
                         "'package.module:function'") from None
    if not callable(function):
        raise ValueError(f"{key}={spec!r}: {name} is not callable; expected 'package.module:function'")
    return function


def check_call(function, spec: str, key: str, arguments: tuple, expected: str) -> None:
    """A hook that cannot take ``arguments`` is refused naming the key and ``expected`` (its signature and what it
    returns), not with a bare TypeError from the call, which may come only mid-run."""
    try:
        inspect.signature(function).bind(*arguments)
    except TypeError as error:
        raise ValueError(f"{key}={spec!r} cannot be called as {expected} ({error})") from None
    except ValueError:  # no signature to read (some builtins): the call itself says
        pass


def call_hook(spec: str, key: str, arguments: tuple, expected: str):
    """``load_callable(spec, key)(*arguments)``, its signature checked first (``check_call``)."""
    function = load_callable(spec, key)
    check_call(function, spec, key, arguments, expected)
    return function(*arguments)


def resolve_package_path(value: str, key: str = "path") -> str:
    """'pkg://package/sub/path' -> the absolute path of sub/path inside the installed package; other values
    are returned unchanged. The package must be importable; the file need not exist (check_files says so)."""
    if not isinstance(value, str) or not value.startswith(PACKAGE_SCHEME):
        return value
    package, _, relative = value[len(PACKAGE_SCHEME):].partition("/")
    expected = f"expected '{PACKAGE_SCHEME}package/relative/path'"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    except Exception as error:  # a parent package's own code failed at import
        raise ValueError(f"{key}={value!r}: importing {package.rpartition('.')[0]} failed: {type(error).__name__}: "
                         f"{error}") from error
    if spec is None:
        raise ValueError(f"{key}={value!r}: {package!r} is not an importable package; {expected}")
    if not spec.submodule_search_locations:
        raise ValueError(f"{key}={value!r}: {package!r} is a module, not a package (a folder of files); {expected}")
    root = Path(os.path.normpath(list(spec.submodule_search_locations)[0]))  # a sys.path entry may hold '..'
    path = root / relative
    # '..' checked on the path as written: a link inside the package (to weights kept elsewhere) is its own
    inside = Path(os.path.normpath(path)) == root or root in Path(os.path.normpath(path)).parents
    if relative.startswith("/") or not inside:
        raise ValueError(f"{key}={value!r}: {relative!r} leads outside the package {package}; {expected}, or give "
                         "the path itself")
    return str(path)
