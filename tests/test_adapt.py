"""adapt.py and eval.py's two passes (paper section 3.2): classification, dispatch, CEM, few-shot mixing."""
import json
from dataclasses import replace
import pytest
import torch

import adapt
from data import cls
import data
import eval as evaluation
import lora
import replies
import rl
import svf
from model import ModelArgs, Transformer, generate

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=512)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'\"()[]{}\\/+-*=<>_\n#"  # 62 symbols: ids 2..63


class CharTokenizer:
    """One id per character, enough for tiny random models: 0 pads, 1 stops, 2.. are CHARS."""
    pad_id, stop_ids = 0, {1}

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return [2 + CHARS.index(c) if c in CHARS else 2 for c in text.lower()]

    def decode(self, ids: list[int]) -> str:
        return "".join(CHARS[i - 2] for i in ids if i >= 2)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


class EchoTask(data.Task):
    """A toy task for tiny models: the answer is right when the reply holds the problem's letter."""
    name, domain, max_new_tokens, stop = "echo", "other", 6, []

    def prompt(self, problem: dict) -> str:
        return problem["question"]

    def score(self, problem: dict, response: str) -> bool:
        return problem["answer"] in response

    def reference_response(self, problem: dict) -> str:
        return f"the answer is {problem['answer']}"


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TINY).double().eval().requires_grad_(False)
    svf.attach(model, svf.decompose(model, "mlp", cache_dir=None))
    return model


def random_expert(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 1 + 0.5 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in svf.ones(model).items()}


def toy_problems(n: int) -> list[dict]:
    letters = "abc"
    return [{"id": f"toy/{i}", "question": f"question {i}: say {letters[i % 3]}", "answer": letters[i % 3]}
            for i in range(n)]


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


def test_other_and_unparsable_use_the_base_model():
    assert adapt.dispatch(["math", "code", "reasoning", "other", None]) == ["gsm8k", "mbpp", "arc_easy", "base", "base"]
    model, tok, task = tiny_model(), CharTokenizer(), EchoTask()
    problems = toy_problems(3)
    experts = {"gsm8k": random_expert(model, 1), "base": None}
    prompts = [tok.encode_chat(task.messages(p)) for p in problems]
    svf.use_expert(model, svf.ones(model))  # z = 1 explicitly: the reference for "the base model"
    reference = generate(model, tok, prompts, task.max_new_tokens)
    svf.use_expert(model, experts["gsm8k"])  # an expert left on by an earlier pass (the official bug)
    assert [c.tokens for c in generate(model, tok, prompts, task.max_new_tokens)] != [c.tokens for c in reference]
    outs = adapt.second_pass(model, tok, task, problems, experts, adapt.dispatch(["other", None, "other"]), 2, 0)
    assert [c.tokens for c in outs] == [c.tokens for c in reference]
    assert all(m.z is None and m.merged is None for m in svf.wrappers(model).values())  # left on the base


def test_classify_uses_z_then_returns_to_base():
    model, tok = tiny_model(), CharTokenizer()
    questions = ["what is 2 + 2?", "write a function", "which gas do plants take in?"]
    base = adapt.classify(model, tok, questions, batch_size=2)
    assert all(label in cls.LABELS for label in base)
    assert adapt.classify(model, tok, questions[1:2]) == base[1:2]  # batching changes nothing
    z = random_expert(model, 3)
    with_z = adapt.classify(model, tok, questions, z=z)
    svf.use_expert(model, z)
    prompts = [tok.encode_chat(cls.classify_messages(q)) for q in questions]
    replies = [tok.encode(f"\\boxed{{{label}}}") for label in cls.LABELS]
    def plain_logprob(p, r):  # independent of the packed pass: one unpadded row per (prompt, reply)
        logp = torch.log_softmax(model(torch.tensor([p + r]))[0, len(p) - 1:-1], -1)
        return logp.gather(-1, torch.tensor(r)[:, None]).sum().item()
    by_sum = [max(range(len(replies)), key=lambda k: plain_logprob(p, replies[k])) for p in prompts]
    by_mean = [max(range(len(replies)), key=lambda k: plain_logprob(p, replies[k]) / len(replies[k])) for p in prompts]
    svf.use_expert(model, None)
    assert with_z == [cls.LABELS[k] for k in by_sum]   # the default: summed over the reply's tokens
    assert adapt.classify(model, tok, questions, z=z, reduce="mean") == [cls.LABELS[k] for k in by_mean]
    assert all(m.merged is None for m in svf.wrappers(model).values())
    assert adapt.classify(model, tok, questions, z=z, share_prefix=False) == with_z  # bench.py's "in full" peer


