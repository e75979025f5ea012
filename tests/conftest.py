"""Shared fixtures: the real data beside the checkout, small generated images."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from memory_guard import MemoryGuard
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CIFAR_TEST_TAR = SHARED / "cifar10" / "cifar10-test.tar.gz"
PHOTOS = SHARED / "images"


def pytest_configure(config: pytest.Config) -> None:
    """Frees each test module's cached models when it ends, and reports the suite's memory."""
    config.pluginmanager.register(MemoryGuard(config), "zfvis-memory-guard")


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test starts from the same random state, whatever ran before it or alone: a
    model built before a test seeds (``_ready(Model(), seed=3)``) gets the same weights in
    every run, so a result never depends on the test order or the process."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module's tests (small tensors on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def require_shared(path: Path) -> Path:
    """Skips the test, saying why, where the project's shared data is absent."""
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it sits beside the checkout as ../shared on project machines)")
    return path


@pytest.fixture(scope="session")
def cifar_test_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 20 test images of each CIFAR-10 class, unpacked into a temporary folder."""
    tar_path = require_shared(CIFAR_TEST_TAR)
    root = tmp_path_factory.mktemp("cifar")
    per_class: dict[str, int] = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            cls = parts[-2]
            if per_class.get(cls, 0) >= 20:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            data = tar.extractfile(member)
            assert data is not None
            dest = root / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data.read())
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A two-class ImageFolder of 16 small generated images a class."""
    rng = np.random.default_rng(0)
    for c, colour in (("red", 0), ("blue", 2)):
        d = tmp_path / "data" / c
        d.mkdir(parents=True)
        for i in range(16):
            a = (rng.random((36, 36, 3)) * 80).astype("uint8")
            a[..., colour] += 150
            Image.fromarray(a).save(d / f"{i:02d}.png")
    return tmp_path / "data"
