"""Puzzles with simulators ("The Illusion of Thinking") and constraint problems.

Tower of Hanoi, checker jumping, river crossing and blocks world are checked by playing
the proposed moves in a simulator: every move must be legal and the final state must be
the goal, so any valid solution counts, not only the reference (which is optimal for
Hanoi, 2**N - 1 moves; for checker jumping, where every solution has N*N + 2N moves; and
for river crossing, found by breadth-first search; for blocks world it is a simple valid
plan: everything to the table, then build the goal). N-Queens, graph colouring and 3-SAT are checked by
testing the proposed solution against the constraints; instances are built around a
planted solution so they are always solvable. The level is the size: disks, checkers
per side, pairs on the river bank, blocks, board size, vertices, variables.

Parsers read the answer after the last `Answer:` marker (else the last \\boxed{}, else
the whole response) and accept the notations small models use besides the one asked
for: "Move disk 1 from A to C" or "(A, C)" for Hanoi, numbered lists, "X from Y to the
table" for blocks, "(row, column)" pairs for queens, "vertex: colour" pairs, literal lists
such as "x1, NOT x2" for SAT. Where a move names more than the simulator needs (the disk
moved, the cell a checker lands on) the extra detail must be true too.
"""

from __future__ import annotations

import re
from collections import deque

from thinkwise.tasks.base import Problem, TaskFamily, answer_blocks, register

# "->", "→", "=>", "\\to", "to": how moves are written from X to Y.
ARROW = r"(?:->|→|=>|⇒|⟶|\\to\b|\\rightarrow\b|\bto\b)"
# "1. ", "Step 3: ", "Move 12) " at the start of a line: a list numbering, not part of the answer.
_ENUMERATION = re.compile(r"^[ \t]*(?:[-*][ \t]*)?(?:(?:step|move)[ \t]*)?\d+[ \t]*[.):][ \t]+(?=\S)",
                          re.IGNORECASE | re.MULTILINE)


def strip_enumeration(block: str) -> str:
    return _ENUMERATION.sub("", block)


def first_parsed(parse, problem: Problem, text: str):
    """`parse` applied to the first of `answer_blocks(text)` in which it finds something."""
    for block in answer_blocks(text):
        found = parse(problem, block)
        if found:
            return found
    return None


class SimulatedFamily(TaskFamily):
    """Families whose answer is a sequence of moves, checked by simulation."""

    def parse(self, problem: Problem, text: str) -> list | None:
        raise NotImplementedError

    def format(self, moves: list) -> str:
        raise NotImplementedError

    def solved(self, problem: Problem, moves: list) -> bool:
        raise NotImplementedError

    def extract(self, problem, text):
        moves = first_parsed(self.parse, problem, text)
        return self.format(moves) if moves else None

    def check(self, problem, text):
        moves = first_parsed(self.parse, problem, text)
        return bool(moves) and self.solved(problem, moves)

    def reference_response(self, problem):
        return f"Here is the plan.\nAnswer: {problem.reference}"


