"""Puzzles with simulators ("The Illusion of Thinking") and constraint problems.

Tower of Hanoi, checker jumping, river crossing and blocks world are checked by playing
the proposed moves in a simulator: every move must be legal and the final state must be
the goal, so any valid solution counts, not only the reference (which is optimal for
Hanoi, checker jumping and river crossing — found by breadth-first search — and a
simple valid plan for blocks world). N-Queens, graph colouring and 3-SAT are checked by
testing the proposed solution against the constraints; instances are built around a
planted solution so they are always solvable. The level is the size: disks, checkers
per side, pairs on the river bank, blocks, board size, vertices, variables.
"""

from __future__ import annotations

import re
from collections import deque

from thinkwise.tasks.base import Problem, TaskFamily, register
from thinkwise.tasks.extraction import _ANSWER_MARKER


def answer_block(text: str) -> str:
    """Everything after the last `Answer:` marker (move lists span lines), else the text."""
    matches = list(_ANSWER_MARKER.finditer(text))
    return text[matches[-1].end():] if matches else text


class SimulatedFamily(TaskFamily):
    """Families whose answer is a sequence of moves, checked by simulation."""

    def parse(self, problem: Problem, text: str) -> list | None:
        raise NotImplementedError

    def format(self, moves: list) -> str:
        raise NotImplementedError

    def solved(self, problem: Problem, moves: list) -> bool:
        raise NotImplementedError

    def extract(self, problem, text):
        moves = self.parse(problem, answer_block(text))
        return self.format(moves) if moves else None

    def check(self, problem, text):
        moves = self.parse(problem, answer_block(text))
        return bool(moves) and self.solved(problem, moves)

    def reference_response(self, problem):
        return f"Here is the plan.\nAnswer: {problem.reference}"


@register
class HanoiFamily(SimulatedFamily):
    name, description = "hanoi", "Tower of Hanoi with N disks (level = N); moves simulated"
    min_level, max_level, default_levels = 1, 12, (3, 4, 5)

    def make(self, level, rng):
        moves: list[tuple[str, str]] = []

        def solve(n, source, target, spare):
            if n:
                solve(n - 1, source, spare, target)
                moves.append((source, target))
                solve(n - 1, spare, target, source)

        solve(level, "A", "C", "B")
        prompt = (f"Tower of Hanoi: {level} disks, numbered 1 (smallest) to {level} (largest), are stacked on peg A, "
                  "largest at the bottom. Move the whole stack to peg C, using peg B. Move one top disk at a time "
                  "and never put a larger disk on a smaller one. End your reply with `Answer:` followed by the "
                  "moves in order, each written as source->target, separated by commas (e.g. A->C, A->B, C->B).")
        return prompt, self.format(moves), {"disks": level}

    def parse(self, problem, text):
        return re.findall(r"\b([ABC])\s*(?:->|→|to)\s*([ABC])\b", text)

    def format(self, moves):
        return ", ".join(f"{a}->{b}" for a, b in moves)

    def solved(self, problem, moves):
        n = problem.data["disks"]
        pegs = {"A": list(range(n, 0, -1)), "B": [], "C": []}
        for source, target in moves:
            if not pegs[source] or (pegs[target] and pegs[target][-1] < pegs[source][-1]):
                return False
            pegs[target].append(pegs[source].pop())
        return pegs["C"] == list(range(n, 0, -1))