def test_the_first_pass_reads_the_opening_of_a_long_question(monkeypatch):
    monkeypatch.setattr(cls, "CLASSIFY_CHARS", 40)  # the tiny model's context is 512 characters
    model, tok = tiny_model(), CharTokenizer()
    long = "write a function that adds two numbers. " * 30
    assert cls.classify_messages(long)[-1]["content"] == long[:40]
    assert adapt.classify(model, tok, [long]) == adapt.classify(model, tok, [long[:40]])


def test_two_pass_equals_each_prompt_alone_with_its_expert():
    model, tok = tiny_model(), CharTokenizer()
    task, problems = EchoTask(), toy_problems(7)
    experts = {"gsm8k": random_expert(model, 4), "mbpp": random_expert(model, 5), "arc_easy": random_expert(model, 6),
               "base": None}
    labels = adapt.classify(model, tok, [p["question"] for p in problems])  # a real first pass...
    choice = adapt.dispatch(labels)[:3] + ["gsm8k", "mbpp", "arc_easy", "base"]  # ...plus every expert for sure
    outs = adapt.second_pass(model, tok, task, problems, experts, choice, batch_size=3, max_new_tokens=0)
    for p, name, c in zip(problems, choice, outs):
        svf.use_expert(model, experts[name])
        [alone] = generate(model, tok, [tok.encode_chat(task.messages(p))], task.max_new_tokens)
        assert c.tokens == alone.tokens, name
    svf.use_expert(model, None)
    base = adapt.second_pass(model, tok, task, problems, experts, ["base"] * 7, batch_size=3, max_new_tokens=0)
    assert [c.tokens for c in base[3:6]] != [c.tokens for c in outs[3:6]]  # the experts do change the answers


def test_composed_weights_are_never_shared_between_models_or_experts():
    """adapt.second_pass keeps composed experts for the next task; they were kept in one process-wide dict
    keyed by the expert's name, so a second model, or another expert of the same name, got them."""
    (a, b), tok, task, problems = (tiny_model(0), tiny_model(1)), CharTokenizer(), EchoTask(), toy_problems(3)

    def alone(model, z):
        svf.use_expert(model, z)
        outs = generate(model, tok, [tok.encode_chat(task.messages(p)) for p in problems], task.max_new_tokens)
        svf.use_expert(model, None)
        return [c.tokens for c in outs]

    def answered(model, z):
        outs = adapt.second_pass(model, tok, task, problems, {"gsm8k": z}, ["gsm8k"] * 3, batch_size=3,
                                 max_new_tokens=0)
        return [c.tokens for c in outs]

    z1, z2 = random_expert(a, 1), random_expert(a, 2)
    assert answered(a, z1) == alone(a, z1)
    assert answered(b, z1) == alone(b, z1)   # another model, the same expert
    assert answered(a, z2) == alone(a, z2)   # another expert under the same name
    assert alone(a, z2) != alone(a, z1) and alone(b, z1) != alone(a, z1)


