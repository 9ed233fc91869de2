"""fastfair: fast, memory-lean fairness finetuning of text-to-image diffusion models.

Install (CPU machines): ``pip install -c constraints.txt -e ".[cpu,test]"`` (what
``make setup`` runs). The ``cpu`` extra pins the CPU build of torch that lies on
these machines' disk; without it, a machine with no torch would pull a multi-GB
CUDA build. On a machine that already has torch (e.g. a GPU box with torch 2.11),
``pip install -e .`` keeps that torch (>= 2.6 for the newest diffusers, transformers and peft; on torch 2.4
or 2.5 install those at the versions ``constraints-torch2.4.txt`` pins).

The native extension ``fastfair._C`` (C++/OpenMP for CPU, CUDA where nvcc and a
CUDA torch are present) is built only when asked: ``FASTFAIR_BUILD_NATIVE=1``.
"""
import os

from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    "diffusers>=0.30,<0.50",
    "transformers>=4.44,<6",
    "peft>=0.12,<1",
    "accelerate>=0.33",
    "safetensors>=0.4",
    "numpy>=1.24",
    "scipy>=1.10",
    "PyYAML>=6",
    "tqdm>=4.60",
]

EXTRAS = {
    # The CPU wheel on this project's machines' disk (DESIGN.md, dependency facts).
    "cpu": ["torch==2.13.0"],
    "triton": ["triton>=3.0"],
    "train": ["deepspeed>=0.14", "tensorboard>=2.14", "matplotlib>=3.7", "pillow>=10"],
    # 5.x wheels ship no Haar cascades: stay on 4.x.
    "faces": ["opencv-python-headless>=4.8,<5"],
    "clip": ["open_clip_torch>=2.24"],
    # 8-bit AdamW and 8-bit encoder loading; AdamW8bit on CPU checked with 0.50 (0.48 refuses CPU tensors on torch 2.4)
    "quant": ["bitsandbytes>=0.43"],
    "native": ["ninja"],
}
EXTRAS["test"] = sorted(
    {"pytest>=8", "bitsandbytes>=0.50", "faiss-cpu>=1.7"} | set(EXTRAS["triton"]) | set(EXTRAS["train"]) | set(EXTRAS["faces"]) | set(EXTRAS["native"])
)
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "cpu" for req in reqs})


def native_extensions():
    """The optional ``fastfair._C`` extension, empty unless FASTFAIR_BUILD_NATIVE=1: C++/OpenMP CPU kernels
    always, CUDA kernels too when torch is a CUDA build and nvcc is found (FASTFAIR_BUILD_CUDA=0 skips them).
    Sources and flags live in kernels/native.py. It compiles against the installed torch, so build it with
    ``FASTFAIR_BUILD_NATIVE=1 pip install --no-build-isolation -e .`` after torch is installed."""
    if os.environ.get("FASTFAIR_BUILD_NATIVE", "0") != "1":
        return [], {}
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    native = runpy.run_path(os.path.join(here, "kernels", "native.py"))
    native["use_cuda_home"]()  # before torch.utils.cpp_extension reads CUDA_HOME
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        raise SystemExit("FASTFAIR_BUILD_NATIVE=1 compiles against the installed torch: install torch first, "
                         "then run `FASTFAIR_BUILD_NATIVE=1 pip install --no-build-isolation -e .`") from None
    with_cuda = native["cuda_buildable"]() and os.environ.get("FASTFAIR_BUILD_CUDA", "1") != "0"
    arch_problem = native["cuda_arch_problem"]() if with_cuda else None
    if arch_problem:
        raise SystemExit("FASTFAIR_BUILD_NATIVE=1: " + arch_problem)
    macro = ["-D" + native["CUDA_MACRO"]] if with_cuda else []
    extension = (CUDAExtension if with_cuda else CppExtension)(
        "fastfair._C",
        [os.path.relpath(path, here) for path in native["sources"](with_cuda)],
        extra_compile_args={"cxx": native["CXX_FLAGS"] + macro, "nvcc": native["NVCC_FLAGS"]},
        extra_link_args=native["LD_FLAGS"],
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

setup(
    name="fastfair",
    version="0.1.0",
    description="Fast, memory-lean fairness finetuning of text-to-image diffusion models",
    python_requires=">=3.9",
    # fastfair's subpackages, plus the top-level kernels/ installed as fastfair.kernels (never as `kernels`,
    # a PyPI name that transformers/diffusers probe for: DESIGN.md, pitfalls).
    packages=find_packages(include=["fastfair", "fastfair.*"]) + ["fastfair.kernels"],
    package_dir={"fastfair": "fastfair", "fastfair.kernels": "kernels"},
    package_data={"fastfair": ["data/prompts/*.txt", "toy/weights/**/*", "toy/configs/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
