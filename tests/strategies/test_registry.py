"""The strategy registry: every strategy and every parameter round-trips through the string,
the Python API, the CLI flags and the server's extra_body (and model-name prefix); hostile
strings and out-of-range values are one-line errors naming the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from thinkwise.cli import _strategy_options, build_parser
from thinkwise.cli_checks import check_strategy
from thinkwise.errors import InvalidParameterError, ThinkwiseError
from thinkwise.server.protocol import ChatCompletionRequest
from thinkwise.server.strategy_serving import requested_strategy
from thinkwise.strategies import (
    REGISTRY, STRATEGY_HELP, StrategySpec, model_prefix_strategy, parse_strategy, split_strategies, strategy_help,
)
from thinkwise.strategies.base import Backend, LocalBackend, LocalSampleGroup, SampleGroup
from thinkwise.strategies.remote import RemoteBackend, RemoteGroup

MODEL = "tiny"
# Per kind: a name, and a non-default value for every parameter the name does not carry.
EXAMPLES = {
    "greedy": ("greedy", {}),
    "majority": ("majority@6", {}),
    "short": ("short-2@6", {}),
    "best_of_n": ("best-of-5", {}),
    "weighted_best_of_n": ("weighted-best-of-5", {}),
    "adaptive": ("adaptive:12", {"round_size": 3, "threshold": 0.9}),
    "budget": ("budget:300", {"k": 3, "min_thinking_tokens": 20}),
    "deepconf": ("deepconf@12", {"eta": 10.0, "window": 256, "confidence_k": 5, "score": "tail"}),
    "deepconf_online": ("deepconf-online@12", {"eta": 10.0, "window": 128, "confidence_k": 8, "tau": 0.9,
                                               "warmup": 5}),
    "probe": ("probe:24", {"probe_agree": 4, "probe_tokens": 6}),
    "probe_majority": ("probe-majority@4", {"probe_every": 16, "probe_agree": 2, "probe_tokens": 7}),
    "first_pass": ("first-pass@6", {"pass_score": 0.5}),
}


def test_every_strategy_and_parameter_has_an_example():
    assert set(EXAMPLES) == set(REGISTRY)
    for kind, (name, options) in EXAMPLES.items():
        spec = parse_strategy(name)
        named = {key for key, value in spec.values.items() if str(value) in name}
        assert set(spec.values) <= named | set(options), f"{kind}: an example must set every parameter"
        for key, value in options.items():
            assert spec.values[key] != value, f"{kind}.{key}: the example must differ from the default"


def string_form(name: str, options: dict) -> str:
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else "")


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_string_api_cli_and_server_give_the_same_spec(kind):
    name, options = EXAMPLES[kind]
    from_string = parse_strategy(string_form(name, options))
    assert from_string.kind == kind
    for key, value in options.items():
        assert getattr(from_string, key) == value
    # Python API: keyword arguments.
    assert parse_strategy(name, **options) == from_string
    # CLI: generated flags (k has its own --k, which fills only a placeholder).
    flags = []
    for key, value in options.items():
        flags += ["--k" if key == "k" else "--" + key.replace("_", "-"), str(value)]
    args = build_parser().parse_args(["solve", "--strategy", name, *flags, "question"])
    cli = check_strategy(args.strategy, k=args.k if "k" in options else None, m=args.m, budget=args.budget,
                         **_strategy_options(args))
    assert cli == from_string
    # Server: thinkwise fields, and the model-name prefix with the options in the string.
    serving = SimpleNamespace(settings=SimpleNamespace(served_model_names=[MODEL]), check_model=lambda name: None)
    request = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                    thinkwise={"strategy": name, **options})
    assert requested_strategy(serving, request) == (from_string, MODEL)
    prefixed = ChatCompletionRequest(model=f"{string_form(name, options)}/{MODEL}",
                                     messages=[{"role": "user", "content": "q"}])
    assert requested_strategy(serving, prefixed) == (from_string, MODEL)
    # The prefix's strategy with its options as fields of the thinkwise object.
    both = ChatCompletionRequest(model=f"{name}/{MODEL}", messages=[{"role": "user", "content": "q"}],
                                 thinkwise={**options, **({"answer": "1"} if not options else {})})
    assert requested_strategy(serving, both) == (from_string, MODEL)


def test_placeholders_are_filled_from_arguments():
    assert parse_strategy("short-m@k", k=8, m=3) == parse_strategy("short-3@8")
    assert parse_strategy("deepconf-online@k", k=16).warmup == 4
    assert model_prefix_strategy("short-m@k-8-3") == parse_strategy("short-3@8")
    assert model_prefix_strategy("deepconf@k-12") == parse_strategy("deepconf@12")
    assert parse_strategy("greedy", k=8).k == 1  # a fill-in a strategy lacks is ignored
    assert parse_strategy("budget:64", k=4).k == 4
    with pytest.raises(InvalidParameterError, match="needs k"):
        parse_strategy("probe-majority@k")


def test_help_and_lists_come_from_the_registry(capsys):
    for definition in REGISTRY.values():
        assert definition.usage in STRATEGY_HELP and definition.help in strategy_help(verbose=True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["solve", "--help"])
    shown = capsys.readouterr().out
    for definition in REGISTRY.values():
        assert definition.usage in shown
    for flag in ("--eta", "--tau", "--window", "--warmup", "--probe-every", "--probe-agree", "--round-size",
                 "--threshold", "--min-thinking-tokens", "--pass-score", "--confidence-k"):
        assert flag in shown
    assert split_strategies("greedy, deepconf@8(eta=10, tau=1),probe:32") == \
        ["greedy", "deepconf@8(eta=10, tau=1)", "probe:32"]


@pytest.mark.parametrize("hostile, field", [
    ("majority@8(eta=10)", "eta"),  # an option the strategy does not take
    ("deepconf@8(eta=10, eta=20)", "eta"),
    ("deepconf@8(eta)", "strategy"),
    ("deepconf@8(eta=10", "strategy"),
    ("deepconf@8((eta=10))", "strategy"),
    ("deepconf@8(=3)", "strategy"),
    ("deepconf@8(eta=1e400)", "eta"),
    ("deepconf@8(window=" + "9" * 5000 + ")", "strategy"),
    ("deepconf@" + "9" * 30, "k"),
    ("adaptive:16(round_size=0)", "round_size"),
    ("adaptive:16(threshold=0.2)", "threshold"),
    ("adaptive:16(round_size=2.5)", "round_size"),
    ("budget:10(min_thinking_tokens=11)", "min_thinking_tokens"),
    ("first-pass@4(pass_score=abc)", "pass_score"),
    ("short-3@8(m=2)", "m"),
    ("majority@8\nrm -rf /", "strategy"),
    ("deepconf@8(eta=10)\x00", "strategy"),
    ("majority@0", "k"),
])
def test_hostile_strategy_strings_are_one_line_errors_naming_the_field(hostile, field):
    with pytest.raises(InvalidParameterError) as error:
        check_strategy(hostile)
    assert error.value.param == field
    assert "\n" not in error.value.message.replace(hostile[:60], "").replace(repr(hostile)[1:-1], "")
    assert len(error.value.message) < 600


def test_unknown_and_conflicting_arguments():
    with pytest.raises(InvalidParameterError, match="tau is not a parameter of deepconf@K") as error:
        parse_strategy("deepconf@8", tau=0.9)
    assert error.value.param == "tau"
    with pytest.raises(InvalidParameterError, match="given both"):
        parse_strategy("probe:8", probe_every=16)
    with pytest.raises(InvalidParameterError, match="twice"):
        parse_strategy("deepconf@8(eta=10)", eta=20)
    assert parse_strategy("deepconf@8(eta=10)", eta=10).eta == 10.0
    with pytest.raises(InvalidParameterError, match="boolean"):
        parse_strategy("deepconf@8", eta=True)
    with pytest.raises(InvalidParameterError):
        parse_strategy(["majority@8"])  # not a string


@pytest.mark.parametrize("thinkwise, field", [
    ({"strategy": "deepconf@8", "eta": 0}, "thinkwise.eta"),
    ({"strategy": "deepconf@8", "eta": "10"}, "thinkwise.eta"),
    ({"strategy": "deepconf-online@8", "tau": 2}, "thinkwise.tau"),
    ({"strategy": "deepconf-online@8", "warmup": 9}, "thinkwise.warmup"),
    ({"strategy": "deepconf@8", "window": -1}, "thinkwise.window"),
    ({"strategy": "probe:8", "probe_agree": 0}, "thinkwise.probe_agree"),
    ({"strategy": "deepconf@8", "telepathy": 1}, "thinkwise.telepathy"),
    ({"strategy": "majority@8", "eta": 10}, "thinkwise.eta"),
    ({"strategy": "deepconf@8", "score": 3}, "thinkwise.score"),
    ({"strategy": "deepconf@8", "eta": [1]}, "thinkwise.eta"),
])
def test_server_fields_out_of_range_are_errors_naming_the_field(thinkwise, field):
    serving = SimpleNamespace(settings=SimpleNamespace(served_model_names=[MODEL]), check_model=lambda name: None)
    request = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "q"}], thinkwise=thinkwise)
    with pytest.raises(ThinkwiseError) as error:
        requested_strategy(serving, request)
    assert error.value.param == field and field in error.value.message


def test_both_backends_implement_the_protocols():
    # Structural checks: the attributes and methods strategies are typed against.
    for cls in (LocalSampleGroup, RemoteGroup):
        for member in ("done", "next_events", "wait", "abort_sample", "abort_rest"):
            assert callable(getattr(cls, member, None)) or isinstance(getattr(cls, member), property)
    remote = RemoteBackend("http://127.0.0.1:9/v1", model="m")
    assert isinstance(remote, Backend) and not remote.is_local
    group = RemoteGroup(remote, "/chat/completions", [(0, {"n": 2})], 2, [])
    assert isinstance(group, SampleGroup) and group.token_confidences == [[], []]
    assert LocalBackend.is_local and isinstance(StrategySpec("greedy"), StrategySpec)


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "first-pass@4"], "first-pass@4 needs a checker"),
    (["--strategy", "deepconf-online@4", "--tau", "3"], "tau (of deepconf-online@K) must be in (0, 1]"),
    (["--strategy", "deepconf@4", "--eta", "ten"], "eta (of deepconf@K) must be a number"),
    (["--strategy", "majority@4", "--probe-every", "8"], "probe_every is not a parameter of majority@K"),
    (["--strategy", "probe:32", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"],
     "probe:P cannot run over a remote server"),
])
def test_cli_refuses_before_loading_a_model(argv, message, capsys):
    from thinkwise.cli import main

    assert main(["solve", *argv, "question"]) == 2
    assert message in capsys.readouterr().err
