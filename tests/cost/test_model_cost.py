"""Cost attribution on the tiny Llama equals a hand computation from its config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.tiny_models import make_tiny_model
from thinkwise import LLM, SamplingParams
from thinkwise.cost import ModelCostSpec, attribute_step
from thinkwise.engine.scheduler import SharedPrefix
from thinkwise.engine.sequence import TokenCounts
from thinkwise.loading.hf_dir import load_hf_dir
from thinkwise.models import build_model

# tests/tiny_models.py, llama: vocab 260, hidden 64, intermediate 128, 2 layers, 4 heads,
# 2 KV heads, head_dim 16, untied lm_head; the engine runs it in fp32 (4 bytes).
LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, ELEMENT = 2, 64, 128, 4, 2, 16, 260, 4
# per layer: q/k/v 64 x (64 + 32 + 32) = 8,192; o 64 x 64 = 4,096; gate/up/down 3 x 64 x 128 = 24,576
DENSE = 2 * (8_192 + 4_096 + 24_576)  # = 73,728 weights a token passes through
LM_HEAD_FLOPS = 2 * 64 * 260  # = 33,280 per sampled row
ATTENTION_PER_PAIR = 2 * 2 * 2 * 4 * 16  # (QK^T + PV) x 2 FLOPs x 2 layers x 4 heads x 16 = 512
BODY_BYTES = 4 * (DENSE + 2 * (64 + 64) + 64)  # layers + their 2 norms each + final norm = 296,192
LM_HEAD_BYTES = 4 * 260 * 64  # = 66,560, read in steps that sample
ROW_BYTES = 4 * 64  # one embedding row per computed token
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x 16 x 4 bytes = 512


def step_flops(new_tokens: int, end: int, sampled: bool = True) -> int:
    """One sequence's FLOPs for computing positions end - new_tokens .. end - 1 (causal)."""
    pairs = sum(range(end - new_tokens + 1, end + 1))  # position i attends to i + 1 keys
    return 2 * DENSE * new_tokens + ATTENTION_PER_PAIR * pairs + (LM_HEAD_FLOPS if sampled else 0)


@pytest.fixture()
def llm(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
               enable_prefix_caching=False)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_spec_is_the_hand_computation(llm):
    spec = ModelCostSpec.from_config(llm.engine.model_config, torch.float32)
    assert spec.dense_params == DENSE
    assert spec.body_weight_bytes == BODY_BYTES and spec.lm_head_bytes == LM_HEAD_BYTES
    assert spec.embedding_row_bytes == ROW_BYTES and spec.kv_bytes_per_token == KV_PER_TOKEN
    assert spec.attention_flops(0, 1) == ATTENTION_PER_PAIR and spec.lm_head_flops() == LM_HEAD_FLOPS


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen2", True),
                                       ("mistral", False), ("gemma3", False), ("gemma3", True)])
def test_weight_bytes_are_the_model_parameters(arch, tied, tmp_path):
    """Biases (Qwen2), q/k norms (Qwen3, Gemma 3), Gemma's four norms a layer and a tied
    lm_head are counted as the model stores them (the registry's cost shape)."""
    make_tiny_model(arch, tmp_path, tie_word_embeddings=tied)
    loaded = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    spec = ModelCostSpec.from_config(loaded.config, torch.bfloat16)
    model = build_model(loaded, device=torch.device("cpu"), dtype=torch.bfloat16)
    stored = sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
    assert spec.weight_bytes == 2 * stored
    table = 2 * loaded.config.vocab_size * loaded.config.hidden_size
    assert spec.body_weight_bytes + spec.lm_head_bytes + (0 if tied else table) == spec.weight_bytes


def test_one_request_prefill_and_three_decodes(llm):
    counts = llm.generate([256, 1, 2, 3, 4], greedy(4))[0].counts
    # Step 1: prefill positions 0-4 (samples token 1); steps 2-4 decode at contexts 6, 7, 8.
    assert counts.flops == step_flops(5, 5) + step_flops(1, 6) + step_flops(1, 7) + step_flops(1, 8)
    assert counts.bytes_weights == 4 * (BODY_BYTES + LM_HEAD_BYTES) + (5 + 3) * ROW_BYTES
    # Each step reads K/V of the whole context (the new tokens' included) and writes the new tokens.
    assert counts.bytes_kv == KV_PER_TOKEN * ((5 + 5) + (6 + 1) + (7 + 1) + (8 + 1))
    assert counts.device_time_s == 0.0 and counts.energy_j is None  # CPU: no GPU timer or energy counter


