"""Shared fixtures for the flashdecode test-suite.

Device selection: CPU by default; set ``FLASHDECODE_TEST_DEVICE=cuda`` to run the same tests on a
GPU. Without a GPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), which must be
set before triton (and therefore torch) is imported.
"""

import os

_WANT_CUDA = os.environ.get("FLASHDECODE_TEST_DEVICE", "cpu").lower() == "cuda"
if not _WANT_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_DEVICE = "cuda" if _WANT_CUDA else "cpu"
BACKENDS = ["reference", "triton"]
# On CPU the Triton backend runs in the interpreter: tests that take it carry the `interpreter` mark.
BACKEND_PARAMS = [
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton", marks=[] if _WANT_CUDA else [pytest.mark.interpreter]),
]


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _checked_set_attr(original):
    """A `tl.multiple_of` hint the interpreter checks: every element of the hinted value must be
    a multiple (the kernels hint scalars only). Compiled, a false hint lets the compiler emit
    vector loads that fault with a misaligned address; the interpreter would ignore it."""

    def set_attr(handle, key, value):
        if key == "tt.divisibility":
            divisor = int(value[0])
            data = handle.data
            if not (data % divisor == 0).all():
                raise AssertionError(f"tl.multiple_of({divisor}) does not hold for {data}")
        return original(handle, key, value)

    return set_attr


@pytest.fixture(autouse=True)
def _check_multiple_of_hints(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime import interpreter

        handle = interpreter.TensorHandle
        monkeypatch.setattr(handle, "set_attr", _checked_set_attr(handle.set_attr))


def pytest_configure(config):
    # Markers are declared in pyproject.toml; repeat them so the suite works from any rootdir.
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels in the interpreter on CPU (slow)")


def _shard(spec: str) -> tuple[int, int]:
    """``FLASHDECODE_TEST_SHARD=i/n``: run the i-th of n interleaved parts of the collected tests."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(f"FLASHDECODE_TEST_SHARD must be 'i/n' with 0 <= i < n, got {spec!r}")
    return index, count


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("FLASHDECODE_TEST_SHARD", "")
    if shard:
        # Splits a module too long for one call of a time-limited GPU machine (scripts/gpu_check.sh).
        index, count = _shard(shard)
        config.hook.pytest_deselected(items=[it for k, it in enumerate(items) if k % count != index])
        items[:] = [it for k, it in enumerate(items) if k % count == index]
    if cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def device() -> torch.device:
    if TEST_DEVICE == "cuda" and not cuda_available():
        pytest.skip("FLASHDECODE_TEST_DEVICE=cuda but no CUDA device is present")
    return torch.device(TEST_DEVICE)


def set_backend(monkeypatch, name: str) -> None:
    """Force the op's dispatch (it reads FLASHDECODE_BACKEND at call time)."""
    monkeypatch.setenv("FLASHDECODE_BACKEND", name)


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch) -> str:
    set_backend(monkeypatch, request.param)
    return request.param


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are made on CPU and moved, so they do not depend on the device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(g: torch.Generator, *shape, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    t = torch.randn(*shape, generator=g, dtype=torch.float32) * scale + shift
    return t.to(dtype=dtype).to(device)


def randint(g: torch.Generator, low: int, high: int, *shape) -> torch.Tensor:
    """Integers in [low, high) (high exclusive), int64 on CPU."""
    return torch.randint(low, high, shape, generator=g)


def randperm(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=g)


@pytest.fixture
def rng():
    """Factory: rng(seed) -> a seeded CPU torch.Generator."""
    return make_generator
