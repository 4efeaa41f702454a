"""Every backend of every op against the reference, over the shared cases."""
import zlib

import pytest
import torch

import forkdec
import specs  # noqa: F401  (registers the op specs)
from harness import SPECS, backend_variants, device_for, skip_reason


def _params():
    for spec in SPECS:
        for variant in backend_variants(spec):
            for dtype in spec.dtypes:
                for case in spec.cases:
                    yield pytest.param(spec, variant, dtype, case,
                                       id=f"{spec.name}-{variant}-{str(dtype)[6:]}-{case.id}")


@pytest.fixture
def cpu_isa():
    ext = forkdec._extension.load()
    previous = ext.cpu_isa() if ext is not None else None
    yield lambda isa: ext.set_cpu_isa(isa)
    if previous is not None:
        ext.set_cpu_isa(previous)


@pytest.mark.parametrize("spec,variant,dtype,case", list(_params()))
def test_backend_matches_reference(spec, variant, dtype, case, cpu_isa):
    reason = skip_reason(spec, variant, case)
    if reason is not None:
        pytest.skip(reason)
    backend = variant.split("[")[0]
    if "[" in variant:
        cpu_isa(variant[len("cpu["):-1])
    device = device_for(spec, backend)
    g = torch.Generator().manual_seed(zlib.crc32(f"{spec.name}/{case.id}".encode()))
    args, kwargs = case.make(dtype, g)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected = spec.reference(*args, **kwargs)
    actual = spec.op(*args, **kwargs, backend=backend)
    spec.compare(actual.cpu() if isinstance(actual, torch.Tensor) else actual,
                 expected.cpu() if isinstance(expected, torch.Tensor) else expected, dtype)

