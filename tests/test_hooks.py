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