def test_an_adapter_answers_like_the_lora_model_alone():
    """eval.py --adapter: every problem answered with the merged LoRA weights, then back to the base."""
    model, tok = tiny_model(), CharTokenizer()
    task, problems = EchoTask(), toy_problems(4)
    lora.attach(model, lora.LoRAConfig(rank=2))
    params = lora.init_params(model, seed=1)
    params = {n: v + 0.3 * torch.randn_like(v) if n.endswith(".B") else v for n, v in params.items()}  # not B = 0
    outs = adapt.second_pass(model, tok, task, problems, {"adapter:x": params}, ["adapter:x"] * 4, 3, 0)
    assert all(m.merged is None for m in lora.wrappers(model).values())  # back to the base model
    base = [generate(model, tok, [tok.encode_chat(task.messages(p))], task.max_new_tokens)[0] for p in problems]
    for i, p in enumerate(problems):  # independent: the LoRA path computed unmerged, one prompt at a time
        lora.train_ab(model, params)
        [alone] = generate(model, tok, [tok.encode_chat(task.messages(p))], task.max_new_tokens)
        lora.train_ab(model, None)
        assert outs[i].tokens == alone.tokens
    assert [c.tokens for c in outs] != [c.tokens for c in base]


class ChoiceTask(EchoTask):
    """Multiple choice for tiny models: three one-word options, the problem's letter marks the right one."""
    def option_messages(self, problem: dict) -> list[dict]:
        return [{"role": "user", "content": "pick: " + problem["question"]}]

    def option_responses(self, problem: dict) -> list[str]:
        return ["x" + problem["answer"], "yy", "zzz"]


def plain_option_scores(model, tok, task, problem) -> torch.Tensor:
    """log p(option | the option prompt), summed over its tokens: one plain forward pass per option."""
    prompt, scores = tok.encode_chat(task.option_messages(problem)), []
    for reply in task.option_responses(problem):
        r = tok.encode(reply)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + r]))[0, len(prompt) - 1:-1], -1)
        scores.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
    return torch.stack(scores)


def test_likelihood_answers_are_the_likeliest_option():
    """eval.py --answer likelihood: per problem, the option with the highest summed log-probability,
    checked against one plain forward pass per option, with an expert applied and without."""
    model, tok = tiny_model(), CharTokenizer()
    task, problems = ChoiceTask(), toy_problems(5)
    expert = random_expert(model, 3)
    for experts, name in (({"base": None}, "base"), ({"e": expert}, "e")):
        outs = adapt.second_pass(model, tok, task, problems, experts, [name] * 5, 2, 0, how="likelihood")
        svf.use_expert(model, experts[name])
        for p, out in zip(problems, outs):
            assert out.text == task.option_responses(p)[int(plain_option_scores(model, tok, task, p).argmax())]
        svf.use_expert(model, None)


def test_fewshot_objective_by_likelihood_reads_the_options_of_the_mixture():
    """fewshot with --answer likelihood: accuracy is the share of shots whose likeliest option is right,
    the tie-breaker the mean log-softmax of the right option, both under z' = mix(experts, alpha)."""
    model, tok = tiny_model(), CharTokenizer()
    task, shots = ChoiceTask(), toy_problems(6)
    a, b = random_expert(model, 4), random_expert(model, 5)
    alpha = torch.tensor([0.3, 0.8])
    got = adapt.fewshot_objective(model, tok, task, shots, [a, b], answer="likelihood")(alpha)
    svf.use_expert(model, svf.mix([a, b], alpha.double()))
    scores = [plain_option_scores(model, tok, task, p) for p in shots]  # "x" + the answer letter is right: 0
    svf.use_expert(model, None)
    right = sum(int(s.argmax()) == 0 for s in scores) / len(shots)
    logp = sum(torch.log_softmax(s, -1)[0].item() for s in scores) / len(shots)
    assert got == pytest.approx((right, logp))
    assert got != adapt.fewshot_objective(model, tok, task, shots, [a, b], answer="likelihood")(torch.tensor([1.0, 0.0]))


