"""Runs tests/fuzz/ops_fuzz.py against a sanitized build of forkdec._C instead of
the installed one (how to build it and run this: docs/verification.md).

FORKDEC_EXTENSION names the --build-lib folder holding forkdec/_C*.so; the
process must start with libasan preloaded (LD_PRELOAD), as Python itself is
not instrumented.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch  # noqa: F401  (the extension links against torch's libraries)

build_lib = Path(os.environ.get("FORKDEC_EXTENSION", "/tmp/asan_ext"))
libraries = sorted((build_lib / "forkdec").glob("_C*.so"))
if not libraries:
    sys.exit(f"asan_ops_fuzz: no forkdec/_C*.so under {build_lib} (set FORKDEC_EXTENSION)")
spec = importlib.util.spec_from_file_location("forkdec._C", libraries[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["forkdec._C"] = module  # forkdec._extension.load() finds it there
print(f"asan_ops_fuzz: forkdec._C from {libraries[0]}", flush=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ops_fuzz  # noqa: E402

import forkdec._extension  # noqa: E402

assert forkdec._extension.load() is module, "the installed forkdec._C was loaded instead of the sanitized one"
sys.exit(ops_fuzz.main())
