"""The task contract: problems and ids, the registry, task specs, problem generation, the
numeric answer reader, and the JSONL loader with its errors."""

from __future__ import annotations

import json

import pytest

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks import FAMILIES, Problem, check, extract, generate_problems, get_family, load_jsonl, parse_task_spec
from thinkwise.tasks.base import answer_blocks, exact_number_key, numbers_match, numeric_answer, shortfall


def test_problem_id_and_unknown_family():
    assert Problem("hanoi", 3, 7, "p", "r", {}).id == "hanoi:3:7"
    with pytest.raises(InvalidParameterError, match="unknown task family 'nope'.*hanoi"):
        get_family("nope")


def test_parse_task_spec_forms():
    assert parse_task_spec("hanoi:3-5,sum:2,median") == [
        ("hanoi", [3, 4, 5]), ("sum", [2]), ("median", list(get_family("median").default_levels))]
    assert parse_task_spec(" queens:4/6/8 , sat : 3 ") == [("queens", [4, 6, 8]), ("sat", [3])]
    assert parse_task_spec("jsonl:data/mine.jsonl,sum:1") == [("jsonl:data/mine.jsonl", [0]), ("sum", [1])]


@pytest.mark.parametrize("spec, message", [
    ("nope:1", "unknown task family"),
    ("hanoi:99", "levels 1..12"),
    ("hanoi:0-3", "levels 1..12"),
    ("hanoi:x", "bad levels"),
    ("hanoi:2-", "bad levels"),
    ("hanoi:6-3", "empty level range.*hanoi:3-6"),
    ("", "empty task spec"),
    (" , ", "empty task spec"),
    ("jsonl:", "needs a file path"),
])
def test_parse_task_spec_errors(spec, message):
    with pytest.raises(InvalidParameterError, match=message):
        parse_task_spec(spec)


def test_generate_problems_is_reproducible_and_seeded():
    problems = generate_problems("hanoi:3-4,sum:2,sat:4", n_per_level=3, seed=1)
    again = generate_problems("hanoi:3-4,sum:2,sat:4", n_per_level=3, seed=1)
    assert [(p.id, p.prompt, p.data) for p in problems] == [(p.id, p.prompt, p.data) for p in again]
    assert len(problems) == 12 and len({p.id for p in problems}) == 12
    assert [p.level for p in problems[:6]] == [3, 3, 3, 4, 4, 4]
    other = generate_problems("sum:2,sat:4", n_per_level=3, seed=2)
    assert {p.prompt for p in other}.isdisjoint({p.prompt for p in problems})
    assert generate_problems("sum:2", n_per_level=0) == []
    with pytest.raises(InvalidParameterError, match="n_per_level"):
        generate_problems("sum:2", n_per_level=-1)


def test_numeric_answer_reads_how_small_models_answer():
    assert numeric_answer("so the total is\nAnswer: 1,234") == "1234"
    assert numeric_answer("Answer: 12 + 5 = 17") == "17"
    # The FINAL answer: the later of the last box and the last Answer: line.
    assert numeric_answer("We get \\boxed{-42} in the end. Answer: 3") == "3"
    assert numeric_answer("Answer: 3, or rather \\boxed{-42}") == "-42"
    assert numeric_answer("Adding them gives 30, then 45.") == "45"
    assert numeric_answer("no idea") is None


def test_the_final_answer_is_read_not_a_number_from_the_working():
    reasoning = "Step 1: 34 + 57 = 91.\nStep 2: 91 + 12 = 103.\nAnswer: 103\nCheck: 103 - 12 = 91."
    assert numeric_answer(reasoning) == "103"  # the answer line, not the check's trailing 91
    # Cut off mid-working (the token limit): the last line holds no number, so no answer;
    # the old last-number rule answered 57 here.
    assert numeric_answer("Step 1: add 34 and 57\nStep 2: then we carry the") is None
    assert numeric_answer("First 34 + 57 = 91, and 91 + 12\nso the total is 103.") == "103"
    sum_family = get_family("sum")
    problem = sum_family.generate(2, 0)
    wrong = int(problem.reference) + 1
    assert not check(problem, f"Let me try {problem.reference} ... no.\nAnswer: {wrong}")
    assert check(problem, f"First guess {wrong}, recheck.\nAnswer: {problem.reference}")


def test_prompt_styles_ask_to_reason_or_not_and_state_the_answer_format():
    for name in ("sum", "hanoi", "sort", "sat", "output"):
        family = get_family(name)
        level = family.default_levels[0]
        cot, direct = family.generate(level, 4, "cot"), family.generate(level, 4, "direct")
        assert "step by step" in cot.prompt and "step by step" not in direct.prompt
        assert "without any working" in direct.prompt
        assert "Answer" in cot.prompt and "Answer" in direct.prompt  # the format the extractor reads
        assert cot.reference == direct.reference and cot.data == direct.data and cot.style == "cot"
        # Reasoning needs room: the cot limit is well above the direct one, and the direct one
        # still holds the whole answer (a Hanoi move list grows with the disks).
        assert family.max_tokens(level, "cot") >= family.max_tokens(level, "direct") + 96
    hanoi = get_family("hanoi")
    assert hanoi.max_tokens(6, "direct") > 6 * 63 > hanoi.max_tokens(3, "direct")
    with pytest.raises(InvalidParameterError, match="prompt style 'verbose'.*cot, direct"):
        get_family("sum").generate(2, 0, "verbose")
    with pytest.raises(InvalidParameterError, match="prompt style"):
        generate_problems("sum:2", 2, style="")


