"""The torch-free CPU kernels, their ctests and the C++ fuzz drivers
(tests/fuzz/fuzz_*.cpp) built with AddressSanitizer + UndefinedBehaviorSanitizer
(cmake -DFORKDEC_SANITIZE=ON, gcc here) and run by ctest: any out-of-bounds
access, use after free, leak or undefined behaviour aborts its test.

Time-bounded: the build and the run each have a limit, and the fuzz drivers
try a fixed number of inputs (FORKDEC_FUZZ_ITERATIONS, default in the drivers).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 900  # the ASan build of every kernel: ~90 CPU-seconds on 2 cores
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed; the sanitized CMake build cannot be checked")
    if shutil.which("ctest") is None:
        pytest.skip("ctest is not installed (it ships with cmake); the sanitized ctests cannot run")
    build = tmp_path_factory.mktemp("cmake-asan")
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DFORKDEC_SANITIZE=ON", "-DFORKDEC_CUDA=OFF"],
        capture_output=True, text=True, timeout=120)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "ASan + UBSan build" in configure.stdout, configure.stdout
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
    assert compile_.returncode == 0, compile_.stdout[-4000:] + compile_.stderr[-4000:]
    return build


def test_ctests_and_fuzz_drivers_clean_under_asan_and_ubsan(sanitized_build):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    run = subprocess.run(["ctest", "--test-dir", str(sanitized_build), "--output-on-failure", "-V", "-j2"],
                         capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert "100% tests passed" in run.stdout, run.stdout[-4000:]
    # every ctest source and every fuzz driver ran
    sources = [p.stem for p in (ROOT / "tests" / "cpp").glob("test_*.cpp")]
    sources += [p.stem for p in (ROOT / "tests" / "fuzz").glob("fuzz_*.cpp")]
    for name in sources:
        assert name in run.stdout, f"{name} did not run under the sanitizers"
    counts = [line for line in run.stdout.splitlines() if "fuzz_kernels" in line and " inputs" in line]
    assert counts, "the fuzz driver printed no input counts"
    print("\n".join(counts))
