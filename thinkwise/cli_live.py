"""What the command line shows while a model generates: streamed text and a strategy's live view.

`TextStream` receives the engine's per-step `TokenEvent`s (through `LLM.generate`'s
`on_events`) and writes each sample's text as it grows: one sample as plain text, several
as whole lines labelled `[i]` so interleaved samples stay readable. It holds back the last
few characters while a stop string could still be forming (the engine cuts a stop string
that spans two steps), and keeps every sample's text so Ctrl-C can print what was made.
`StrategyView` wraps a strategy backend: every group of samples it starts is watched
after each step, and a status line (running / finished / aborted samples, tokens, votes
so far) is redrawn in place on a terminal or printed when it changes in a log. Text and
status go to stderr for strategies: stdout is kept for the answer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class _LabelledLines:
    """Per-sample text in, whole lines labelled with the sample's index out."""

    def __init__(self, out: TextIO):
        self.out = out
        self.pending: dict[int, str] = {}

    def add(self, index: int, text: str) -> None:
        buffer = self.pending.get(index, "") + text
        *lines, rest = buffer.split("\n")
        for line in lines:
            self.out.write(f"[{index}] {line}\n")
        self.pending[index] = rest

    def finish(self, index: int, note: str) -> None:
        rest = self.pending.pop(index, "")
        if rest:
            self.out.write(f"[{index}] {rest}\n")
        self.out.write(f"[{index}] -- {note}\n")


class TextStream:
    """Streams `generate`'s samples to `out` as the engine produces them."""

    def __init__(self, n: int, *, out: TextIO | None = None, stops: list[str] | None = None, enabled: bool = True):
        self.n, self.out, self.enabled = n, out or sys.stdout, enabled
        self.texts: dict[int, str] = {i: "" for i in range(n)}
        self.finish_reasons: dict[int, str | None] = {i: None for i in range(n)}
        self.printed: dict[int, int] = {i: 0 for i in range(n)}
        # A stop string may span steps and is then cut from text already reported: hold
        # back as many characters as could begin one.
        self.hold_back = max((len(s) for s in stops or []), default=1) - 1
        self.lines = _LabelledLines(self.out) if n > 1 else None

    def on_events(self, events) -> None:
        for event in events:
            i = event.sample_index
            self.texts[i] = event.final_text if event.final_text is not None else self.texts[i] + event.text
            if event.finish_reason is not None:
                self.finish_reasons[i] = event.finish_reason
            if self.enabled:
                self._emit(i)
        if self.enabled:
            self.out.flush()

    def _emit(self, i: int) -> None:
        text, done = self.texts[i], self.finish_reasons[i] is not None
        end = len(text) if done else max(self.printed[i], len(text) - self.hold_back)
        new = text[self.printed[i]:end]
        self.printed[i] = end
        if self.lines is None:
            self.out.write(new)
            if done and not text.endswith("\n"):
                self.out.write("\n")
        else:
            self.lines.add(i, new)
            if done:
                self.lines.finish(i, f"finished ({self.finish_reasons[i]})")

    def interrupted(self) -> None:
        """Ctrl-C while streaming: what was held back, and an end to the open lines."""
        if not self.enabled:
            return
        for i in range(self.n):
            if self.finish_reasons[i] is None:
                if self.lines is None:
                    self.out.write(self.texts[i][self.printed[i]:] + "\n")
                else:
                    self.lines.add(i, self.texts[i][self.printed[i]:])
                    self.lines.finish(i, "interrupted")
                self.printed[i] = len(self.texts[i])
        self.out.flush()


class _WatchedBackend:
    """A strategy backend whose sample groups report to a `StrategyView` after every step."""

    def __init__(self, inner, view: "StrategyView"):
        self._inner, self._view = inner, view

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def start(self, *args, **kwargs):
        group = await self._inner.start(*args, **kwargs)
        self._view.add_group(group)
        next_events = group.next_events

        async def watched_next_events():
            changes = await next_events()
            self._view.update()
            return changes

        group.next_events = watched_next_events  # wait() calls it too, so every step is seen
        return group


