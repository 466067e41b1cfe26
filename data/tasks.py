"""The six tasks of paper section 4: prompt, answer extraction and score of each.

A task turns a problem record (see data/prepare.py for its fields) into chat messages, says
how long an answer may be, pulls the final answer out of a response and scores it. The
score is the reward of section 2 (+1 when True, -1 otherwise) and the metric of section 4.
The answer formats follow the paper's tasks but are simple enough for a 135M instruct model:

    gsm8k            steps, then "The answer is 42."                  the number is compared by value
    math             steps, the final answer in \\boxed{...}           standard MATH equivalence
    arc_easy/_chal.  "The answer is <option>", e.g. "(B) <its text>"  the letter, or an exact copy of one option
    mbpp, humaneval  the function in one ```python block              its tests pass in the sandbox

Extraction forgives formatting (bold, dollars, thousands commas, a missing period, no
code fence) but never credits an answer that is wrong or names more than one option.
Generation ends at the chat template's end-of-turn token; `stop` adds strings that mark a
runaway answer (a model that starts writing the next question).
"""
import re
from decimal import Decimal, InvalidOperation

from data.math_answer import is_equiv, last_boxed
from data.sandbox import run_many, run_tests

LETTERS = "ABCDEFGHIJ"
Messages = list[dict[str, str]]


class Task:
    """What every task provides; the subclasses below fill it in."""
    name: str
    domain: str            # "math" | "code" | "reasoning": the expert that should answer it
    max_new_tokens: int    # a sensible generation budget for this task's answers
    stop: list[str] = []   # extra stop strings for generation (may be empty)
    # Trainer settings for this task (train.py's defaults where a flag does not say otherwise). Rare
    # rewards need many samples per prompt near temperature 1, and dynamic sampling (rl.sample_groups).
    train_defaults: dict = {}

    def prompt(self, problem: dict) -> str:
        raise NotImplementedError

    def messages(self, problem: dict) -> Messages:
        """Chat messages for the problem; the model's chat template renders them."""
        return [{"role": "user", "content": self.prompt(problem)}]

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        """The final answer in a response (None if there is none). ARC needs `problem` to
        turn a copied option text into its letter; HumanEval to find the block with its entry point."""
        raise NotImplementedError

    def score(self, problem: dict, response: str) -> bool:
        raise NotImplementedError

    def score_many(self, problems: list[dict], responses: list[str], workers: int = 4) -> list[bool]:
        return [self.score(p, r) for p, r in zip(problems, responses, strict=True)]

    def reference_response(self, problem: dict) -> str:
        """A gold response in this task's answer format (for supervised training, few-shot scoring)."""
        raise NotImplementedError

    def option_messages(self, problem: dict) -> Messages:
        """Multiple-choice tasks (those with option_responses): the prompt under which the options'
        likelihoods are compared (rl.py's options rollout, eval.py --answer likelihood)."""
        return self.messages(problem)


# ----------------------------------------------------------------------------- GSM8K

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def as_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


class GSM8K(Task):
    name, domain, max_new_tokens, stop = "gsm8k", "math", 384, ["\nQuestion:"]
    train_defaults = {"samples": 16, "temperature": 1.0, "batch_size": 4, "dynamic_draws": 12, "max_new_tokens": 256}

    def prompt(self, problem: dict) -> str:
        return (f"{problem['question']}\n\nSolve the problem step by step. "
                "End with \"The answer is N.\" where N is the final number.")

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        """The number stated last as the answer ("The answer is 42", or "#### 42" as in the
        GSM8K solutions); else the one in the last \\boxed{}; else the last number of the
        response (the usual fallback for GSM8K)."""
        stated = re.finditer(r"(?:answer is[\s:*$\\]*(?:boxed\{)?|####)[\s$]*(" + NUMBER + ")", response, re.I)
        boxed = re.findall(NUMBER, last_boxed(response) or "")
        found = [m.group(1) for m in stated] or boxed[:1] or re.findall(NUMBER, response)
        return found[-1].replace(",", "") if found else None

    def score(self, problem: dict, response: str) -> bool:
        answer = self.extract(response)
        return answer is not None and as_number(answer) == as_number(problem["answer"])

    def reference_response(self, problem: dict) -> str:
        steps = problem["solution"].split("####")[0].strip()
        return f"{steps}\nThe answer is {problem['answer']}."