def test_eval_refuses_bad_requests_before_loading_anything():
    kw = dict(task="arc_easy", strategy="base", split="test", limit=4, seed=0, batch_size=4, max_new_tokens=0,
              workers=1, model="no/such/model", device="cpu", dtype="float32", threads=0, out="unused", shots=10,
              generations=1, population=2, per_layer=False, classify="likelihood", experts_dir="experts",
              adapter=None)
    with pytest.raises(SystemExit, match="--answer likelihood needs multiple-choice tasks"):
        evaluation.main(evaluation.EvalConfig(**{**kw, "task": "arc_easy,gsm8k"}, answer="likelihood"))
    with pytest.raises(SystemExit, match="unknown task 'arc'"):
        evaluation.main(evaluation.EvalConfig(**{**kw, "task": "arc"}))
    with pytest.raises(SystemExit, match="unknown strategy"):
        evaluation.main(evaluation.EvalConfig(**{**kw, "strategy": "best"}))


# ----------------------------------------------------------------------------- mixing
def test_mixture_of_one_expert_or_identical_experts_is_that_expert():
    model, tok = tiny_model(), CharTokenizer()
    a, b = random_expert(model, 7), random_expert(model, 8)
    tokens = torch.tensor([tok.encode("mixing experts in z space")])
    svf.use_expert(model, a)
    want = model(tokens)
    M = len(a)
    for experts, alpha in [([a, b], torch.tensor([1.0, 0.0])), ([b, a], torch.tensor([0.0, 1.0])),
                           ([a, a, a], torch.full((3,), 1 / 3)), ([a, b], torch.tensor([[1.0] * M, [0.0] * M]))]:
        svf.use_expert(model, svf.mix(experts, alpha.double()))
        torch.testing.assert_close(model(tokens), want)
    task, shots = EchoTask(), toy_problems(3)  # and the few-shot objective sees exactly that expert
    alone = adapt.fewshot_objective(model, tok, task, shots, [a])(torch.tensor([1.0]))
    assert adapt.fewshot_objective(model, tok, task, shots, [a, b])(torch.tensor([1.0, 0.0])) == pytest.approx(alone)
    per_layer = torch.cat([torch.ones(M), torch.zeros(M)])
    assert adapt.fewshot_objective(model, tok, task, shots, [a, b], per_layer=True)(per_layer) == pytest.approx(alone)
    svf.use_expert(model, None)


def test_the_fewshot_tie_breaker_is_the_mean_per_token_loglikelihood_of_the_reference_answers():
    model, tok = tiny_model(), CharTokenizer()
    task, shots, z = EchoTask(), toy_problems(3), random_expert(model, 3)
    _, loglik = adapt.fewshot_objective(model, tok, task, shots, [z])(torch.tensor([1.0]))
    svf.use_expert(model, z)
    want = []
    with torch.no_grad():
        for p in shots:  # one plain forward pass per shot
            prompt, ref = tok.encode_chat(task.messages(p)), tok.encode(task.reference_response(p))
            logp = torch.log_softmax(model(torch.tensor([prompt + ref]))[0, len(prompt) - 1:-1], -1)
            want.append(logp.gather(-1, torch.tensor(ref)[:, None]).mean().item())
    svf.use_expert(model, None)
    assert loglik == pytest.approx(sum(want) / len(want), rel=1e-9)


# ----------------------------------------------------------------------------- CEM
def test_cem_finds_a_known_optimum_within_the_box():
    target = torch.tensor([0.2, 0.9, 0.0, 1.0, 0.5], dtype=torch.float64)
    seen = []

    def objective(alpha):  # a coarse "accuracy" with many ties, and a fine tie-breaker
        seen.append(alpha.clone())
        d = (alpha - target).norm().item()
        return round(1 - d, 1), -d

    best, history = adapt.cem(objective, 5, generations=25, init_mean=1 / 3, seed=0)
    assert (best - target).abs().max() < 0.05
    assert len(history) == 25 and len(seen) == 32 + 24 * 33  # the previous best is evaluated again each time
    assert all(0.0 <= a.min() and a.max() <= 1.0 for a in seen)
    bests = [tuple(h["best"]) for h in history]
    assert bests == sorted(bests)  # never worse: the best so far always competes
    assert {"alpha_mean", "alpha_std", "population_mean"} <= set(history[0])


