"""thinkwise/cli_live.py: streamed text and the strategy live view, fed with engine-shaped events."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

from thinkwise.cli_live import StrategyView, TextStream


def event(i, text, reason=None, final=None):
    return SimpleNamespace(sample_index=i, text=text, finish_reason=reason, final_text=final)


def test_one_sample_streams_plain_text():
    out = io.StringIO()
    stream = TextStream(1, out=out)
    stream.on_events([event(0, "Hel")])
    assert out.getvalue() == "Hel"  # written at once, not at the end
    stream.on_events([event(0, "lo")])
    stream.on_events([event(0, "!", "stop", "Hello!")])
    assert out.getvalue() == "Hello!\n"
    assert stream.texts[0] == "Hello!" and stream.finish_reasons[0] == "stop"


def test_a_stop_string_cut_later_is_never_printed():
    out = io.StringIO()
    stream = TextStream(1, out=out, stops=["END"])
    stream.on_events([event(0, "answer 4 E")])
    stream.on_events([event(0, "N")])
    assert "E" not in out.getvalue()[len("answer 4"):]
    stream.on_events([event(0, "", "stop", "answer 4 ")])  # the engine cut "END"
    assert out.getvalue() == "answer 4 \n"


def test_several_samples_are_labelled_whole_lines():
    out = io.StringIO()
    stream = TextStream(2, out=out)
    stream.on_events([event(0, "a1\na"), event(1, "b1")])
    assert out.getvalue() == "[0] a1\n"
    stream.on_events([event(1, "\nb2", "length", "b1\nb2"), event(0, "2", "stop", "a1\na2")])
    lines = out.getvalue().splitlines()
    assert lines == ["[0] a1", "[1] b1", "[1] b2", "[1] -- finished (length)", "[0] a2", "[0] -- finished (stop)"]


def test_interrupted_flushes_what_was_held_back():
    out = io.StringIO()
    stream = TextStream(1, out=out, stops=["STOP"])
    stream.on_events([event(0, "partial tex")])
    stream.interrupted()
    assert out.getvalue() == "partial tex\n"
    silent = TextStream(1, out=io.StringIO(), enabled=False)
    silent.on_events([event(0, "kept")])
    assert silent.texts[0] == "kept" and silent.out.getvalue() == ""


class FakeGroup:
    """The surface strategies see: texts, token counts, finish/abort reasons, next_events()."""

    def __init__(self, k, script):
        self.k = k
        self.texts, self.num_tokens = [""] * k, [0] * k
        self.finish_reasons, self.abort_reasons = [None] * k, [None] * k
        self.script = list(script)

    async def next_events(self):
        i, text, reason = self.script.pop(0)
        self.texts[i] += text
        self.num_tokens[i] += 1
        self.finish_reasons[i] = reason
        return [(i, reason)]

    async def wait(self):
        while self.script:
            await self.next_events()


class FakeBackend:
    intensity = 0.0

    def __init__(self, group):
        self.group = group

    async def start(self, prompt, params):
        return self.group


def test_view_counts_states_and_votes_and_logs_only_changes():
    out = io.StringIO()
    view = StrategyView("last_number", out=out, stream=False, live=False)
    group = FakeGroup(3, [(0, "so 12", None), (0, " then 42", "stop"), (1, "I think 42", "stop"),
                          (2, "7", "abort")])
    backend = view.watch(FakeBackend(group))
    assert backend.intensity == 0.0  # everything else reaches the wrapped backend

    async def run():
        started = await backend.start([1], None)
        await started.wait()  # wait() goes through the watched next_events

    asyncio.run(run())
    assert view.status().startswith("samples: 0 running, 2 finished, 1 aborted")
    assert "votes: '42' x2" in view.status()
    lines = out.getvalue().splitlines()
    # one line when the view starts, then one per change of state, none for plain tokens
    assert len(lines) == 4 and lines[-1] == view.status()


def test_view_streams_labelled_sample_text_and_redraws_in_place_on_a_terminal():
    out = io.StringIO()
    view = StrategyView("auto", out=out, stream=True, live=True)
    group = FakeGroup(2, [(0, "x = 1\n", None), (1, "answer: 3", "stop"), (0, "y", "length")])
    backend = view.watch(FakeBackend(group))

    async def run():
        await (await backend.start([1], None)).wait()

    asyncio.run(run())
    view.close()
    text = out.getvalue()
    assert "[0] x = 1\n" in text and "[1] answer: 3\n" in text and "[0] -- hit --max-tokens" in text
    assert "\r\x1b[K" in text and text.endswith("\n")
    rows = view.samples()
    assert [r["finish_reason"] for r in rows] == ["length", "stop"]
