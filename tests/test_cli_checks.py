"""thinkwise/cli_checks.py: what the command line checks before a model loads, and its suggestions."""

from __future__ import annotations

import socket

import pytest
import torch

from thinkwise.cli_checks import (
    check_device, check_engine_options, check_listen_address, check_max_tokens, check_strategy, check_task_spec,
    did_you_mean, model_context_length,
)
from thinkwise.errors import InvalidParameterError


def test_did_you_mean_only_when_close():
    assert did_you_mean("--max-tokns", ["--max-tokens", "--seed"]) == "; did you mean --max-tokens?"
    assert did_you_mean("--zzz", ["--max-tokens", "--seed"]) == ""


@pytest.mark.parametrize("typo, fix", [("majorty@8", "majority@8"), ("short3@8", "short-3@8"),
                                       ("best_of_4", "best-of-4"), ("adaptve:16", "adaptive:16"),
                                       ("budgte:512", "budget:512"), ("gredy", "greedy")])
def test_unknown_strategy_suggests_the_right_shape(typo, fix):
    with pytest.raises(InvalidParameterError) as error:
        check_strategy(typo)
    assert error.value.message.endswith(f"did you mean {fix}?")
    assert "\n" not in error.value.message


def test_known_strategies_pass_and_hostile_ones_are_one_line_errors():
    assert check_strategy("short-m@k", k=8, m=3).m == 3
    for hostile in ("", "majority@", "short-9@3", "x" * 10_000, "majority@8\nrm -rf /"):
        with pytest.raises(InvalidParameterError) as error:
            check_strategy(hostile)
        assert "\n" not in error.value.message.replace(hostile, "")


def test_task_spec_suggests_a_family_and_checks_levels():
    with pytest.raises(InvalidParameterError, match="did you mean sequence"):
        check_task_spec("sequences:1")
    with pytest.raises(InvalidParameterError, match="did you mean hanoi"):
        check_task_spec("sum:2,hanio:3-5")
    with pytest.raises(InvalidParameterError, match="levels"):
        check_task_spec("hanoi:99")
    check_task_spec("hanoi:3-5,sum:2-4,sequence")


def test_device_names():
    check_device(None)
    check_device("cpu")
    with pytest.raises(InvalidParameterError, match="did you mean cuda"):
        check_device("gpu")
    with pytest.raises(InvalidParameterError, match="unknown device"):
        check_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameterError, match="--device cpu"):
            check_device("cuda")
    else:
        with pytest.raises(InvalidParameterError, match="CUDA GPU"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_engine_options_name_the_flag():
    check_engine_options({"block_size": 16, "max_num_seqs": 4})
    with pytest.raises(InvalidParameterError, match="^--block-size"):
        check_engine_options({"block_size": 0})
    with pytest.raises(InvalidParameterError, match="^--kv-blocks"):
        check_engine_options({"num_kv_blocks": 0})


def test_context_length_is_read_from_the_config_alone(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    assert model_context_length(str(directory)) == 512
    (tmp_path / "config.json").write_text("{not json")
    assert model_context_length(str(tmp_path)) is None  # the loader names the problem later
    assert model_context_length(str(tmp_path / "missing")) is None


@pytest.mark.slow
def test_context_length_of_the_default_model():
    assert model_context_length("default") == 32768


def test_max_tokens_against_the_context():
    check_max_tokens(256, 32768, None)
    with pytest.raises(InvalidParameterError, match="context holds 32,768 .* below 32768"):
        check_max_tokens(40000, 32768, None)
    with pytest.raises(InvalidParameterError, match="--max-model-len is 1,000"):
        check_max_tokens(2000, 32768, 1000)
    with pytest.raises(InvalidParameterError, match=">= 1"):
        check_max_tokens(0, None, None)
    check_max_tokens(10**6, None, None)  # unknown context: the engine's own checks apply


def test_listen_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidParameterError, match="already in use"):
            check_listen_address("127.0.0.1", port)
    for bad in (-1, 65536, 99999):
        with pytest.raises(InvalidParameterError, match="not a TCP port"):
            check_listen_address("127.0.0.1", bad)
    with pytest.raises(InvalidParameterError, match="--host"):
        check_listen_address("no-such-host.invalid", 8000)
    check_listen_address("127.0.0.1", 0)
    # The probe let go of the port: a free port is still free after the check.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    check_listen_address("127.0.0.1", free)
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))
