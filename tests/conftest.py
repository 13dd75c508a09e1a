import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def timing_cache(tmp_path_factory):
    """objective="time" measures forms once per shape: into this session's own cache, not ~/.cache."""
    os.environ["FXLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("fxlora-cache"))
    yield


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts leak between tests."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def clean_environ():
    """TrainingArguments writes ACCELERATE_* variables into os.environ; keep them out of other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