def test_cem_ties_on_accuracy_go_to_the_likelihood_and_accuracy_comes_first():
    flat, _ = adapt.cem(lambda a: (0.5, -(a - 0.7).abs().sum().item()), 2, generations=20, seed=1)
    assert (flat - 0.7).abs().max() < 0.05  # accuracy never differs: the tie-breaker alone finds 0.7
    # accuracy wants alpha_0 > 0.6; the likelihood pulls it to 0: accuracy wins, the likelihood decides within it
    best, _ = adapt.cem(lambda a: (float(a[0] > 0.6), -a[0].item()), 1, generations=20, seed=2)
    assert 0.6 < best[0] < 0.65


# ----------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("task_name, source", [("humaneval", "test"), ("math", "test"), ("arc_challenge", "train"),
                                               ("gsm8k", "train")])
def test_shots_never_appear_among_the_scored_problems(task_name, source):
    problems = data.load(task_name, "test")
    shots, scored = adapt.pick_shots(task_name, "test", problems, 10, seed=0)
    assert len(shots) == 10 and len({s["id"] for s in shots}) == 10
    assert {s["id"] for s in shots} <= {p["id"] for p in data.load(task_name, source)}
    shot_questions = {cls.normalise(s["question"]) for s in shots}
    assert not {s["id"] for s in shots} & {p["id"] for p in scored}
    assert not shot_questions & {cls.normalise(p["question"]) for p in scored}
    if source == "test":
        assert len(scored) == len(problems) - 10
    assert adapt.pick_shots(task_name, "test", problems, 10, seed=0)[0] == shots  # seeded
    # with a --limit subset, eval.py draws same-split shots from the problems left out of it, so the
    # scored set is exactly the subset the other strategies score
    subset = evaluation.subset(problems, 50, 0)
    spare = [p for p in problems if p["id"] not in {q["id"] for q in subset}]
    shots, scored = adapt.pick_shots(task_name, "test", subset, 10, seed=0, spare=spare)
    assert not {s["id"] for s in shots} & {p["id"] for p in scored}
    assert not {cls.normalise(s["question"]) for s in shots} & {cls.normalise(p["question"]) for p in scored}
    assert {s["id"] for s in shots} <= {p["id"] for p in (spare if source == "test" else data.load(task_name, source))}
    assert len(scored) >= 48  # only a duplicate question text may leave the subset


def test_fewshot_returns_the_mixture_of_its_best_alpha_and_saves_it(tmp_path):
    model, tok = tiny_model(), CharTokenizer()
    experts = {"gsm8k": random_expert(model, 9), "mbpp": random_expert(model, 10)}
    shots = toy_problems(4)
    for per_layer in (False, True):
        z, report = adapt.fewshot(model, tok, EchoTask(), shots, experts, per_layer, generations=2, population=4)
        alpha = torch.tensor(report["alpha"])
        assert alpha.shape == ((2, len(z)) if per_layer else (2,)) and 0 <= alpha.min() and alpha.max() <= 1
        for n, v in svf.mix(list(experts.values()), alpha).items():
            torch.testing.assert_close(z[n], v)
        assert report["experts"] == ["gsm8k", "mbpp"] and report["shots"] == [s["id"] for s in shots]
        assert len(report["history"]) == 2
    saved = adapt.save_adapted(tmp_path / "fewshot.safetensors", model, z, report)
    loaded = svf.Expert.load(tmp_path / "fewshot.safetensors", model)
    assert loaded.meta["targets"] == "mlp" and loaded.meta["fewshot"]["experts"] == ["gsm8k", "mbpp"]
    for n in z:
        torch.testing.assert_close(loaded.z[n].double(), saved.z[n].float().double())


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


