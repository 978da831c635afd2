"""AsyncEngine: concurrent consumers are batched, streams are complete, aborts free blocks."""

from __future__ import annotations

import asyncio

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.errors import InvalidParameterError


@pytest.fixture()
def async_engine(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    engine = AsyncEngine(llm.engine).start()
    yield llm, engine
    engine.shutdown()


PROMPTS = [[256, 1, 2, 3], [256, 40, 41, 42, 43, 44, 45, 46, 47, 48], [256, 99], [256, 5, 6, 7, 8, 9, 10]]


def test_concurrent_streams_equal_offline_results(async_engine):
    llm, engine = async_engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def consume(prompt):
        tokens, text, final = [], "", None
        async for item in engine.generate(prompt, params):
            for event in item.events:
                tokens += event.token_ids
                text += event.text
            final = item.final or final
        return tokens, text, final

    async def main():
        return await asyncio.gather(*(consume(p) for p in PROMPTS))

    results = asyncio.run(main())
    engine.shutdown()
    offline = llm.generate(PROMPTS, params)
    for (tokens, text, final), expected in zip(results, offline):
        assert tokens == expected.outputs[0].token_ids == final.outputs[0].token_ids
        assert text == expected.outputs[0].text == final.outputs[0].text
        assert final.finished


def test_closing_a_stream_aborts_and_frees_blocks(async_engine):
    llm, engine = async_engine
    bm = llm.engine.block_manager

    async def main():
        stream = engine.generate(PROMPTS[1], SamplingParams(n=3, max_tokens=200, ignore_eos=True))
        seen = 0
        async for item in stream:
            seen += len(item.events)
            if seen >= 6:
                break
        await stream.aclose()
        return await engine.call(lambda e: (bm.num_free_blocks, e.has_unfinished_requests()))

    free, unfinished = asyncio.run(main())
    assert free == bm.num_blocks and not unfinished


def test_bad_request_raises_to_its_caller_only(async_engine):
    llm, engine = async_engine

    async def main():
        with pytest.raises(InvalidParameterError):
            async for _ in engine.generate([], SamplingParams()):
                pass
        good = [item async for item in engine.generate(PROMPTS[0], SamplingParams(max_tokens=3))]
        return good[-1].final

    final = asyncio.run(main())
    assert final.finished and len(final.outputs[0].token_ids) <= 3
