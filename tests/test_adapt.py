"""adapt.py (paper section 3.2): the first pass (classification, dispatch, CEM, few-shot
mixing) and the second pass."""
import json

import pytest
import torch

import adapt
import data
import lora
import svf
from data import cls
from model import generate
from tiny import (CharTokenizer, ChoiceTask, EchoTask, random_expert, tiny_wrapped_model, toy_problems)


def test_other_and_unparsable_use_the_base_model():
    assert adapt.dispatch(["math", "code", "reasoning", "other", None]) == ["gsm8k", "mbpp", "arc_easy", "base", "base"]
    model, tok, task = tiny_wrapped_model(), CharTokenizer(), EchoTask()
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
    model, tok = tiny_wrapped_model(), CharTokenizer()
    questions = ["what is 2 + 2?", "write a function", "which gas do plants take in?"]
    base = adapt.classify(model, tok, questions, batch_size=2)
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
    base_sum = [max(range(len(replies)), key=lambda k: plain_logprob(p, replies[k])) for p in prompts]
    assert base == [cls.LABELS[k] for k in base_sum]   # the base model read by the same rule
    assert with_z == [cls.LABELS[k] for k in by_sum]   # the default: summed over the reply's tokens
    assert adapt.classify(model, tok, questions, z=z, reduce="mean") == [cls.LABELS[k] for k in by_mean]
    assert all(m.merged is None for m in svf.wrappers(model).values())
    assert adapt.classify(model, tok, questions, z=z, share_prefix=False) == with_z  # bench.py's "in full" peer


def test_the_first_pass_reads_the_opening_of_a_long_question(monkeypatch):
    monkeypatch.setattr(cls, "CLASSIFY_CHARS", 40)  # the tiny model's context is 512 characters
    model, tok = tiny_wrapped_model(), CharTokenizer()
    long = "write a function that adds two numbers. " * 30
    assert cls.classify_messages(long)[-1]["content"] == long[:40]
    assert adapt.classify(model, tok, [long]) == adapt.classify(model, tok, [long[:40]])


def test_two_pass_equals_each_prompt_alone_with_its_expert():
    model, tok = tiny_wrapped_model(), CharTokenizer()
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
    (a, b), tok, task, problems = (tiny_wrapped_model(0), tiny_wrapped_model(1)), CharTokenizer(), EchoTask(), toy_problems(3)

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
    model, tok = tiny_wrapped_model(), CharTokenizer()
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
    model, tok = tiny_wrapped_model(), CharTokenizer()
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
    model, tok = tiny_wrapped_model(), CharTokenizer()
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


# ----------------------------------------------------------------------------- mixing
def test_mixture_of_one_expert_or_identical_experts_is_that_expert():
    model, tok = tiny_wrapped_model(), CharTokenizer()
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
    model, tok = tiny_wrapped_model(), CharTokenizer()
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


def test_fewshot_returns_the_mixture_of_its_best_alpha_and_saves_it(tmp_path):
    model, tok = tiny_wrapped_model(), CharTokenizer()
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
    saved = svf.save_adapted(tmp_path / "fewshot.safetensors", model, z, report)
    loaded = svf.Expert.load(tmp_path / "fewshot.safetensors", model)
    assert loaded.meta["targets"] == "mlp" and loaded.meta["fewshot"]["experts"] == ["gsm8k", "mbpp"]
    for n in z:
        torch.testing.assert_close(loaded.z[n].double(), saved.z[n].float().double())


def test_the_first_pass_reads_the_question_asked_not_the_task_template(monkeypatch):
    """ARC-Challenge shares ARC-Easy's template and MATH GSM8K's: routing on the full user message
    could read the template instead of the question (the paper routes on the user's question)."""
    seen = []
    monkeypatch.setattr(adapt, "classify", lambda model, tok, questions, *a, **k: seen.append(questions)
                        or ["math"] * len(questions))
    problems = data.load("arc_challenge", "test")[:3]
    choice, _, labels = adapt.first_pass(None, None, data.TASKS["arc_challenge"], problems, "prompt",
                                              {n: None for n in cls.DOMAIN_EXPERTS}, [], 0, 0, False,
                                              "likelihood", 4, 0, None)
    assert seen == [[p["question"] for p in problems]] and choice == ["gsm8k"] * 3


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