def test_the_first_pass_reads_the_question_asked_not_the_task_template(monkeypatch):
    """ARC-Challenge shares ARC-Easy's template and MATH GSM8K's: routing on the full user message
    could read the template instead of the question (the paper routes on the user's question)."""
    seen = []
    monkeypatch.setattr(adapt, "classify", lambda model, tok, questions, *a, **k: seen.append(questions)
                        or ["math"] * len(questions))
    problems = data.load("arc_challenge", "test")[:3]
    choice, _, labels = adapt.first_pass(None, None, data.TASKS["arc_challenge"], problems, "prompt",
                                              {n: None for n in adapt.DOMAIN_EXPERTS}, [], 0, 0, False,
                                              "likelihood", 4, 0, None)
    assert seen == [[p["question"] for p in problems]] and choice == ["gsm8k"] * 3


def test_the_cls_expert_trains_on_the_scores_the_first_pass_reads():
    model, tok = tiny_model(), CharTokenizer()
    problems = [{"question": q, "answer": "math"} for q in ("what is 2 + 2?", "write a function")]
    trained = torch.stack(replies.option_logits(model, tok, cls.CLS_TASK, problems, 1.0))
    read = adapt.label_logprobs(model, tok, [p["question"] for p in problems])
    torch.testing.assert_close(trained, read.to(trained.dtype))


def test_cls_task_rewards_the_right_label():
    p = cls.cls_problems("validation")[0]
    task = cls.CLS_TASK
    assert task.score(p, task.reference_response(p))
    assert not task.score(p, "\\boxed{other}") and not task.score(p, "no idea")
    assert task.messages(p)[0]["content"] == cls.CLASSIFY_SYSTEM and task.messages(p)[-1]["content"] == p["question"]


def test_cls_task_runs_in_the_reinforce_trainer():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**TINY.__dict__, "max_seq_len": 2048})).double().eval().requires_grad_(False)
    svf.attach(model, svf.decompose(model, "mlp", cache_dir=None))
    problems = cls.cls_problems("validation")[:2]
    cfg = rl.TrainConfig(task="cls", batch_size=2, samples=2, micro_batch=4)
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    stats = rl.train_step(model, CharTokenizer(), cls.CLS_TASK, problems, z, opt, cfg, gen)
    assert 0 <= stats["accuracy"] <= 1 and stats["tokens"] <= 4 * cls.CLS_TASK.max_new_tokens
    assert 0 <= rl.validate(model, CharTokenizer(), cls.CLS_TASK, problems, z, batch=2) <= 1




def test_routing_confusion_matrices_count_each_question_once(tmp_path, monkeypatch):
    """eval.py --routing: per reader, rows are the true domains, columns the labels classify() reads."""
    model, tok = tiny_model(), CharTokenizer()
    labels = ["math", "code", "reasoning"]
    toy = [{"id": f"cls/{i}", "question": f"question {i} " + "xyz"[i % 3] * (i % 5), "answer": labels[i % 3]}
           for i in range(12)]
    monkeypatch.setattr(cls, "cls_problems", lambda split: toy)
    z = {n: 1 + 3 * (v - 1) for n, v in random_expert(model, 0).items()}  # one that reads "code" here
    summary = evaluation.routing(model, tok, z, 0, 0, 4, tmp_path, "python eval.py --routing")
    questions = [p["question"] for p in toy]
    for strategy, read in (("prompt", adapt.classify(model, tok, questions)),
                           ("cls", adapt.classify(model, tok, questions, z=z))):
        got = summary[strategy]
        for t in labels:
            assert got["confusion"][t] == {label: sum(r == label and p["answer"] == t for r, p in zip(read, toy))
                                           for label in cls.LABELS}
        assert got["correct"] == sum(r == p["answer"] for r, p in zip(read, toy))
    assert summary["prompt"]["confusion"] != summary["cls"]["confusion"]  # the expert reads differently
    assert (tmp_path / "routing" / "summary.json").exists()


