"""bench/kernels.py shares its name with the PyPI package `kernels` that libraries probe for."""
import subprocess
import sys
from pathlib import Path


def test_the_kernel_benchmark_refuses_to_be_imported_as_the_kernels_package():
    """bench/ is first on sys.path when a benchmark runs: bench/kernels.py must not pass for the PyPI `kernels`
    package that libraries probe for (it would run the kernel benchmark's imports in every benchmark)."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    probe = ("import sys; sys.path.insert(0, sys.argv[1])\n"
             "try:\n    import kernels\nexcept ImportError as error:\n    print('refused:', error)\n"
             "print('fastfair.kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(bench)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["refused: bench/kernels.py is fastfair's kernel benchmark, not the `kernels` "
                                       "package", "False"]
