"""The standalone CMake build: CPU kernels with their C++ unit tests (ctest), and
every CUDA source compiled by nvcc for sm_80/sm_90 (compile check; no GPU here)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed; the CMake build cannot be checked")
    build = tmp_path_factory.mktemp("cmake-build")
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout[-4000:] + compile_.stderr[-4000:]
    return build


def test_ctest_passes(build_dir):
    run = subprocess.run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "tests passed" in run.stdout and "out of 0" not in run.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compile-checked here")
def test_every_cuda_source_compiled_for_sm80_and_sm90(build_dir, tmp_path):
    library = build_dir / "libforkdec_cuda.a"
    assert library.exists(), "CMake did not build the CUDA kernels although nvcc exists"
    subprocess.run(["ar", "x", str(library)], cwd=tmp_path, check=True)
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no CUDA sources"
    for name in sources:
        obj = (tmp_path / f"{name}.o").read_bytes()
        # each embedded cubin records the ptxas target it was built for
        for arch in (b"-arch sm_80", b"-arch sm_90"):
            assert arch in obj, (name, arch)
