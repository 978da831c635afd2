"""Verifiers: the exact checker, reward models, and the re-exports of the sandboxed runner."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import byte_tokenizer, make_tiny_model, tiny_config
from thinkwise.errors import InvalidParameterError, ModelNotFoundError
from thinkwise.tasks import sandbox
from thinkwise.tasks.verifiers import ExactChecker, RewardModelVerifier


def test_the_sandbox_is_reexported_where_strategies_import_it():
    from thinkwise.strategies import verifiers as strategy_verifiers
    from thinkwise.tasks import verifiers

    for name in ("CodeTestVerifier", "CodeTestResult", "TestCaseResult", "code_from_completion", "OUTCOMES"):
        assert getattr(verifiers, name) is getattr(sandbox, name) is getattr(strategy_verifiers, name)
    for name in ("ExactChecker", "RewardModelVerifier"):
        assert getattr(strategy_verifiers, name) is getattr(verifiers, name)


# ----------------------------------------------------------------------------- exact checker


def test_exact_checker_compares_numerically_and_extracts_when_needed():
    checker = ExactChecker("1000")
    assert checker.score("q", "so", "1,000") == 1.0
    assert checker.score("q", "The answer is 1e3.", None) == 1.0
    assert checker.score("q", "The answer is 999.", None) == 0.0
    assert checker.score_many("q", ["\\boxed{1000}", "7"], None) == [1.0, 0.0]
    assert ExactChecker(lambda a: a == "B", method="choice").score("q", "The answer is (B)", None) == 1.0
    assert ExactChecker(lambda a: a is None).score("q", "", None) == 1.0
    with pytest.raises(InvalidParameterError):
        ExactChecker("1", method="nope")
    with pytest.raises(InvalidParameterError):
        checker.score_many("q", ["1", "2"], ["1"])


# ----------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    """A 1-label Llama and a 2-label Qwen2 sequence classifier, plus a causal LM."""
    dirs = {}
    for name, arch, labels in (("llama1", "llama", 1), ("qwen2", "qwen2", 2)):
        from transformers import LlamaForSequenceClassification, Qwen2ForSequenceClassification
        cls = {"llama": LlamaForSequenceClassification, "qwen2": Qwen2ForSequenceClassification}[arch]
        torch.manual_seed(3)
        model = cls(tiny_config(arch, num_labels=labels)).eval()
        with torch.no_grad():
            model.score.weight.mul_(50)  # random heads give near-zero logits; spread them
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        byte_tokenizer().save_pretrained(directory)
        dirs[name] = (directory, model)
    causal = tmp_path_factory.mktemp("causal")
    make_tiny_model("llama", causal)
    dirs["causal"] = (causal, None)
    return dirs


COMPLETIONS = ["The answer is 4.", "It is 5, since 2 + 2 is five.", "4", "", "Let me think step by step " * 5]


def reference_score(model, tokenizer, prompt, completion, labels):
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tokenizer(prompt + completion, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0]
    return float(logits[0]) if labels == 1 else float(logits[1] - logits[0])


@pytest.mark.parametrize("name, labels", [("llama1", 1), ("qwen2", 2)])
def test_reward_model_scores_match_transformers_and_batching(reward_dirs, name, labels):
    directory, model = reward_dirs[name]
    verifier = RewardModelVerifier(str(directory), batch_size=3)
    one_by_one = [verifier.score("What is 2+2?", c) for c in COMPLETIONS]
    batched = verifier.score_many("What is 2+2?", COMPLETIONS)
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert verifier.score_many("What is 2+2?", COMPLETIONS) == batched  # deterministic
    expected = [reference_score(model, verifier.tokenizer, "What is 2+2?", c, labels) for c in COMPLETIONS]
    assert one_by_one == pytest.approx(expected, abs=1e-4)
    assert len({round(s, 4) for s in one_by_one}) > 1  # the scores do depend on the text


def test_reward_model_without_chat_template_concatenates(reward_dirs, tmp_path):
    directory, model = reward_dirs["llama1"]
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    verifier = RewardModelVerifier(plain)
    assert not verifier.tokenizer.chat_template
    expected = [reference_score(model, verifier.tokenizer, "Q: ", c, 1) for c in COMPLETIONS]
    assert verifier.score_many("Q: ", COMPLETIONS) == pytest.approx(expected, abs=1e-4)


def test_reward_model_user_errors(reward_dirs, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        RewardModelVerifier(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        RewardModelVerifier(tmp_path)
    with pytest.raises(InvalidParameterError, match="not a sequence-classification"):
        RewardModelVerifier(reward_dirs["causal"][0])
