from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.tiny_models import FAMILIES, build_model, build_tokenizer

pytest_plugins = ("tests.service_fixtures",)  # the real-server fixtures of the service tests

# Triton kernels run through Triton's interpreter where there is no GPU (CI); the variable must be
# set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny models gain nothing from intra-op threads, and on a 2-core CI machine they fight the
    # real-server subprocesses of the service tests for the cores (seen: 10x slower steps).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """family -> directory of a tiny random checkpoint (config.json + safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    return {f: build_model(root / f, f, tokenizer_dir) for f in FAMILIES}


@pytest.fixture(scope="session")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