def _breadth_first(start, goal, successors):
    """Shortest list of moves from start to goal; successors(state) -> [(move, state)]."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if state == goal:
            path = []
            while previous[state] is not None:
                state, move = previous[state]
                path.append(move)
            return path[::-1]
        for move, nxt in successors(state):
            if nxt not in previous:
                previous[nxt] = (state, move)
                queue.append(nxt)
    return None


@register
class CheckerJumpingFamily(SimulatedFamily):
    name, description = "checkers", "checker jumping: swap N red and N blue checkers (level = N)"
    min_level, max_level, default_levels = 1, 5, (1, 2, 3)

    @staticmethod
    def step(board: str, position: int) -> str | None:
        """Move the checker at `position` (R moves right, B left) by a slide or a jump."""
        if not 0 <= position < len(board) or board[position] == "_":
            return None
        direction = 1 if board[position] == "R" else -1
        for distance in (1, 2):
            target = position + direction * distance
            if 0 <= target < len(board) and board[target] == "_":
                if distance == 2 and board[position + direction] == "_":
                    return None
                cells = list(board)
                cells[target], cells[position] = cells[position], "_"
                return "".join(cells)
            if not 0 <= target < len(board) or board[target] == "_":
                break
        return None

    def make(self, level, rng):
        start, goal = "R" * level + "_" + "B" * level, "B" * level + "_" + "R" * level
        moves = _breadth_first(start, goal, lambda s: [(p, n) for p in range(len(s)) if (n := self.step(s, p))])
        prompt = (f"Checker jumping: a row of {2 * level + 1} cells, numbered 0 to {2 * level}, holds {start} "
                  "(R red, B blue, _ empty). Red checkers move only right, blue only left; a checker slides into "
                  "the adjacent empty cell or jumps over exactly one checker into the empty cell. Reach "
                  f"{goal}. End your reply with `Answer:` followed by the cell number of the checker moved at "
                  "each step, comma-separated.")
        return prompt, self.format(moves), {"start": start, "goal": goal}

    def parse(self, problem, text):
        return [int(n) for n in re.findall(r"\b\d+\b", text)]

    def format(self, moves):
        return ", ".join(map(str, moves))

    def solved(self, problem, moves):
        board = problem.data["start"]
        for position in moves:
            board = self.step(board, position)
            if board is None:
                return False
        return board == problem.data["goal"]


@register
class RiverCrossingFamily(SimulatedFamily):
    name, description = "river", "missionaries and cannibals with N of each (level = N); boat capacity 2-4"
    min_level, max_level, default_levels = 1, 6, (2, 3, 4)

    @staticmethod
    def capacity(n: int) -> int:
        return 2 if n <= 3 else 3 if n <= 5 else 4

    @staticmethod
    def safe(m: int, c: int) -> bool:
        return m == 0 or m >= c

    def successors(self, n, state):
        m, c, boat_left = state
        cap = self.capacity(n)
        out = []
        for dm in range(cap + 1):
            for dc in range(cap + 1 - dm):
                if dm + dc == 0:
                    continue
                sign = -1 if boat_left else 1
                nm, nc = m + sign * dm, c + sign * dc
                if 0 <= nm <= n and 0 <= nc <= n and self.safe(nm, nc) and self.safe(n - nm, n - nc):
                    out.append(((dm, dc), (nm, nc, not boat_left)))
        return out

    def make(self, level, rng):
        moves = _breadth_first((level, level, True), (0, 0, False), lambda s: self.successors(level, s))
        cap = self.capacity(level)
        prompt = (f"River crossing: {level} missionaries and {level} cannibals are on the left bank with a boat "
                  f"that carries 1 to {cap} people. On neither bank may cannibals outnumber missionaries when any "
                  "missionaries are there (count after each crossing). Get everyone to the right bank. The boat "
                  "starts on the left and alternates sides. End your reply with `Answer:` followed by the "
                  "crossings in order, each as (missionaries, cannibals) in the boat, e.g. (1, 1), (1, 0).")
        return prompt, self.format(moves), {"pairs": level}

    def parse(self, problem, text):
        return [(int(a), int(b)) for a, b in re.findall(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", text)]

    def format(self, moves):
        return ", ".join(f"({m}, {c})" for m, c in moves)

    def solved(self, problem, moves):
        n = problem.data["pairs"]
        state = (n, n, True)
        for move in moves:
            allowed = dict(self.successors(n, state))
            if tuple(move) not in allowed:
                return False
            state = allowed[tuple(move)]
        return state == (0, 0, False)


@register
class BlocksWorldFamily(SimulatedFamily):
    name, description = "blocks", "blocks world: restack N blocks into a goal configuration (level = N)"
    min_level, max_level, default_levels = 2, 12, (3, 4, 6)

    @staticmethod
    def random_stacks(rng, blocks):
        stacks: list[list[str]] = []
        for block in rng.sample(blocks, len(blocks)):
            if stacks and rng.random() < 0.6:
                rng.choice(stacks).append(block)
            else:
                stacks.append([block])
        return stacks

    @staticmethod
    def describe(stacks):
        return "; ".join(" on ".join(reversed(stack)) + " on the table" for stack in stacks)

    def make(self, level, rng):
        blocks = [chr(ord("A") + i) for i in range(level)]
        start = self.random_stacks(rng, blocks)
        goal = self.random_stacks(rng, blocks)
        while sorted(map(tuple, goal)) == sorted(map(tuple, start)):
            goal = self.random_stacks(rng, blocks)
        moves = [(stack[i], "table") for stack in start for i in range(len(stack) - 1, 0, -1)]
        moves += [(stack[i], stack[i - 1]) for stack in goal for i in range(1, len(stack))]
        prompt = (f"Blocks world. Now: {self.describe(start)}. Goal: {self.describe(goal)}. You may move one "
                  "block at a time, only a block with nothing on it, onto the table or onto another block with "
                  "nothing on it. End your reply with `Answer:` followed by the moves in order, each written as "
                  "`X->Y` (block X onto block Y) or `X->table`, comma-separated.")
        return prompt, self.format(moves), {"start": start, "goal": goal}

    def parse(self, problem, text):
        return [(a, b if b.lower() != "table" else "table")
                for a, b in re.findall(r"\b([A-Z])\s*(?:->|→|onto|to)\s*([A-Z]\b|[Tt]able)", text)]

    def format(self, moves):
        return ", ".join(f"{a}->{b}" for a, b in moves)

    def solved(self, problem, moves):
        on = {}  # block -> what it sits on
        for stack in problem.data["start"]:
            for i, block in enumerate(stack):
                on[block] = stack[i - 1] if i else "table"

        def clear(block):
            return block not in on.values()

        for block, target in moves:
            if block not in on or block == target or not clear(block):
                return False
            if target != "table" and (target not in on or not clear(target)):
                return False
            on[block] = target
        goal = {block: (stack[i - 1] if i else "table")
                for stack in problem.data["goal"] for i, block in enumerate(stack)}
        return on == goal


@register
class QueensFamily(TaskFamily):
    name, description = "queens", "N-Queens with one queen fixed (level = N); any valid placement"
    min_level, max_level, default_levels = 4, 12, (5, 6, 8)

    @staticmethod
    def valid(columns: list[int], n: int) -> bool:
        if len(columns) != n or sorted(columns) != list(range(1, n + 1)):
            return False
        return all(abs(columns[i] - columns[j]) != j - i for i in range(n) for j in range(i + 1, n))

    @staticmethod
    def solve(n: int, first: int) -> list[int] | None:
        columns = [first]

        def place(row):
            if row == n:
                return True
            for col in range(1, n + 1):
                if all(col != c and abs(col - c) != row - r for r, c in enumerate(columns)):
                    columns.append(col)
                    if place(row + 1):
                        return True
                    columns.pop()
            return False

        return columns if place(1) else None

    def make(self, level, rng):
        firsts = list(range(1, level + 1))
        rng.shuffle(firsts)
        for first in firsts:
            solution = self.solve(level, first)
            if solution:
                break
        prompt = (f"Place {level} queens on a {level}x{level} chessboard so that no two attack each other (no "
                  f"shared row, column or diagonal). The queen of row 1 must be in column {first}. End your reply "
                  "with `Answer:` followed by the column (1 to N) of the queen in each row, rows 1 to N, "
                  "comma-separated.")
        return prompt, ", ".join(map(str, solution)), {"n": level, "first": first}

    def extract(self, problem, text):
        numbers = [int(x) for x in re.findall(r"\b\d+\b", answer_block(text))]
        return ", ".join(map(str, numbers)) if numbers else None

    def check(self, problem, text):
        key = self.extract(problem, text)
        columns = [int(x) for x in key.split(", ")] if key else []
        return self.valid(columns, problem.data["n"]) and columns[0] == problem.data["first"]

    def reference_response(self, problem):
        return f"Answer: {problem.reference}"


@register
class ColoringFamily(TaskFamily):
    name, description = "coloring", "3-colour a graph with a planted colouring (level = vertices)"
    min_level, max_level, default_levels = 4, 30, (6, 9, 12)
    colors = 3

    def make(self, level, rng):
        planted = [rng.randint(1, self.colors) for _ in range(level)]
        edges = sorted({(a, b) for a in range(level) for b in range(a + 1, level)
                        if planted[a] != planted[b] and rng.random() < 0.5})
        text = ", ".join(f"{a + 1}-{b + 1}" for a, b in edges)
        prompt = (f"Colour the vertices 1 to {level} of this graph with colours 1, 2 and 3 so that no edge joins "
                  f"two vertices of the same colour. Edges: {text}. End your reply with `Answer:` followed by the "
                  "colour of each vertex in order 1 to N, comma-separated.")
        return prompt, ", ".join(map(str, planted)), {"n": level, "edges": edges}

    def extract(self, problem, text):
        numbers = re.findall(r"\b\d+\b", answer_block(text))
        return ", ".join(numbers) if numbers else None

    def check(self, problem, text):
        key = self.extract(problem, text)
        colors = [int(x) for x in key.split(", ")] if key else []
        if len(colors) != problem.data["n"] or any(not 1 <= c <= self.colors for c in colors):
            return False
        return all(colors[a] != colors[b] for a, b in problem.data["edges"])

    def reference_response(self, problem):
        return f"Answer: {problem.reference}"


@register
class SatFamily(TaskFamily):
    name, description = "sat", "3-SAT with a planted satisfying assignment (level = variables)"
    min_level, max_level, default_levels = 3, 30, (4, 6, 10)

    def make(self, level, rng):
        planted = [rng.random() < 0.5 for _ in range(level)]
        clauses = []
        while len(clauses) < round(4.2 * level):
            variables = rng.sample(range(level), 3)
            clause = [(v, rng.random() < 0.5) for v in variables]  # (variable, negated)
            if any(planted[v] != negated for v, negated in clause):
                clauses.append(clause)
        text = " AND ".join("(" + " OR ".join(("NOT " if neg else "") + f"x{v + 1}" for v, neg in clause) + ")"
                            for clause in clauses)
        prompt = (f"Find values (true/false) for x1 to x{level} that make this formula true: {text}. End your "
                  "reply with `Answer:` followed by each variable's value, e.g. x1=T, x2=F, ...")
        reference = ", ".join(f"x{i + 1}={'T' if value else 'F'}" for i, value in enumerate(planted))
        return prompt, reference, {"n": level, "clauses": clauses}

    def assignment(self, problem, text) -> dict[int, bool]:
        found = re.findall(r"\bx(\d+)\s*[=:]\s*(T|F|true|false|1|0)\b", answer_block(text), re.IGNORECASE)
        return {int(i): value.lower() in ("t", "true", "1") for i, value in found}

    def extract(self, problem, text):
        values = self.assignment(problem, text)
        return ", ".join(f"x{i}={'T' if values[i] else 'F'}" for i in sorted(values)) if values else None

    def check(self, problem, text):
        values = self.assignment(problem, text)
        if sorted(values) != list(range(1, problem.data["n"] + 1)):
            return False
        return all(any(values[v + 1] != negated for v, negated in clause) for clause in problem.data["clauses"])

    def reference_response(self, problem):
        return f"Answer: {problem.reference}"