def test_generate_problems_never_pads_with_repeats():
    problems = generate_problems("river:2,hanoi:3,sum:2", n_per_level=8, seed=0)
    by_level = {}
    for problem in problems:
        by_level.setdefault((problem.family, problem.level), []).append(problem.prompt)
    assert all(len(set(prompts)) == len(prompts) for prompts in by_level.values())
    assert len(by_level[("river", 2)]) == 1  # one instance exists: run once, not 8 times
    assert len(by_level[("hanoi", 3)]) == 6  # every start/goal peg pair
    assert len(by_level[("sum", 2)]) == 8
    assert shortfall(problems, 8) == {("river", 2): 1, ("hanoi", 3): 6}
    sum_family = get_family("sum")
    problem = sum_family.generate(3, 0)
    assert check(problem, f"Let me add.\n**Final Answer:** {int(problem.reference):,}")
    assert extract(problem, f"\\boxed{{{problem.reference}}}") == problem.reference


def test_numbers_compare_exactly_however_large():
    assert [exact_number_key(a) for a in ("1,234", "1.234e3", "2.50", "-7/4", "1/3", "1e-3", "x = 5")] == [
        "1234", "1234", "2.5", "-1.75", "1/3", "0.001", "5"]
    big = "33687501600000000001"
    assert exact_number_key(big) == big
    assert numbers_match(f"Answer: {big}", big) and numbers_match("Answer: 0.5", "1/2")
    assert not numbers_match("Answer: 33687501600000000000", big)  # answers_equal's 1e-9 would merge these
    assert not numbers_match("Answer: 3368750161", "3368750160") and not numbers_match("Answer: x", "1")


def test_answer_blocks_most_specific_first():
    assert answer_blocks("work\nAnswer: A->C\nB->C") == ["A->C\nB->C", "work\nAnswer: A->C\nB->C"]
    assert answer_blocks("so \\boxed{1, 2}") == ["1, 2", "so \\boxed{1, 2}"]
    assert answer_blocks("plain") == ["plain"]


def write_lines(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_jsonl_plain_and_with_a_checker(tmp_path):
    hanoi = get_family("hanoi").generate(3, 0)
    path = write_lines(tmp_path / "mine.jsonl", [
        {"prompt": "2+2?", "answer": 4},
        "",
        {"prompt": "capital of France?", "answer": "Paris", "level": 2},
        {"prompt": hanoi.prompt, "answer": hanoi.reference, "checker": "hanoi", "data": hanoi.data},
    ])
    problems = load_jsonl(path)
    assert [(p.family, p.level, p.seed) for p in problems] == [("jsonl", 0, 1), ("jsonl", 2, 3), ("jsonl", 0, 4)]
    arithmetic, capital, puzzle = problems
    assert check(arithmetic, "it is 4.0\nAnswer: 4.0") and check(arithmetic, "Answer: 2 + 2 = 4")
    assert not check(arithmetic, "Answer: 5")
    assert extract(arithmetic, "\\boxed{4}") == "4"
    assert check(capital, "Answer: paris.") and not check(capital, "Answer: Lyon")
    assert check(puzzle, get_family("hanoi").reference_response(hanoi))
    assert check(puzzle, get_family("jsonl").reference_response(puzzle))
    assert not check(puzzle, "Answer: A->C")  # judged by the Hanoi simulator, not by string equality
    assert len(generate_problems(f"jsonl:{path}", n_per_level=0)) == 3
    big = load_jsonl(write_lines(tmp_path / "big.jsonl", [{"prompt": "p", "answer": "3368750160"}]))[0]
    assert check(big, "Answer: 3,368,750,160") and not check(big, "Answer: 3368750161")
    assert [p.seed for p in generate_problems(f"jsonl:{path},sum:1", n_per_level=2)][:2] == [1, 3]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "x"}], "needs \"prompt\" and \"answer\""),
    (["[1, 2]"], "needs \"prompt\" and \"answer\""),
    (["{not json"], "mine.jsonl:1 is not valid JSON"),
    ([{"prompt": "x", "answer": "1"}, {"prompt": "x", "answer": "1", "level": "hard"}], "mine.jsonl:2.*level"),
    ([{"prompt": "x", "answer": "1", "data": [1]}], "\"data\" must be a JSON object"),
    ([{"prompt": "x", "answer": "1", "checker": "nope"}], "unknown task family 'nope'"),
    ([{"prompt": "x", "answer": "A->C", "checker": "hanoi"}], "cannot judge this row.*disks"),
    ([{"prompt": "x", "answer": "A->B", "checker": "hanoi", "data": {"disks": 1}}], "rejects the row's own answer"),
])
def test_load_jsonl_errors_say_where_and_what(tmp_path, rows, message):
    path = write_lines(tmp_path / "mine.jsonl", rows)
    with pytest.raises(InvalidParameterError, match=message):
        load_jsonl(path)


def test_load_jsonl_missing_file_and_jsonl_without_a_file(tmp_path):
    with pytest.raises(InvalidParameterError, match="does not exist"):
        load_jsonl(str(tmp_path / "absent.jsonl"))
    with pytest.raises(InvalidParameterError, match="jsonl:PATH"):
        generate_problems("jsonl", n_per_level=1)
    assert "jsonl" in FAMILIES