class StrategyView:
    """Live status of a strategy's samples on `out` (stderr), plus their text when `stream`."""

    def __init__(self, extract: str | Callable[[str], str | None] = "auto", *, out: TextIO | None = None,
                 stream: bool = True, live: bool | None = None, min_interval_s: float = 0.1):
        from functools import partial

        from thinkwise.tasks.extraction import extract_answer

        self.extract = extract if callable(extract) else partial(extract_answer, method=extract)
        self.out, self.stream = out or sys.stderr, stream
        self.live = self.out.isatty() if live is None else live  # redraw one line in place
        self.min_interval_s = min_interval_s
        self.groups: list = []
        self._answers: dict[tuple[int, int], str | None] = {}
        self._printed: dict[tuple[int, int], int] = {}
        self._closed: set[tuple[int, int]] = set()
        self._lines = _LabelledLines(self.out)
        self._last_status, self._last_draw, self._status_shown = "", 0.0, False

    def watch(self, backend):
        return _WatchedBackend(backend, self)

    def add_group(self, group) -> None:
        self.groups.append(group)
        self.update()

    # ------------------------------------------------------------------ state
    def samples(self) -> list[dict]:
        """Every sample so far: label, text, tokens, state and extracted answer."""
        rows, label = [], 0
        for g, group in enumerate(self.groups):
            for i in range(group.k):
                reason = group.finish_reasons[i]
                if reason is None and group.abort_reasons[i] is not None:
                    reason = "abort"
                answer = None
                if reason == "stop":
                    if (g, i) not in self._answers:
                        self._answers[(g, i)] = self.extract(group.texts[i])
                    answer = self._answers[(g, i)]
                rows.append({"index": label, "text": group.texts[i], "num_tokens": group.num_tokens[i],
                             "finish_reason": reason, "answer": answer, "key": (g, i)})
                label += 1
        return rows

    def status(self, rows: list[dict] | None = None) -> str:
        rows = self.samples() if rows is None else rows
        count = lambda reason: sum(1 for r in rows if r["finish_reason"] == reason)  # noqa: E731
        votes: dict[str, int] = {}
        for r in rows:
            if r["answer"] is not None:
                votes[r["answer"]] = votes.get(r["answer"], 0) + 1
        shown = ", ".join(f"{a!r} x{v}" for a, v in sorted(votes.items(), key=lambda x: -x[1])[:4]) or "none yet"
        parts = [f"{count(None)} running", f"{count('stop')} finished", f"{count('abort')} aborted"]
        if count("length"):
            parts.append(f"{count('length')} hit --max-tokens")
        tokens = sum(r["num_tokens"] for r in rows)
        return f"samples: {', '.join(parts)} | {tokens:,} tokens | votes: {shown}"

    # ------------------------------------------------------------------ drawing
    def update(self, force: bool = False) -> None:
        rows = self.samples()
        if self.stream:
            self._clear_status()
            for r in rows:
                start = self._printed.get(r["key"], 0)
                if start < len(r["text"]):
                    self._lines.add(r["index"], r["text"][start:])
                    self._printed[r["key"]] = len(r["text"])
                if r["finish_reason"] is not None and r["key"] not in self._closed:
                    self._closed.add(r["key"])
                    note = {"stop": f"finished, answer {r['answer']!r}", "abort": "aborted",
                            "length": "hit --max-tokens"}.get(r["finish_reason"], r["finish_reason"])
                    self._lines.finish(r["index"], note)
        status = self.status(rows)
        now = time.monotonic()
        if self.live:
            if force or status != self._last_status and now - self._last_draw >= self.min_interval_s or self.stream:
                self.out.write("\r\033[K" + status)
                self._status_shown, self._last_draw = True, now
        elif status.split(" | ")[0] != self._last_status.split(" | ")[0] or force:
            self.out.write(status + "\n")  # a log: one line whenever a sample changes state
        self._last_status = status
        self.out.flush()

    def _clear_status(self) -> None:
        if self.live and self._status_shown:
            self.out.write("\r\033[K")
            self._status_shown = False

    def close(self) -> None:
        """End the live line so what follows starts on a fresh one."""
        if self.live and self._status_shown:
            self.out.write("\n")
            self._status_shown = False
        self.out.flush()
