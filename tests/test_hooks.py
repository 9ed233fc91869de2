"""Config hooks: 'package.module:function' callables and 'pkg://' paths to files shipped in a package."""
from pathlib import Path

import pytest

from fastfair.config import ConfigError, load_config, validate
from fastfair.hooks import load_callable, resolve_package_path

REPO = Path(__file__).resolve().parents[1]


def test_load_callable_imports_the_function_and_names_the_key_on_error():
    assert load_callable("fastfair.toy:detect_faces", "faces.detector_fn").__name__ == "detect_faces"
    with pytest.raises(ValueError, match=r"faces\.detector_fn='fastfair\.toy:nope'.*package\.module:function"):
        load_callable("fastfair.toy:nope", "faces.detector_fn")
    with pytest.raises(ValueError, match="no_such_module"):
        load_callable("no_such_module:f", "key")
    with pytest.raises(ValueError, match="not callable"):
        load_callable("fastfair.toy:ATTRIBUTES", "key")


def test_package_paths_resolve_inside_the_installed_package():
    import fastfair.toy

    resolved = Path(resolve_package_path("pkg://fastfair.toy/weights/pipeline"))
    assert resolved == Path(fastfair.toy.__file__).parent / "weights" / "pipeline" and resolved.is_dir()
    assert resolve_package_path("relative/path") == "relative/path"
    with pytest.raises(ValueError, match=r"model\.pretrained='pkg://no_such_package/x'.*not an importable"):
        resolve_package_path("pkg://no_such_package/x", "model.pretrained")


def test_repo_toy_config_includes_the_packaged_one_and_resolves_its_paths(tmp_path):
    cfg = load_config(REPO / "configs" / "toy.yaml", [f"output_dir={tmp_path}"])
    assert Path(cfg.model.pretrained).is_dir() and Path(cfg.faces.bank).is_file()
    assert cfg.classifiers["toy"].factory == "fastfair.toy:train_classifier"
    same = load_config("pkg://fastfair.toy/configs/gender.yaml", [f"output_dir={tmp_path}"])
    assert same == cfg


def test_malformed_hooks_are_refused_by_validate(tmp_path):
    cfg = load_config(REPO / "configs" / "toy.yaml", [f"output_dir={tmp_path}", "semantics.factory=toy_semantics",
                                                      "faces.embedding_fn=a:b:c"])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "semantics.factory='toy_semantics'" in str(error.value)
    assert "faces.embedding_fn='a:b:c'" in str(error.value)


def _hook_module(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_hook_whose_import_fails_is_named_with_its_key(tmp_path, monkeypatch):
    """A SyntaxError or an exception raised while the module imports escaped bare; a relative name raised
    importlib's 'package argument is required'; a module not on the path said nothing of where to put it."""
    _hook_module(tmp_path, monkeypatch, "hook_raises", "raise RuntimeError('CUDA not available in this hook')\n")
    _hook_module(tmp_path, monkeypatch, "hook_syntax", "def f(:\n")
    with pytest.raises(ValueError, match=r"faces\.detector_fn='hook_raises:f': importing hook_raises failed: "
                                         r"RuntimeError: CUDA not available"):
        load_callable("hook_raises:f", "faces.detector_fn")
    with pytest.raises(ValueError, match=r"semantics\.factory='hook_syntax:f': importing hook_syntax failed: "
                                         r"SyntaxError"):
        load_callable("hook_syntax:f", "semantics.factory")
    with pytest.raises(ValueError, match=r"'\.toy:detect_faces': a relative module"):
        load_callable(".toy:detect_faces", "faces.detector_fn")
    with pytest.raises(ValueError, match=r"No module named 'not_on_the_path'\) \(put the folder that holds it on "
                                         r"PYTHONPATH"):
        load_callable("not_on_the_path:f", "faces.detector_fn")


def test_call_hook_names_a_function_that_cannot_take_the_arguments(tmp_path, monkeypatch):
    from fastfair.hooks import call_hook

    _hook_module(tmp_path, monkeypatch, "hook_sig", "def none():\n    return 1\n\ndef one(x):\n    return x + 1\n")
    assert call_hook("hook_sig:one", "k", (1,), "f(x)") == 2
    with pytest.raises(ValueError, match=r"classifiers\.c\.factory='hook_sig:none' cannot be called as "
                                         r"factory\(spec\) -> a module \(too many positional arguments\)"):
        call_hook("hook_sig:none", "classifiers.c.factory", (object(),), "factory(spec) -> a module")


def test_package_paths_stay_inside_their_package(tmp_path, monkeypatch):
    # a package found through a sys.path entry holding '..' (sys.path.insert(0, here + '/..')) is inside itself
    (tmp_path / "sub").mkdir()
    (tmp_path / "mypkg" / "data").mkdir(parents=True)
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "sub" / ".."))
    assert Path(resolve_package_path("pkg://mypkg/data/x.txt")) == tmp_path / "mypkg" / "data" / "x.txt"
    for value in ("pkg://fastfair/../../etc/passwd", "pkg://fastfair.toy//etc/passwd"):
        with pytest.raises(ValueError, match="leads outside the package"):
            resolve_package_path(value, "model.pretrained")
    with pytest.raises(ValueError, match="'fastfair.toy.classifiers' is a module, not a package"):
        resolve_package_path("pkg://fastfair.toy.classifiers/x", "model.pretrained")


def test_every_hook_is_imported_before_the_model_loads(tmp_path, monkeypatch):
    """A misspelt hook (here a prompt factory, imported last) was found only once Stable Diffusion and every
    judge had loaded; --check took the same path."""
    from fastfair import trainer
    from fastfair.config import check_hooks

    cfg = load_config(REPO / "configs" / "toy.yaml", [
        f"output_dir={tmp_path}", "data.sets.toy_occupations.factory=fastfair.toy:no_such_fn",
        "classifiers.toy.factory=fastfair.toy:no_such_classifier"])
    with pytest.raises(ConfigError) as error:
        check_hooks(cfg)
    assert "data.sets.toy_occupations.factory='fastfair.toy:no_such_fn'" in str(error.value)
    assert "classifiers.toy.factory='fastfair.toy:no_such_classifier'" in str(error.value)
    # hooks the run does not call are not imported: the face embedding without the face loss, a detector function
    # under another detector (a module installed elsewhere only, say)
    check_hooks(load_config(REPO / "configs" / "toy.yaml", [
        f"output_dir={tmp_path}", "loss.lambda_face=0", "faces.embedding_fn=elsewhere_only:embedder",
        "faces.detector=none", "faces.detector_fn=elsewhere_only:detect"]))
    monkeypatch.setattr(trainer, "load_stable_diffusion", lambda *a, **k: pytest.fail("the model loaded first"))
    with trainer.process_group(), pytest.raises(ConfigError, match="hooks that cannot be imported"):
        trainer.Trainer(cfg, "cpu")
