"""The classification expert's task (paper section 3.2 b): which domain a question belongs to.

The first pass of the `prompt` and `cls` strategies (adapt.py) asks the model to name the
question's category, code, math, reasoning or other; the classification expert z_c is trained
on this task by loop.train (train.py --task cls) with questions of the three training tasks,
labelled by their domain. The labels, the prompt, the reply parser and the labelled questions
live here, beside every other task of data/.
"""
from __future__ import annotations

import random
import re

import data

LABELS = ("code", "math", "reasoning", "other")
# "other": the base model
LABEL_TO_EXPERT = {"math": "gsm8k", "code": "mbpp", "reasoning": "arc_easy"}
DOMAIN_EXPERTS = list(LABEL_TO_EXPERT.values())  # the experts of the three training tasks
ALIASES = {"coding": "code", "programming": "code", "python": "code", "maths": "math",
           "mathematics": "math", "arithmetic": "math", "science": "reasoning",
           "logic": "reasoning"}

# Short, one line per category (the official prompt's guidelines, condensed). The base model
# reads it poorly (RESULTS.md, routing): the weak reader is what the classification expert is for.
CLASSIFY_SYSTEM = ("Classify the user's question into one category. code: it asks for a program "
                   "or a function. math: a calculation or a math problem. reasoning: a science or "
                   "common-sense question, often with options to choose from. other: anything "
                   "else. Reply only with \\boxed{category}.")


# The first pass reads the question's first CLASSIFY_CHARS characters only: its opening tells a
# calculation from a program from a science question, and the cut bounds the first pass's cost
# (a batch is as long as its longest row, and code prompts with their tests run long).
CLASSIFY_CHARS = 500


def classify_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": CLASSIFY_SYSTEM},
            {"role": "user", "content": question[:CLASSIFY_CHARS]}]


def parse_label(text: str) -> str | None:
    """The category a reply names: the last \\boxed{...} (closed or cut off, "\\text{}" allowed);
    without one, "category: X" or a bare label. None when there is none, it is not a category,
    or several."""
    boxed = re.findall(r"boxed\s*\{\s*(?:\\text\s*\{)?\s*([^{}]*)", text, re.I)
    stated = re.findall(r"(?:category|classification|answer)\s*(?:is)?\s*[:=]?\s*\**\s*(\w+)",
                        text, re.I)
    words = boxed[-1] if boxed else stated[-1] if stated else text
    names = {ALIASES.get(w, w) for w in re.findall(r"[a-z]+", words.lower())}
    found = names & set(LABELS)
    # a bare reply: the label alone
    if len(found) != 1 or (not boxed and not stated and len(names) > 1):
        return None
    return found.pop()


# ----------------------------------------------------------------------------- the task
def normalise(question: str) -> str:
    return " ".join(question.split()).casefold()


def evaluation_questions() -> set[str]:
    """Every question the project reports on: all test splits, and ARC-Challenge entirely."""
    return {normalise(p["question"]) for task, splits in data.SPLITS.items() for split in splits
            if split == "test" or task == "arc_challenge" for p in data.load(task, split)}


def cls_problems(split: str, per_task: int = 0, seed: int = 0) -> list[dict]:
    """Labelled questions for the classification expert, from the train (or validation) split of
    each training task, balanced: per_task questions of each (0: as many as the smallest has),
    shuffled.

    The question is the one the user asked, without the task's instructions (what the first pass
    reads, as in the paper: ARC-Challenge shares ARC-Easy's template and MATH GSM8K's, so a
    template would be an easier cue than the question). A question whose text also appears in an
    evaluation set (a few ARC and MBPP duplicates under other ids) is left out.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"the classification expert uses the train and validation splits only, "
                         f"not {split!r}")
    held_out, rng = evaluation_questions(), random.Random(seed)
    pools = {}
    for label, name in LABEL_TO_EXPERT.items():
        pools[name] = [{"id": f"cls/{p['id']}", "question": p["question"], "answer": label,
                        "source": name, "source_id": p["id"]}
                       for p in data.load(name, split) if normalise(p["question"]) not in held_out]
    n = per_task or min(len(pool) for pool in pools.values())
    problems = [p for pool in pools.values() for p in rng.sample(pool, min(n, len(pool)))]
    rng.shuffle(problems)
    return problems


class Classification(data.Task):
    """rl.train trains the classification expert z_c on it (reward +1 for the right label).

    A small model almost never writes a category when sampling, so free-generation rollouts get
    the same -1 for every sample and REINFORCE with a baseline learns nothing; sampling one of
    option_responses() by likelihood (options.py, as adapt.classify reads them) gives a signal."""
    name, domain, max_new_tokens, stop = "cls", "other", 16, []

    def messages(self, problem: dict) -> list[dict[str, str]]:
        return classify_messages(problem["question"])

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        return parse_label(response)

    def score(self, problem: dict, response: str) -> bool:
        return parse_label(response) == problem["answer"]

    def reference_response(self, problem: dict) -> str:
        return f"\\boxed{{{problem['answer']}}}"

    def option_responses(self, problem: dict | None = None) -> list[str]:
        """The four possible replies, in LABELS order (as ARC's options, for a choice by
        likelihood)."""
        return [f"\\boxed{{{label}}}" for label in LABELS]


CLS_TASK = Classification()