# ----------------------------------------------------------------------------- an interrupted evaluation
class ScoredEchoTask(EchoTask):
    """EchoTask with what eval.py's scoring asks of a task."""
    def extract(self, response: str, problem: dict | None = None) -> str | None:
        return next((c for c in response if c in "abc"), None)

    def score_many(self, problems, responses, workers=1):
        return [self.score(p, r) for p, r in zip(problems, responses)]


def evaluate(model, tokenizer, task_name, loaded, command, out_dir, resume=False, **settings):
    """eval.evaluate_task with the settings of an EvalConfig."""
    cfg = evaluation.EvalConfig(**settings, out=str(out_dir), resume=resume)
    return evaluation.evaluate_task(model, tokenizer, task_name, loaded, cfg, command)


def test_an_interrupted_evaluation_resumes_where_it_stopped(tmp_path, monkeypatch):
    import engine  # generate_all calls generate through engine
    model, tok = tiny_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ScoredEchoTask())
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(7))
    kw = dict(model=model, tokenizer=tok, task_name="echo", strategy="base", loaded={}, split="test", limit=0,
              seed=0, batch_size=2, max_new_tokens=0, workers=1, command="test", shots=10, generations=1,
              population=2, per_layer=False, classify="likelihood")
    straight = evaluate(**kw, out_dir=tmp_path / "a")
    real_generate, calls = engine.generate, []

    def generate_then_interrupt(*args, stop_after=None, **kwargs):  # Ctrl-C during the third batch
        calls.append(len(args[2]))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(engine, "generate", lambda *a, **k: generate_then_interrupt(*a, stop_after=2, **k))
    with pytest.raises(KeyboardInterrupt):
        evaluate(**kw, out_dir=tmp_path / "b")
    partial = tmp_path / "b" / "base" / "echo" / evaluation.PARTIAL
    with open(partial, "a") as f:
        f.write('{"answer": {"id": "toy/6", "exp')  # a line cut short as the process died
    with pytest.raises(SystemExit, match="other settings \\(limit\\)"):
        evaluate(**{**kw, "limit": 5}, out_dir=tmp_path / "b", resume=True)
    calls.clear()
    monkeypatch.setattr(engine, "generate", generate_then_interrupt)
    resumed = evaluate(**kw, out_dir=tmp_path / "b", resume=True)
    assert sum(calls) == 3  # only the 3 problems the interrupted run had not answered
    assert not partial.exists() and resumed["resumed"] and not straight["resumed"]
    read = lambda d: [json.loads(l) for l in (d / "base" / "echo" / "responses.jsonl").read_text().splitlines()]
    assert read(tmp_path / "b") == read(tmp_path / "a")
    assert {k: resumed[k] for k in ("n", "correct", "generated_tokens")} == \
        {k: straight[k] for k in ("n", "correct", "generated_tokens")}
    calls.clear()  # once finished, --resume skips the task
    assert evaluate(**kw, out_dir=tmp_path / "b", resume=True) == resumed and not calls


def test_an_interrupted_cem_search_goes_on_exactly_where_it_stopped():
    target = torch.tensor([0.7, 0.1, 0.4], dtype=torch.float64)
    objective = lambda a: (round(1 - (a - target).norm().item(), 1), -(a - target).norm().item())
    best, history = adapt.cem(objective, 3, population=6, generations=5, seed=1)
    saved, calls = [], []

    def stopping(a):  # interrupted during generation 3
        calls.append(1)
        if len(calls) > 6 + 7 + 3:
            raise KeyboardInterrupt
        return objective(a)
    with pytest.raises(KeyboardInterrupt):
        adapt.cem(stopping, 3, population=6, generations=5, seed=1, on_generation=saved.append)
    assert len(saved) == 2
    saved = json.loads(json.dumps(saved))  # as eval.py keeps them, in partial.jsonl
    resumed_best, resumed = adapt.cem(objective, 3, population=6, generations=5, seed=1, history=saved)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]
    assert strip(resumed) == strip(history) and torch.equal(resumed_best, best)


