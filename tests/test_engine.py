"""engine.generate_many (continuous batching for rollouts) against independent references: plain
generate() of each prompt, a plain forward pass without a cache, and softmax(logits / T) itself."""
import copy

import pytest
import torch

from engine import draw, generate_many, sample_rows
from model import ModelArgs, Transformer, generate
from tiny import StubTokenizer



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96,
                     max_seq_len=96)
    return Transformer(args).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in lengths]
    return prompts + [prompts[0]] * 3 + [prompts[3]] * 2  # repeated, as a rollout's samples


def stopping_tokenizer(model, prompts, n):
    """A tokenizer whose stop tokens end the greedy continuations at different steps: the 3rd
    token of the first prompt's, the 9th of the second's, the 15th of the third's."""
    free = [generate(model, StubTokenizer(()), [p], n)[0].tokens for p in prompts[:3]]
    return StubTokenizer({free[0][2], free[1][8], free[2][14]})


def same(a, b):
    assert a.tokens == b.tokens and a.text == b.text and a.finish == b.finish
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_greedy_equals_plain_generate_of_each_prompt(tiny, batch):
    prompts = random_prompts([3, 9, 5, 17, 4, 11, 2, 6])
    tok = stopping_tokenizer(tiny, prompts, 24)
    reference = [generate(tiny, tok, [p], 24)[0] for p in prompts]
    assert {c.finish for c in reference} == {"stop", "length"}  # rows end apart: refills
    assert len({len(c.tokens) for c in reference}) >= 3
    for a, b in zip(generate_many(tiny, tok, prompts, batch, max_new_tokens=24), reference):
        same(a, b)


def test_stop_strings_end_rows_as_generate_does(tiny):
    prompts = random_prompts([4, 7, 10, 5, 3, 8])
    free = generate(tiny, StubTokenizer(()), [prompts[1]], 20)[0].tokens
    stops = (f"{free[4]} {free[5]}", "no such text")  # ends prompt 1 after its 6th token
    tok = StubTokenizer({1})
    reference = [generate(tiny, tok, [p], 20, stop_strings=stops)[0] for p in prompts]
    assert reference[1].finish == "stop" and len(reference[1].tokens) <= 6
    assert stops[0] not in reference[1].text
    out = generate_many(tiny, tok, prompts, 2, max_new_tokens=20, stop_strings=stops)
    for a, b in zip(out, reference):
        same(a, b)


def test_refilled_rows_see_only_their_own_cache(tiny):
    """Sampled rows of 2 slots refilled 12 times: every token's log-probability equals the one a
    plain forward pass (no cache) of that row's own prompt and tokens gives."""
    prompts = random_prompts([3, 12, 6, 20, 5, 9, 2, 15, 7])
    tok = StubTokenizer({1, 2, 3, 4, 5, 6})  # about 1 in 20 tokens ends a row
    out = generate_many(tiny, tok, prompts, 2, max_new_tokens=40, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert len({len(c.tokens) for c in out}) >= 4 and any(c.finish == "stop" for c in out)
    for p, c in zip(prompts, out):
        with torch.no_grad():
            logits = tiny(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1]          # (tokens, vocab)
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(logp, torch.tensor(c.logprobs), atol=1e-5)


def test_deterministic_given_the_generator(tiny):
    prompts = random_prompts([3, 8, 5, 6])
    run = lambda seed, batch=3: [c.tokens for c in generate_many(
        tiny, StubTokenizer({1, 2, 3}), prompts, batch, max_new_tokens=16, temperature=0.9,
        top_p=0.95, generator=torch.Generator().manual_seed(seed))]
    assert run(0) == run(0)
    assert run(0) != run(1)


def within_noise(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Every frequency within 5 standard deviations of its probability (and none where p is 0)."""
    n = counts.sum()
    sd = (p * (1 - p) / n).sqrt()
    return bool(((counts / n - p).abs() <= 5 * sd + 1 / n).all() and (counts[p == 0] == 0).all())


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampled_tokens_follow_softmax_of_logits_over_t(temperature, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=g) * 2
    logits[0, ::7] = -float("inf")                     # impossible tokens, across the blocks
    p = torch.softmax(logits[0] / temperature, -1)
    if top_p < 1:                                                 # the nucleus, renormalised
        sorted_p, order = p.sort(descending=True)
        sorted_p[sorted_p.cumsum(0) - sorted_p > top_p] = 0
        p = torch.zeros_like(p).scatter(0, order, sorted_p / sorted_p.sum())
    tokens, logprobs = sample_rows(logits.expand(100_000, -1).clone(), temperature, top_p, g)
    assert within_noise(torch.bincount(tokens, minlength=1000).float(), p)
    at_t1 = torch.log_softmax(logits[0], -1)[tokens]  # log-probabilities are at temperature 1
    assert torch.allclose(logprobs, at_t1, atol=1e-5)


def test_wrong_distribution_is_caught():
    """The check above can fail: T = 1 samples are not T = 0.7's distribution."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=g) * 2
    tokens, _ = sample_rows(logits.expand(100_000, -1).clone(), 1.0, 1.0, g)
    counts = torch.bincount(tokens, minlength=1000).float()
    assert not within_noise(counts, torch.softmax(logits[0] / 0.7, -1))


def test_draw_on_sparse_weights_across_block_edges():
    """Weights on a few entries only, at block edges and past the last full block (V = 1100,
    blocks of 512)."""
    w = torch.zeros(1, 1100)
    w[0, [0, 511, 512, 1023, 1024, 1099]] = torch.tensor([1.0, 2.0, 3.0, 1e-3, 4.0, 0.5])
    idx = draw(w.expand(100_000, -1).clone(), torch.Generator().manual_seed(0))
    assert within_noise(torch.bincount(idx, minlength=1100).float(), w[0] / w.sum())


def test_first_step_samples_follow_the_model(tiny):
    """One step through the model: the first tokens of 20,000 samples of one prompt against
    softmax(logits / T) of a plain forward pass."""
    prompt = [5, 17, 33, 2]
    out = generate_many(tiny, StubTokenizer(()), [prompt] * 20_000, 2048, max_new_tokens=1,
                        temperature=0.8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(tiny(torch.tensor([prompt]))[0, -1] / 0.8, -1)
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in out]), minlength=128).float()
    assert within_noise(counts, p)