def test_batch_of_two_splits_the_weights(llm):
    outs = llm.generate([[256, 1, 2], [256, 5, 6, 7]], greedy(3))
    a, b = (o.counts for o in outs)
    # Both run in the same three steps, both sampled each time: each carries half of every read.
    assert a.bytes_weights == 3 * (BODY_BYTES + LM_HEAD_BYTES) / 2 + (3 + 2) * ROW_BYTES
    assert b.bytes_weights == 3 * (BODY_BYTES + LM_HEAD_BYTES) / 2 + (4 + 2) * ROW_BYTES
    assert a.flops == step_flops(3, 3) + step_flops(1, 4) + step_flops(1, 5)
    assert b.flops == step_flops(4, 4) + step_flops(1, 5) + step_flops(1, 6)
    assert a.bytes_kv == KV_PER_TOKEN * ((3 + 3) + (4 + 1) + (5 + 1))
    assert b.bytes_kv == KV_PER_TOKEN * ((4 + 4) + (5 + 1) + (6 + 1))


def test_chunked_prefill_reads_the_lm_head_only_when_it_samples(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
              enable_prefix_caching=False, max_num_batched_tokens=4)
    counts = llm.generate([[256] + list(range(1, 10))], greedy(2))[0].counts
    # A 10-token prompt in chunks 0-3, 4-7, 8-9 (the last samples), then one decode at context 11.
    assert counts.flops == (step_flops(4, 4, sampled=False) + step_flops(4, 8, sampled=False)
                            + step_flops(2, 10) + step_flops(1, 11))
    assert counts.bytes_weights == 4 * BODY_BYTES + 2 * LM_HEAD_BYTES + (10 + 1) * ROW_BYTES
    assert counts.bytes_kv == KV_PER_TOKEN * ((4 + 4) + (8 + 4) + (10 + 2) + (11 + 1))


def test_prefix_cache_hit_costs_no_prompt_flops(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    prompt = [256, 1, 2, 3, 4, 5, 6, 7, 8]
    llm.generate([prompt], greedy(1))
    counts = llm.generate([prompt], greedy(2))[0].counts
    # Two full blocks (8 tokens) come from the cache: only position 8 is computed, then one decode.
    assert counts.prompt_tokens_cached == 8
    assert counts.flops == step_flops(1, 9) + step_flops(1, 10)
    assert counts.bytes_kv == KV_PER_TOKEN * ((9 + 1) + (10 + 1))


def test_forked_samples_count_the_prompt_once(llm):
    out = llm.generate([256, 1, 2, 3, 4, 5, 6, 7], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=2,
                                                                   ignore_eos=True))[0]
    counts = out.counts
    # One prefill (8 tokens, sampled once: the three samples draw from the same logits), then
    # the three samples decode one token each at context 9, in one step.
    assert counts.flops == step_flops(8, 8) + 3 * step_flops(1, 9)
    # (the decode step's reads are split in thirds, so equal up to float rounding)
    assert counts.bytes_weights == pytest.approx(2 * (BODY_BYTES + LM_HEAD_BYTES) + (8 + 3) * ROW_BYTES, rel=1e-12)
    # On CPU every sample reads its own context (no cascade groups): the prompt's KV 3 times.
    assert counts.bytes_kv == KV_PER_TOKEN * ((8 + 8) + 3 * (9 + 1))


def test_aborted_samples_count_their_tokens(llm):
    engine = llm.engine
    request = engine.add_request([256, 1, 2], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=50,
                                                             ignore_eos=True))
    for _ in range(4):
        engine.step()
    first, second = request.sequences
    engine.abort_sequence(first)
    engine.step()
    engine.abort_sequence(second)
    assert request.counts.aborted_tokens == 4 + 5
    assert request.counts.generated_tokens == 4 + 5


def fake_sequence(num_computed: int) -> SimpleNamespace:
    return SimpleNamespace(num_computed_tokens=num_computed, request=SimpleNamespace(counts=TokenCounts()))


def test_a_shared_prefix_group_reads_its_prefix_once():
    """What the cascade-attention path reports: three samples sharing 8 prompt tokens, plus
    one unrelated decode row, in one step."""
    spec = ModelCostSpec.from_config(SimpleNamespace(
        architecture="llama", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        intermediate_size=INTER, vocab_size=VOCAB, attention_bias=False, qk_norm=False,
        tie_word_embeddings=False), torch.float32)
    samples = [fake_sequence(10) for _ in range(3)]
    other = fake_sequence(6)
    sequences = [samples[0], other, samples[1], samples[2]]
    attribute_step(spec, sequences, [1, 1, 1, 1], [True] * 4, [SharedPrefix(members=[0, 2, 3], shared_tokens=8)])
    for seq in samples:
        # a third of the shared 8 tokens, its own 3 (positions 8-10) read, 1 written
        assert seq.request.counts.bytes_kv == pytest.approx(KV_PER_TOKEN * (8 / 3 + 3 + 1), rel=1e-12)
        assert seq.request.counts.flops == step_flops(1, 11)
    assert other.request.counts.bytes_kv == KV_PER_TOKEN * (7 + 1)
    assert sum(s.request.counts.bytes_kv for s in sequences) == pytest.approx(KV_PER_TOKEN * (8 + 3 * 4 + 8))
    for seq in sequences:
        assert seq.request.counts.bytes_weights == (BODY_BYTES + LM_HEAD_BYTES) / 4 + ROW_BYTES


