"""data/cls.py: the classification expert's task: labels parsed, training questions never
from an evaluation set, rewards, and training it."""

import pytest
import torch

import adapt
import config
import data
import loop
import replies
import rl
import svf
from data import cls
from model import ModelArgs, Transformer, generate
from tiny import (TINY_WIDE, CharTokenizer, tiny_wrapped_model)


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("reply, label", [
    ("\\boxed{math}", "math"), ("\\boxed{code}", "code"), ("\\boxed{reasoning}", "reasoning"),
    ("\\boxed{other}", "other"), ("Classification: \\boxed{ Reasoning }.", "reasoning"),
    ("\\boxed{\\text{math}}", "math"), ("I think math. \\boxed{code}", "code"), ("\\boxed{Mathematics}", "math"),
    ("\\boxed{math", "math"), ("boxed{code}", "code"), ("math", "math"), ("Code.", "code"),
    ("**Category:** reasoning", "reasoning"),
])
def test_parse_label_well_formed(reply, label):
    assert cls.parse_label(reply) == label


@pytest.mark.parametrize("reply", [
    "", "\\boxed{}", "\\boxed{42}", "\\boxed{math or code}", "This is a math question about code",
    "The answer is (B) television", "```python\ndef f(): pass\n```", "\\boxed{biology}",
])
def test_parse_label_malformed(reply):
    assert cls.parse_label(reply) is None


# ----------------------------------------------------------------------------- the classification expert's data
def test_cls_training_data_holds_no_evaluation_question():
    held_out_ids, held_out_questions = set(), set()
    for task, splits in data.SPLITS.items():
        for split in splits:
            if split == "test" or task == "arc_challenge":
                for p in data.load(task, split):
                    held_out_ids.add(p["id"])
                    held_out_questions.add(" ".join(p["question"].split()).lower())
    for split in ("train", "validation"):
        problems = cls.cls_problems(split)
        sources = {p["id"]: p for name in cls.LABEL_TO_EXPERT.values() for p in data.load(name, split)}
        for p in problems:
            source = sources[p["source_id"]]  # from this split of a training task, and nowhere else
            assert p["source_id"] not in held_out_ids
            assert " ".join(source["question"].split()).lower() not in held_out_questions
            assert p["question"] == source["question"]  # the question asked, without the task's instructions
            assert p["answer"] == data.TASKS[p["source"]].domain
        counts = {label: sum(p["answer"] == label for p in problems) for label in ("math", "code", "reasoning")}
        assert len(set(counts.values())) == 1, counts  # balanced
    with pytest.raises(ValueError, match="train and validation"):
        cls.cls_problems("test")


def test_cls_task_rewards_the_right_label():
    p = cls.cls_problems("validation")[0]
    task = cls.CLS_TASK
    assert task.score(p, task.reference_response(p))
    assert not task.score(p, "\\boxed{other}") and not task.score(p, "no idea")
    assert task.messages(p)[0]["content"] == cls.CLASSIFY_SYSTEM and task.messages(p)[-1]["content"] == p["question"]


def test_cls_task_runs_in_the_reinforce_trainer():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**TINY_WIDE.__dict__, "max_seq_len": 2048})).double().eval().requires_grad_(False)
    svf.attach(model, svf.decompose(model, "mlp", cache_dir=None))
    problems = cls.cls_problems("validation")[:2]
    cfg = config.TrainConfig(task="cls", batch_size=2, samples=2, micro_batch=4)
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    stats = rl.train_step(model, CharTokenizer(), cls.CLS_TASK, problems, z, opt, cfg, gen)
    # rewards are +1 / -1: the mean reward and the accuracy of the same samples agree
    assert stats["reward"] == pytest.approx(2 * stats["accuracy"] - 1)
    assert stats["groups"] == 2 and stats["tokens"] <= 4 * cls.CLS_TASK.max_new_tokens
    # validation: greedy answers with z, scored by the task, computed here once more
    tok, task = CharTokenizer(), cls.CLS_TASK
    svf.use_expert(model, {n: v.detach() for n, v in z.items()})
    outs = generate(model, tok, [tok.encode_chat(task.messages(p)) for p in problems],
                    task.max_new_tokens)
    svf.use_expert(model, None)
    expected = sum(task.score(p, c.text) for p, c in zip(problems, outs)) / len(problems)
    assert loop.validate(model, tok, task, problems, z, batch=2) == expected


def test_the_cls_expert_trains_on_the_scores_the_first_pass_reads():
    model, tok = tiny_wrapped_model(), CharTokenizer()
    problems = [{"question": q, "answer": "math"} for q in ("what is 2 + 2?", "write a function")]
    trained = torch.stack(replies.option_logits(model, tok, cls.CLS_TASK, problems, 1.0))
    read = adapt.label_logprobs(model, tok, [p["question"] for p in problems])
    torch.testing.assert_close(trained, read.to(trained.dtype))
