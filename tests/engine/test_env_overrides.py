"""Kernel knobs: `EngineConfig` fields, overridden by documented environment variables read in
one place, and handed to the kernels when an engine is built."""

from __future__ import annotations

import pytest

from thinkwise import LLM
from thinkwise.engine.config import EngineConfig
from thinkwise.engine.env_overrides import ENV_OVERRIDES, env_overrides
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels import linear_dispatch, paged_attention, pdl


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    # The kernel settings these tests' engines hand out are put back by conftest's
    # `kernel_switches_restored` (kernel_settings.kernel_settings_kept).
    for name in ENV_OVERRIDES:
        monkeypatch.delenv(name, raising=False)


def test_kernel_settings_kept_puts_back_every_setting_an_engine_hands_out():
    from thinkwise.engine.kernel_settings import apply_kernel_settings, kernel_settings_kept
    from thinkwise.kernels import cpu_quant_gemm, fused

    def now():
        return (paged_attention.ATTENTION_BACKEND, fused.FUSED, linear_dispatch.epilogue_fusion_enabled(),
                pdl.enabled(), pdl.max_rows(), cpu_quant_gemm.weight_prefetch_mib())

    before = now()
    with kernel_settings_kept():
        apply_kernel_settings(EngineConfig(attention_backend="torch", fused_kernels=False, gemm_epilogue_fusion=False,
                                           pdl=False, pdl_max_rows=3, cpu_weight_prefetch_mib=1.0))
        assert now() == ("torch", False, False, False, 3, 1.0)  # every one changed, so each restore is seen
    assert now() == before


def test_every_override_names_a_config_field():
    fields = set(EngineConfig.__dataclass_fields__)
    assert {field for field, _ in ENV_OVERRIDES.values()} <= fields


def test_defaults_and_overrides(monkeypatch):
    config = EngineConfig()
    assert (config.attention_backend, config.fused_kernels, config.gemm_epilogue_fusion, config.pdl,
            config.pdl_max_rows) == ("auto", True, True, True, 64)
    monkeypatch.setenv("THINKWISE_ATTENTION", "torch")
    monkeypatch.setenv("THINKWISE_FUSED", "0")
    monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", "0")
    monkeypatch.setenv("THINKWISE_PDL", "0")
    monkeypatch.setenv("THINKWISE_PDL_MAX_ROWS", "8")
    # The variable wins over an explicit argument: it is how A/B runs switch a knob.
    config = EngineConfig(pdl=True, pdl_max_rows=64)
    assert (config.attention_backend, config.fused_kernels, config.gemm_epilogue_fusion, config.pdl,
            config.pdl_max_rows) == ("torch", False, False, False, 8)


@pytest.mark.parametrize("name, value, message", [
    ("THINKWISE_PDL", "yes", "THINKWISE_PDL='yes': use 1 (on) or 0 (off)"),
    ("THINKWISE_FUSED", "", "THINKWISE_FUSED='': use 1 (on) or 0 (off)"),
    ("THINKWISE_PDL_MAX_ROWS", "many", "THINKWISE_PDL_MAX_ROWS='many': use a whole number of rows >= 0"),
    ("THINKWISE_PDL_MAX_ROWS", "-1", "THINKWISE_PDL_MAX_ROWS='-1': use a whole number of rows >= 0"),
    ("THINKWISE_ATTENTION", "flash", "THINKWISE_ATTENTION='flash': use auto or torch"),
    ("THINKWISE_CPU_WEIGHT_PREFETCH", "lots", "THINKWISE_CPU_WEIGHT_PREFETCH='lots': use a number of MiB from 0"),
    ("THINKWISE_CPU_WEIGHT_PREFETCH", "-2", "THINKWISE_CPU_WEIGHT_PREFETCH='-2': use a number of MiB from 0"),
    ("THINKWISE_CPU_WEIGHT_PREFETCH", "nan", "THINKWISE_CPU_WEIGHT_PREFETCH='nan': use a number of MiB from 0"),
])
def test_bad_values_are_refused_with_the_fix(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidParameterError) as error:
        EngineConfig()
    assert message in str(error.value) and error.value.param == name


@pytest.mark.parametrize("name, value", [("THINKWISE_PDL", "yes"), ("THINKWISE_ATTENTION", "flash")])
def test_the_cli_names_the_variable_not_a_flag(tiny_llama, name, value):
    import os
    import subprocess
    import sys

    directory, _ = tiny_llama
    env = dict(os.environ, **{name: value})
    done = subprocess.run([sys.executable, "-m", "thinkwise.cli", "generate", "--model", str(directory),
                           "--max-tokens", "2", "hi"], env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {name}={value!r}: use ")


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidParameterError, match="attention_backend 'triton-please' is not one of auto, torch"):
        EngineConfig(attention_backend="triton-please")
    for bad in (-1, "4", True, float("nan"), 1e9):
        with pytest.raises(InvalidParameterError, match="cpu_weight_prefetch_mib must be a number of MiB in"):
            EngineConfig(cpu_weight_prefetch_mib=bad)
    with pytest.raises(InvalidParameterError, match="pdl_max_rows"):
        EngineConfig(pdl_max_rows=-3)


def test_env_overrides_reads_only_its_variables():
    assert env_overrides({"THINKWISE_PDL": "0", "THINKWISE_CACHE": "/tmp", "PATH": "/bin"}) == {"pdl": False}
    assert env_overrides({}) == {}


def test_an_engine_hands_its_knobs_to_the_kernels(tiny_llama, monkeypatch):
    directory, _ = tiny_llama
    common = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=16, cpu_gemm_dispatch=False)
    LLM(str(directory), attention_backend="torch", fused_kernels=False, gemm_epilogue_fusion=False, pdl=False,
        pdl_max_rows=3, cpu_weight_prefetch_mib=0, **common)
    from thinkwise.kernels import cpu_quant_gemm, fused

    assert paged_attention.ATTENTION_BACKEND == "torch" and not fused.FUSED
    assert not linear_dispatch.epilogue_fusion_enabled() and not pdl.enabled() and pdl.max_rows() == 3
    assert cpu_quant_gemm.weight_prefetch_mib() == 0
    monkeypatch.setenv("THINKWISE_PDL", "1")
    monkeypatch.setenv("THINKWISE_ATTENTION", "auto")
    monkeypatch.setenv("THINKWISE_CPU_WEIGHT_PREFETCH", "2.5")
    llm = LLM(str(directory), pdl=False, attention_backend="torch", **common)
    assert llm.engine.config.pdl and pdl.enabled() and paged_attention.ATTENTION_BACKEND == "auto"
    assert cpu_quant_gemm.weight_prefetch_mib() == 2.5