def test_a_fewshot_evaluation_interrupted_in_its_search_resumes_it(tmp_path, monkeypatch):
    model, tok = tiny_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ScoredEchoTask())
    monkeypatch.setitem(data.SPLITS, "echo", {"test": 7})
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(7))
    loaded = {n: random_expert(model, i) for i, n in enumerate(adapt.DOMAIN_EXPERTS)}
    kw = dict(model=model, tokenizer=tok, task_name="echo", strategy="fewshot", loaded=loaded, split="test",
              limit=0, seed=0, batch_size=4, max_new_tokens=0, workers=1, command="test", shots=2, generations=3,
              population=2, per_layer=False, classify="likelihood")
    straight = evaluate(**kw, out_dir=tmp_path / "a")
    real_generate, calls, interrupted = adapt.generate, [], []

    def generate_then_interrupt(*args, **kwargs):  # the search's 4th candidate (generation 2), once
        calls.append(1)
        if len(calls) == 4 and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(adapt, "generate", generate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        evaluate(**kw, out_dir=tmp_path / "b")
    calls.clear()
    resumed = evaluate(**kw, out_dir=tmp_path / "b", resume=True)
    assert len(calls) == 3 + 3  # generations 2 and 3 only (2 samples and the previous best each)
    report = lambda d: json.loads((d / "fewshot" / "echo" / "fewshot.json").read_text())
    strip = lambda r: {**r, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]}
    assert strip(report(tmp_path / "b")) == strip(report(tmp_path / "a"))
    read = lambda d: (d / "fewshot" / "echo" / "responses.jsonl").read_text()
    assert read(tmp_path / "b") == read(tmp_path / "a") and resumed["resumed"] and not straight["resumed"]


def test_several_strategies_are_compared_on_the_same_problems(tmp_path, monkeypatch, capsys):
    """eval.py --strategy base,expert:E evaluates both on the same problems and prints the paired
    difference, with the exact McNemar p worked here from the two responses.jsonl files."""
    import math
    class ParityTask(ScoredEchoTask):  # right when the reply opens with ")" on even ids only
        def score(self, problem, response):
            return (response[:1] == ")") == (int(problem["id"].split("/")[-1]) % 2 == 0)

    model, tok = tiny_model(), CharTokenizer()
    monkeypatch.setitem(data.TASKS, "echo", ParityTask())
    monkeypatch.setitem(data.SPLITS, "echo", {"test": 12})
    monkeypatch.setattr(data, "load", lambda name, split: toy_problems(12))
    monkeypatch.setattr(evaluation, "load", lambda *a, **k: (model, tok))
    path = tmp_path / "e.safetensors"
    svf.Expert(random_expert(model, 1), {"targets": "mlp", "base_model": svf.model_fingerprint(model)}
               ).save(path)
    cfg = evaluation.EvalConfig(task="echo", strategy=f"base,expert:{path}", batch_size=4,
                                workers=1, out=str(tmp_path / "out"))
    base, expert = evaluation.main(cfg)
    assert base["strategy"] == "base" and expert["strategy"] == f"expert:{path}" and base["n"] == 12
    read = lambda s: {json.loads(l)["id"]: json.loads(l)["correct"] for l in
                      (evaluation.task_folder(replace(cfg, strategy=s), "echo") / "responses.jsonl")
                      .read_text().splitlines()}
    a, b = read("base"), read(f"expert:{path}")
    assert set(a) == set(b) and len(a) == 12
    better = sum(b[i] and not a[i] for i in a)
    worse = sum(a[i] and not b[i] for i in a)
    n = better + worse
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2 ** n)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("echo: ")][-1]
    assert n > 0  # the expert changes some verdicts: a difference to test
    assert f"({better} better, {worse} worse)" in line
    assert f"{100 * (better - worse) / 12:+.1f} points" in line
    assert (f"p = {p:.3f}" if p >= 0.001 else "p < 0.001") in line