def tiny_spec() -> ModelCostSpec:
    return ModelCostSpec.from_config(SimpleNamespace(
        architecture="llama", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        intermediate_size=INTER, vocab_size=VOCAB, attention_bias=False, qk_norm=False,
        tie_word_embeddings=False), torch.float32)


def test_a_prefill_chunk_that_samples_nothing_pays_no_lm_head_share():
    """One step mixing a mid-prompt prefill chunk (8 tokens, no row sampled) with three
    decode rows: the lm_head is read once, split over the three sampled rows only."""
    chunk = fake_sequence(4)  # positions 4-11 of a longer prompt
    decodes = [fake_sequence(c) for c in (5, 9, 20)]
    sequences = [decodes[0], chunk, decodes[1], decodes[2]]
    attribute_step(tiny_spec(), sequences, [1, 8, 1, 1], [True, False, True, True])
    assert chunk.request.counts.bytes_weights == BODY_BYTES / 4 + 8 * ROW_BYTES
    assert chunk.request.counts.flops == step_flops(8, 12, sampled=False)
    for seq, context in zip(decodes, (6, 10, 21)):
        assert seq.request.counts.bytes_weights == pytest.approx(BODY_BYTES / 4 + LM_HEAD_BYTES / 3 + ROW_BYTES,
                                                                 rel=1e-12)
        assert seq.request.counts.flops == step_flops(1, context)
    # Every weight byte the step read is charged once: the body, one lm_head, 11 embedding rows.
    assert sum(s.request.counts.bytes_weights for s in sequences) == pytest.approx(
        BODY_BYTES + LM_HEAD_BYTES + 11 * ROW_BYTES, rel=1e-12)


def test_a_step_that_samples_nothing_reads_no_lm_head():
    chunks = [fake_sequence(0), fake_sequence(8)]
    attribute_step(tiny_spec(), chunks, [8, 4], [False, False])
    assert sum(s.request.counts.bytes_weights for s in chunks) == BODY_BYTES + 12 * ROW_BYTES
    assert chunks[0].request.counts.flops == step_flops(8, 8, sampled=False)


@pytest.mark.parametrize("first,end", [(0, 1), (0, 23), (5, 6), (4, 9), (9, 30), (30, 31)])
def test_windowed_layers_count_only_the_keys_they_see(tmp_path, first, end):
    """Gemma 3's tiny config: layers 0 and 2 see the last TINY_WINDOW keys, layer 1 all."""
    from tests.tiny_models import TINY_WINDOW

    make_tiny_model("gemma3", tmp_path)
    config = load_hf_dir(tmp_path).config
    spec = ModelCostSpec.from_config(config, torch.float32)
    assert spec.layer_windows == (TINY_WINDOW, None, TINY_WINDOW)
    pairs = sum(min(p + 1, w or p + 1) for w in spec.layer_windows for p in range(first, end))
    assert spec.attention_flops(first, end) == 4 * config.num_heads * config.head_dim * pairs


def test_fp8_kv_bytes_count_the_scales():
    """An fp8 cache stores 1-byte codes plus one fp32 scale per (token, KV head), for K and V:
    Qwen3-0.6B's shape (28 layers, 8 KV heads, head_dim 128) goes from 114,688 bytes a token
    in bf16 to 2 x 28 x 8 x (128 + 4) = 59,136, 1.94x the tokens for the same memory."""
    from thinkwise.loading.config import ModelConfig

    config = ModelConfig(architecture="qwen3", vocab_size=1000, hidden_size=1024, intermediate_size=3072,
                         num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True,
                         rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
    bf16 = ModelCostSpec.from_config(config, torch.bfloat16)
    fp8 = ModelCostSpec.from_config(config, torch.bfloat16, kv_dtype=torch.float8_e4m3fn)
    assert bf16.kv_bytes_per_token == 114_688 and fp8.kv_bytes_per_token == 59_136
    assert fp8.weight_bytes == bf16.weight_bytes  # the weights are untouched
