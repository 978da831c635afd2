"""`gpu_step_profile.py --linears`: its chain of a step's linear layers, run on the CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_step_profile import linear_chain
from thinkwise import LLM


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_linear_chain_runs_every_linear_layer_of_a_step_once(tiny_llama, quantization):
    directory, _ = tiny_llama
    llm = LLM(str(directory), quantization=quantization)
    model = llm.engine.runner.model
    config = model.config
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")):
            module.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
    chain = linear_chain(model, config, 3, torch.device("cpu"), model.norm.weight.dtype)
    outs = chain()
    layers = config.num_layers
    assert len(outs) == 4 * layers + 1
    widths = [config.num_heads * config.head_dim + 2 * config.num_kv_heads * config.head_dim, config.hidden_size,
              config.intermediate_size, config.hidden_size] * layers + [config.vocab_size]
    assert [tuple(o.shape) for o in outs] == [(3, w) for w in widths]
    assert all(torch.isfinite(o.float()).all() for o in outs)
    # each projection once, in step order (gate/up through forward_gated may call the module itself)
    assert [c for c in calls if not c.endswith("gate_up_proj")] == [
        n for i in range(layers) for n in (f"layers.{i}.self_attn.qkv_proj", f"layers.{i}.self_attn.o_proj",
                                           f"layers.{i}.mlp.down_proj")] + ["lm_head"]