def test_context_length_caps_new_tokens_as_generate_does(tiny):
    prompts = [list(range(2, 92)), [7, 8, 9]]                      # the first leaves 6 slots of 96
    tok = StubTokenizer(())
    out = generate_many(tiny, tok, prompts, 2, max_new_tokens=20)
    assert [len(c.tokens) for c in out] == [6, 20]
    for a, p in zip(out, prompts):
        same(a, generate(tiny, tok, [p], 20)[0])
    with pytest.raises(ValueError):
        generate_many(tiny, tok, [list(range(2, 98))], 2)
    with pytest.raises(ValueError):
        generate_many(tiny, tok, [[]], 2)


# ----------------------------------------------------------------------------- the real model
@pytest.mark.real
def test_real_model_greedy_equals_plain_generate(real):
    model, tok = real
    questions = ["What is 12 times 7?", "Name a mammal that lives in the sea.",
                 "Write a haiku about rain."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    reference = [generate(model, tok, [p], 32)[0] for p in prompts]
    out = generate_many(model, tok, prompts + prompts[:1], 2, max_new_tokens=32)
    for a, b in zip(out, reference + reference[:1]):
        assert a.tokens == b.tokens and a.text == b.text and a.finish == b.finish


@pytest.mark.real
def test_real_model_sampled_rows_equal_a_plain_forward(real):
    """Rollout-shaped: 2 prompts x 3 samples in 4 slots at temperature 1, a stop string; each row's
    log-probabilities against a plain forward pass of its own prompt and tokens."""
    model, tok = real
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in
               ("Tom has 3 apples and buys 5 more. How many apples does he have?",
                "What is 2 + 2?")]
    prompts = [p for p in prompts for _ in range(3)]
    free = copy.copy(tok)
    out = generate_many(model, free, prompts, 4, max_new_tokens=24, temperature=1.0,
                        stop_strings=("\nQuestion:",), generator=torch.Generator().manual_seed(0))
    for p, c in zip(prompts, out):
        with torch.no_grad():
            logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1]
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        assert torch.allclose(logp, torch.tensor(c.logprobs), atol=1e-3)


def test_generate_all_refill_runs_generate_many(tiny):
    """rl.rollout's way in: generate_all(refill=True) gives generate_many's results; on_batch is
    refused."""
    from engine import generate_all
    prompts, tok = random_prompts([3, 8, 5, 6]), StubTokenizer({1, 2, 3})
    kw = dict(max_new_tokens=12, temperature=1.0)
    seeded = lambda: torch.Generator().manual_seed(0)
    a = generate_all(tiny, tok, prompts, 3, refill=True, generator=seeded(), **kw)
    b = generate_many(tiny, tok, prompts, 3, generator=torch.Generator().manual_seed(0), **kw)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    with pytest.raises(ValueError):
        generate_all(tiny, tok, prompts, 3, refill=True, on_batch=print, **kw)
