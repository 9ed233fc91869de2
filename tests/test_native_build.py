"""How the native extension's build finds the CUDA toolkit and the GPU architectures (kernels/native.py)."""
import os

import pytest

from fastfair.kernels import native


def _toolkit(root):
    """A folder laid out like a CUDA toolkit: bin/nvcc and include/cuda_runtime_api.h."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def _wrapper(root, target):
    """bin/nvcc as a script that execs the real one, like /usr/local/bin/nvcc on these machines."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    (root / "bin" / "nvcc").chmod(0o755)
    return root / "bin"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(native, "DEFAULT_CUDA_HOME", str(tmp_path / "no-default"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    return monkeypatch


def test_an_explicit_cuda_home_wins(clean_env, tmp_path):
    clean_env.setenv("CUDA_PATH", "/somewhere/cuda")
    assert native.find_cuda_home() == "/somewhere/cuda"
    clean_env.setenv("CUDA_HOME", "/elsewhere/cuda")
    assert native.find_cuda_home() == "/elsewhere/cuda"


def test_nvcc_on_path_inside_a_toolkit(clean_env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    clean_env.setenv("PATH", str(toolkit / "bin"))
    assert native.find_cuda_home() == str(toolkit)


def test_a_linked_nvcc_is_followed_to_its_toolkit(clean_env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "links").mkdir()
    os.symlink(toolkit / "bin" / "nvcc", tmp_path / "links" / "nvcc")
    clean_env.setenv("PATH", str(tmp_path / "links"))
    assert native.find_cuda_home() == str(toolkit)


def test_a_wrapper_script_falls_back_to_the_default_toolkit(clean_env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    clean_env.setenv("PATH", str(_wrapper(tmp_path / "usr-local", toolkit / "bin" / "nvcc")))
    assert native.find_cuda_home() is None  # the wrapper's parent holds no header, and no default toolkit
    clean_env.setattr(native, "DEFAULT_CUDA_HOME", str(toolkit))
    assert native.find_cuda_home() == str(toolkit)


def test_use_cuda_home_sets_only_an_unset_variable(clean_env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    clean_env.setenv("PATH", str(toolkit / "bin"))
    native.use_cuda_home()
    assert os.environ["CUDA_HOME"] == str(toolkit)
    clean_env.setenv("CUDA_HOME", "/mine")
    native.use_cuda_home()
    assert os.environ["CUDA_HOME"] == "/mine"


@pytest.mark.parametrize("arch_list,gpus,problem", [("", 0, True), ("9.0", 0, False), ("", 1, False)])
def test_cuda_arch_problem_only_without_gpus_or_arch_list(monkeypatch, arch_list, gpus, problem):
    """torch compiles for the visible GPUs when TORCH_CUDA_ARCH_LIST is unset and fails (IndexError) with none:
    that case is named, with the fix, before any compiler runs."""
    import torch

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    reason = native.cuda_arch_problem()
    assert (reason is not None) == problem
    if problem:
        assert "TORCH_CUDA_ARCH_LIST" in reason and "FASTFAIR_BUILD_CUDA=0" in reason