@register
class HanoiFamily(SimulatedFamily):
    name, description = "hanoi", "Tower of Hanoi with N disks (level = N); moves simulated"
    min_level, max_level, default_levels = 1, 12, (3, 4, 5)

    def answer_tokens(self, level):
        return 16 + 6 * (2**level - 1)

    def reasoning_tokens(self, level):
        return 128 + 24 * (2**level - 1)

    def make(self, level, rng):
        moves: list[tuple[int, str, str]] = []

        def solve(n, source, target, spare):
            if n:
                solve(n - 1, source, spare, target)
                moves.append((n, source, target))
                solve(n - 1, spare, target, source)

        # The start and goal pegs vary with the seed: six distinct problems per size, where a
        # fixed A-to-C puzzle would make every seed the same problem.
        source, target = rng.sample("ABC", 2)
        spare = next(peg for peg in "ABC" if peg not in (source, target))
        solve(level, source, target, spare)  # the optimal 2**level - 1 moves
        prompt = (f"Tower of Hanoi: {level} disks, numbered 1 (smallest) to {level} (largest), are stacked on peg "
                  f"{source}, largest at the bottom. Move the whole stack to peg {target}, using peg {spare}. Move "
                  "one top disk at a time and never put a larger disk on a smaller one. End your reply with "
                  "`Answer:` followed by the moves in order, each written as <from peg>-><to peg> (such as "
                  f"{source}->{spare}), separated by commas.")
        return prompt, self.format(moves), {"disks": level, "source": source, "target": target}

    # "A->C", "A → C", "A to C", "from peg A to peg C", "a->c", "(A, C)", optionally
    # preceded by the disk: "disk 2 from A to B", "Move 2: A -> B" is a numbering, not a disk.
    MOVE = re.compile(
        r"(?:\bdisk\s*#?\s*(?P<disk>\d+)\b[^\n,;()ABC]{0,16}?)?"
        rf"(?:\b(?P<source>[ABC])\s*(?:{ARROW}|-)\s*(?:peg\s*)?(?P<target>[ABC])\b"
        r"|\b(?P<low_source>[abc])\s*(?:->|→|=>|⇒|⟶)\s*(?P<low_target>[abc])\b"
        r"|[(\[]\s*(?P<pair_source>[ABC])\s*,\s*(?P<pair_target>[ABC])\s*[)\]])")

    def parse(self, problem, text):
        moves = []
        for m in self.MOVE.finditer(strip_enumeration(text)):
            source = m["source"] or m["pair_source"] or m["low_source"].upper()
            target = m["target"] or m["pair_target"] or m["low_target"].upper()
            moves.append((int(m["disk"]) if m["disk"] else None, source, target))
        return moves

    def format(self, moves):
        return ", ".join(f"{a}->{b}" for _, a, b in moves)

    def solved(self, problem, moves):
        n = problem.data["disks"]
        start, goal = problem.data.get("source", "A"), problem.data.get("target", "C")
        pegs = {"A": [], "B": [], "C": []}
        pegs[start] = list(range(n, 0, -1))
        for disk, source, target in moves:
            if not pegs[source] or (pegs[target] and pegs[target][-1] < pegs[source][-1]):
                return False
            if disk is not None and pegs[source][-1] != disk:
                return False  # names a disk that is not the one on top
            pegs[target].append(pegs[source].pop())
        return pegs[goal] == list(range(n, 0, -1))


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
    name, description = "checkers", "checker jumping: swap N red and N blue checkers (level = N; N*N+2N moves)"
    min_level, max_level, default_levels = 1, 12, (2, 3, 4)

    def answer_tokens(self, level):
        return 16 + 4 * (level * level + 2 * level)

    def reasoning_tokens(self, level):
        return 128 + 24 * (level * level + 2 * level)

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

    def solve(self, start: str, goal: str) -> list[int]:
        """A solution by depth-first search, jumps first. Every solution is optimal: each
        checker travels N+1 cells and every red jumps every blue exactly once, so any
        solution has N*N jumps and 2N slides."""
        dead: set[str] = set()
        path: list[int] = []

        def search(board: str) -> bool:
            if board == goal:
                return True
            if board in dead:
                return False
            empty = board.index("_")
            for position in sorted({empty - 2, empty - 1, empty + 1, empty + 2}, key=lambda p: -abs(p - empty)):
                nxt = self.step(board, position)
                if nxt:
                    path.append(position)
                    if search(nxt):
                        return True
                    path.pop()
            dead.add(board)
            return False

        search(start)
        return path

    def make(self, level, rng):
        start, goal = "R" * level + "_" + "B" * level, "B" * level + "_" + "R" * level
        moves = [(position, None) for position in self.solve(start, goal)]
        prompt = (f"Checker jumping: a row of {2 * level + 1} cells, numbered 0 to {2 * level}, holds {start} "
                  "(R red, B blue, _ empty). Red checkers move only right, blue only left; a checker slides into "
                  "the adjacent empty cell or jumps over exactly one checker into the empty cell. Reach "
                  f"{goal}. End your reply with `Answer:` followed by the cell number of the checker moved at "
                  "each step, comma-separated.")
        return prompt, self.format(moves), {"start": start, "goal": goal}

    def parse(self, problem, text):
        text = strip_enumeration(text)
        # "2->3" / "2 to 3" names the landing cell too, which must then be right.
        pairs = re.findall(rf"(?<![\w.])(\d+)\s*{ARROW}\s*(\d+)(?![\w.])", text)
        if pairs:
            return [(int(a), int(b)) for a, b in pairs]
        return [(int(n), None) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", text)]

    def format(self, moves):
        return ", ".join(str(position) for position, _ in moves)

    def solved(self, problem, moves):
        board = problem.data["start"]
        for position, target in moves:
            nxt = self.step(board, position)
            if nxt is None or (target is not None and target != board.index("_")):  # lands in the empty cell
                return False
            board = nxt
        return board == problem.data["goal"]


@register
class RiverCrossingFamily(SimulatedFamily):
    name, description = "river", "missionaries and cannibals with N of each (level = N); boat capacity 2-4"
    min_level, max_level, default_levels = 1, 20, (2, 3, 5)

    def answer_tokens(self, level):
        return 16 + 32 * level

    def reasoning_tokens(self, level):
        return 128 + 48 * level

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
        found = re.findall(r"[(\[]\s*(\d+)\s*,\s*(\d+)\s*[)\]]", text)
        if found:
            return [(int(a), int(b)) for a, b in found]
        # "2 missionaries", "1 missionary and 1 cannibal", "2 cannibals": one crossing each.
        moves = []
        for m in re.finditer(r"(?:(\d+)\s*missionar(?:y|ies))?(?:\s*(?:and|,|\+|&)?\s*(\d+)\s*cannibals?)?",
                             text, re.IGNORECASE):
            if m[1] or m[2]:
                moves.append((int(m[1] or 0), int(m[2] or 0)))
        return moves

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

    def answer_tokens(self, level):
        return 16 + 16 * level

    def reasoning_tokens(self, level):
        return 128 + 32 * level

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

    # "X->Y", "X -> table", "X onto Y", "X to the table", "move X from Y to Z",
    # "put X on top of Y", "stack X on Y", "(X, table)", "move(X, Y)". A bare "X on Y"
    # without a verb is not a move: it is how states are described.
    MOVE = re.compile(
        r"\b(?:put|place|stack|move)\s+(?:block\s+)?(?P<verb_block>[A-Z])\s+on\s+(?:the\s+)?(?:block\s+)?"
        r"(?P<verb_target>[A-Z]\b|table\b)"
        r"|\b(?P<block>[A-Z])\b(?:\s+from\s+(?:the\s+)?(?:[A-Z]\b|table\b))?\s*"
        rf"(?:{ARROW}|\bonto\b|\bon\s+top\s+of\b)\s*(?:the\s+)?(?:block\s+)?"
        r"(?P<target>[A-Z]\b|table\b)"
        r"|[(\[]\s*(?P<pair_block>[A-Z])\s*,\s*(?P<pair_target>[A-Z]|table)\s*[)\]]", re.IGNORECASE)

    def parse(self, problem, text):
        blocks = {b for stack in problem.data["start"] for b in stack}
        moves = []
        for m in self.MOVE.finditer(strip_enumeration(text)):
            block = m["verb_block"] or m["block"] or m["pair_block"]
            target = m["verb_target"] or m["target"] or m["pair_target"]
            if block.upper() != block:
                continue  # a lower-case word such as "a", not a block name
            target = "table" if target.lower() == "table" else target
            if target != "table" and target.upper() != target:
                continue
            moves.append((block, target) if block in blocks else ("?", target))
        return moves

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

    def answer_tokens(self, level):
        return 16 + 4 * level

    def reasoning_tokens(self, level):
        return 256 + 32 * level

    @staticmethod
    def valid(columns: list[int], n: int) -> bool:
        if len(columns) != n or sorted(columns) != list(range(1, n + 1)):
            return False
        return all(abs(columns[i] - columns[j]) != j - i for i in range(n) for j in range(i + 1, n))

    @staticmethod
    def solve(n: int, rng) -> list[int]:
        """A random solution: backtracking over rows with the columns tried in random order."""
        columns: list[int] = []

        def place(row):
            if row == n:
                return True
            for col in rng.sample(range(1, n + 1), n):
                if all(col != c and abs(col - c) != row - r for r, c in enumerate(columns)):
                    columns.append(col)
                    if place(row + 1):
                        return True
                    columns.pop()
            return False

        place(0)
        return columns

    def make(self, level, rng):
        solution = self.solve(level, rng)
        row = rng.randrange(level)  # one queen is given, so instances vary beyond the board size
        prompt = (f"Place {level} queens on a {level}x{level} chessboard so that no two attack each other (no "
                  f"shared row, column or diagonal). The queen of row {row + 1} must be in column {solution[row]}. "
                  "End your reply with `Answer:` followed by the column (1 to N) of the queen in each row, rows 1 "
                  "to N, comma-separated.")
        return prompt, ", ".join(map(str, solution)), {"n": level, "fixed_row": row + 1, "fixed_column": solution[row]}

    def parse(self, problem, text) -> list[int]:
        """Columns by row from "(row, column)" pairs, "row 1: column 3" lines or a plain list."""
        n = problem.data["n"]
        for pattern in (r"[(\[]\s*(\d+)\s*,\s*(\d+)\s*[)\]]",
                        r"\brow\s*(\d+)\s*(?:[:=,]|->|→|-)?\s*(?:col(?:umn)?\s*)?(\d+)"):
            pairs = [(int(r), int(c)) for r, c in re.findall(pattern, text, re.IGNORECASE)]
            if pairs and sorted(r for r, _ in pairs) == list(range(1, n + 1)):
                return [c for _, c in sorted(pairs)]
        return [int(x) for x in re.findall(r"(?<![\w.])\d+(?![\w.])", strip_enumeration(text))]

    def extract(self, problem, text):
        columns = first_parsed(self.parse, problem, text)
        return ", ".join(map(str, columns)) if columns else None

    def check(self, problem, text):
        columns = first_parsed(self.parse, problem, text) or []
        return (self.valid(columns, problem.data["n"])
                and columns[problem.data["fixed_row"] - 1] == problem.data["fixed_column"])

    def reference_response(self, problem):
        return f"Answer: {problem.reference}"


@register
class ColoringFamily(TaskFamily):
    name, description = "coloring", "3-colour a graph with a planted colouring (level = vertices)"
    min_level, max_level, default_levels = 4, 30, (6, 9, 12)

    def answer_tokens(self, level):
        return 16 + 6 * level

    def reasoning_tokens(self, level):
        return 256 + 32 * level
    colors = 3

    def make(self, level, rng):
        # Every colour is used and every vertex has an edge, so no instance is trivial.
        planted = [1 + i % self.colors for i in range(self.colors)]
        planted += [rng.randint(1, self.colors) for _ in range(level - self.colors)]
        rng.shuffle(planted)
        edges = {(a, b) for a in range(level) for b in range(a + 1, level)
                 if planted[a] != planted[b] and rng.random() < 0.5}
        for vertex in range(level):
            if not any(vertex in edge for edge in edges):
                other = rng.choice([v for v in range(level) if planted[v] != planted[vertex]])
                edges.add((min(vertex, other), max(vertex, other)))
        edges = sorted(edges)
        text = ", ".join(f"{a + 1}-{b + 1}" for a, b in edges)
        prompt = (f"Colour the vertices 1 to {level} of this graph with colours 1, 2 and 3 so that no edge joins "
                  f"two vertices of the same colour. Edges: {text}. End your reply with `Answer:` followed by the "
                  "colour of each vertex in order 1 to N, comma-separated.")
        return prompt, ", ".join(map(str, planted)), {"n": level, "edges": edges}

    def parse(self, problem, text) -> list[int]:
        """Colours by vertex from "vertex: colour" pairs ("1: 2", "v3 = 1", "3 -> 2") or a plain list."""
        n = problem.data["n"]
        pairs = [(int(v), int(c)) for v, c in re.findall(
            r"(?<![\w.])(?:vertex\s*|v)?(\d+)\s*(?:[:=]|->|→)\s*(?:colou?r\s*)?(\d+)(?![\w.])", text,
            re.IGNORECASE)]
        if pairs and sorted(v for v, _ in pairs) == list(range(1, n + 1)):
            return [c for _, c in sorted(pairs)]
        return [int(x) for x in re.findall(r"(?<![\w.])\d+(?![\w.])", strip_enumeration(text))]

    def extract(self, problem, text):
        colors = first_parsed(self.parse, problem, text)
        return ", ".join(map(str, colors)) if colors else None

    def check(self, problem, text):
        colors = first_parsed(self.parse, problem, text) or []
        if len(colors) != problem.data["n"] or any(not 1 <= c <= self.colors for c in colors):
            return False
        return all(colors[a] != colors[b] for a, b in problem.data["edges"])

    def reference_response(self, problem):
        return f"Answer: {problem.reference}"


@register
class SatFamily(TaskFamily):
    name, description = "sat", "3-SAT with a planted satisfying assignment (level = variables)"
    min_level, max_level, default_levels = 3, 30, (4, 6, 10)

    def answer_tokens(self, level):
        return 16 + 6 * level

    def reasoning_tokens(self, level):
        return 256 + 32 * level

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

    def parse(self, problem, text) -> dict[int, bool]:
        """Variable -> value from "x1=T, x2=false, x3: 1", "x1 is true", a literal list
        ("x1, NOT x2, ¬x3, -x4": a listed variable is true unless negated) or a bare list of
        T/F (or true/false) values in variable order."""
        found = re.findall(r"\bx(\d+)\s*(?:=|:|\bis\b)\s*(T|F|true|false|1|0)\b", text, re.IGNORECASE)
        if found:
            return {int(i): value.lower() in ("t", "true", "1") for i, value in found}
        literals = re.findall(r"(¬|~|!|-|\bnot\s+)?\s*\bx(\d+)\b", text, re.IGNORECASE)
        if literals:
            return {int(i): not negation for negation, i in literals}
        values = re.findall(r"\b(T|F|true|false)\b", text, re.IGNORECASE)
        return {i + 1: value.lower() in ("t", "true") for i, value in enumerate(values)}

    def assignment(self, problem, text) -> dict[int, bool]:
        return first_parsed(self.parse, problem, text) or {}

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