# ----------------------------------------------------------------------------- MATH

class MATH(Task):
    name, domain, max_new_tokens, stop = "math", "math", 512, ["\nQuestion:"]

    def prompt(self, problem: dict) -> str:
        return (f"{problem['question']}\n\nSolve the problem step by step. "
                "Put the final answer in \\boxed{}.")

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        """The last \\boxed{...}; else what follows the last "The answer is" on its line."""
        boxed = last_boxed(response)
        if boxed is not None:
            return boxed
        stated = re.findall(r"answer is:?\s*(.+)", response, re.I)
        return stated[-1].strip().rstrip(".") if stated else None  # normalize() drops the $ signs

    def score(self, problem: dict, response: str) -> bool:
        return is_equiv(self.extract(response), problem["answer"])

    def reference_response(self, problem: dict) -> str:
        return problem["solution"]


# ----------------------------------------------------------------------------- ARC

def option_text(text: str) -> str:
    """An option as written, without what a copy may add: markdown, quotes, spaces, a final period."""
    text = text.replace("**", "").strip().strip("\"'`").strip()
    return " ".join(text.split()).rstrip(".").strip()


def match_option(text: str, choices: list[str]) -> int | None:
    """The one option that text is a copy of (exactly, else ignoring case); None if none or several."""
    text = option_text(text)
    for same in (lambda a, b: a == b, lambda a, b: a.casefold() == b.casefold()):
        hits = [i for i, c in enumerate(choices) if same(text, option_text(c))]
        if hits:
            return hits[0] if len(hits) == 1 else None
    return None


def answer_tail(response: str) -> str:
    """The text after the last "answer is" / "answer:" on its line; else the text before
    "is the correct answer"; else the last non-empty line."""
    stated = re.findall(r"answer(?: is|:)\s*:?\s*(.*)", response, re.I)
    named = re.findall(r"^(.*?)\s+is the (?:correct|right) answer", response, re.I | re.M)
    lines = [line for line in response.splitlines() if line.strip()]
    tail = (stated or named or lines or [""])[-1]
    return tail.replace("**", "").strip()


def choose_option(response: str, choices: list[str]) -> int | None:
    """Index of the option the response gives as its answer, or None if it gives none or several.

    Accepted: an exact copy of one option's text; a letter "(B)", "B)", "B.", "B:" or a bare
    "B", optionally followed by text. The text after a letter may be that option's text or a
    reason, but not another option's text or another letter (then the answer is ambiguous)."""
    tail = answer_tail(response)
    by_text = match_option(tail, choices)
    if by_text is not None:
        return by_text
    m = re.fullmatch(r"(?i:option\s*)?(?:\(([A-J])\)|([A-J])[.:)]|([A-J])(?=\s|$))\s*(.*)", tail, re.S)
    if not m:
        return None
    index, rest = LETTERS.index(m.group(1) or m.group(2) or m.group(3)), m.group(4)
    if index >= len(choices):
        return None
    if m.group(3) and option_text(rest) and match_option(rest, choices) != index:
        return None  # "A leg muscle ...": a bare capital letter counts only before its own option
    others = [LETTERS[i] for i in range(len(choices)) if i != index]
    names_other_letter = re.search(r"\(([A-J])\)|\b(?:or|and)\s+\(?([A-J])\b", rest)
    if names_other_letter and (names_other_letter.group(1) or names_other_letter.group(2)) in others:
        return None
    copied = match_option(rest, choices)
    return None if copied is not None and copied != index else index


