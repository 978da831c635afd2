"""Shared fixtures: tiny random models per architecture, loaded once per session."""

from __future__ import annotations

import thinkwise  # noqa: F401  (its thread settings must precede the first torch import)
import os

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, make_tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))
if not torch.cuda.is_available():
    # Triton kernels run on CPU through its interpreter, so CI checks them against their twins.
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Fixtures that assemble or load the packaged default model (~15 s, ~2 GB): a test using one
# is marked `slow` here, so `pytest -m "not slow"` leaves it out without anyone remembering.
DEFAULT_MODEL_FIXTURES = {"default_gguf", "default_loaded"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DEFAULT_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def kernel_switches_restored():
    """The kernels' process-wide switches are set by the last engine built (`kernel_settings`): a
    test that builds one with other settings (THINKWISE_GEMM_EPILOGUE=0, pdl=False, ...) must not
    leave them changed for the tests after it, which then passed or failed by order."""
    from thinkwise.engine.kernel_settings import kernel_settings_kept

    with kernel_settings_kept():
        yield


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny(request, tmp_path_factory):
    """(architecture, model directory, transformers reference model)."""
    arch = request.param
    directory = tmp_path_factory.mktemp(f"tiny-{arch}")
    model = make_tiny_model(arch, directory)
    return arch, directory, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-single")
    model = make_tiny_model("llama", directory, seed=1)
    return directory, model