class ARC(Task):
    domain, max_new_tokens, stop = "reasoning", 128, ["\nQuestion:"]

    def __init__(self, name: str):
        self.name = name

    def prompt(self, problem: dict) -> str:
        # A copy of the option, not a bare letter: the team's prototype found SmolLM2-135M
        # answering with a letter mostly says "A", and copying worked better. In our own check
        # (30 ARC-Easy validation questions, greedy) every wording tried stayed near chance and
        # leaned to one position; this one gave a parsable answer 24 times in 30.
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(problem["choices"]))
        return (f"{problem['question']}\n\nOptions:\n{options}\n\nPick the correct option and copy it. "
                "Reply with one line: The answer is <the option you picked>.")

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        """The letter of the chosen option. Without `problem` only a stated letter is found."""
        if problem is None:
            m = re.fullmatch(r"\(([A-J])\).*|([A-J])[.)]?", answer_tail(response), re.S)
            return (m.group(1) or m.group(2)) if m else None
        index = choose_option(response, problem["choices"])
        return None if index is None else LETTERS[index]

    def score(self, problem: dict, response: str) -> bool:
        return self.extract(response, problem) == problem["answer"]

    # The likelihood-based choice is cloze-style, as in the usual ARC evaluation: the question
    # alone, and each option's text as the reply. Under the listed-options prompt above the base
    # model's option likelihoods are at chance (27-31 of 100 validation questions); as a cloze
    # they find 76 of 150: the knowledge is there, the listed format hides it.
    def option_messages(self, problem: dict) -> Messages:
        return [{"role": "user", "content": problem["question"]}]

    def option_responses(self, problem: dict) -> list[str]:
        """Each option's text, in order: the replies whose likelihoods are compared."""
        return list(problem["choices"])

    def reference_response(self, problem: dict) -> str:
        i = LETTERS.index(problem["answer"])
        return f"The answer is ({problem['answer']}) {problem['choices'][i].rstrip('.')}."


# ----------------------------------------------------------------------------- code: MBPP, HumanEval

def code_blocks(text: str) -> list[str]:
    """Contents of the ``` fenced blocks, in order; a last block cut off by the token limit counts."""
    return re.findall(r"```[^\n]*\n(.*?)(?:```|\Z)", text, re.S)


class CodeTask(Task):
    domain, max_new_tokens, stop = "code", 384, []
    timeout = 10.0  # seconds per program: all reference solutions but one (mbpp/123, ~7 s) take under 1 s

    def extract(self, response: str, problem: dict | None = None) -> str | None:
        """The program: the first fenced block that defines a function (else the first block,
        else the whole response, for a model that answers with bare code)."""
        blocks = code_blocks(response)
        if not blocks:  # bare code: keep the first line's indentation (a function body starts indented)
            return "\n".join(response.rstrip().splitlines()).lstrip("\n") or None
        want = f"def {problem['entry_point']}(" if problem and "entry_point" in problem else "def "
        return next((b for b in blocks if want in b), next((b for b in blocks if "def " in b), blocks[0]))

    def program(self, problem: dict, response: str) -> str:
        return self.extract(response, problem) or ""

    def score(self, problem: dict, response: str) -> bool:
        return run_tests(self.program(problem, response), problem["tests"], timeout=self.timeout).passed

    def score_many(self, problems: list[dict], responses: list[str], workers: int = 4) -> list[bool]:
        jobs = [(self.program(p, r), p["tests"]) for p, r in zip(problems, responses, strict=True)]
        return [result.passed for result in run_many(jobs, workers=workers, timeout=self.timeout)]


class MBPP(CodeTask):
    name = "mbpp"
    train_defaults = {"samples": 16, "temperature": 1.0, "batch_size": 4, "dynamic_draws": 12, "max_new_tokens": 384}

    def prompt(self, problem: dict) -> str:
        return (f"{problem['question']}\n\nWrite a Python function that solves the task above and "
                "passes the test shown. Put the code in one ```python block.")

    def reference_response(self, problem: dict) -> str:
        return f"```python\n{problem['solution'].strip()}\n```"


class HumanEval(CodeTask):
    name = "humaneval"

    def prompt(self, problem: dict) -> str:
        return (f"Complete this Python function:\n```python\n{problem['prompt']}```\n"
                "Reply with the complete function in one ```python block.")

    def program(self, problem: dict, response: str) -> str:
        # The prompt first: it holds the imports and helper functions the answer may rely on.
        # Ending in a docstring, it is a valid function on its own, so a full definition in
        # the answer replaces it and a bare body completes it.
        return problem["prompt"] + "\n" + (self.extract(response, problem) or "")

    def reference_response(self, problem: dict) -> str:
        return f"```python\n{problem['solution'].rstrip()}\n```"


TASKS: dict[str, Task] = {
    "gsm8k": GSM8K(),
    "mbpp": MBPP(),
    "arc_easy": ARC("arc_easy"),
    "arc_challenge": ARC("arc_challenge"),
    "humaneval": HumanEval(),
    "math": MATH(),
}
