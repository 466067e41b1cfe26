"""The library on every device this machine has, in float32 and bfloat16 (issue 20): the CPU always, CUDA
when torch sees one, so `make test` on a GPU machine runs every case here on the GPU as well.

One tiny random Llama (grouped-query attention, Llama 3.1 rope scaling, sharded safetensors) is written as a
Hugging Face folder and loaded by checkpoint.load_model as a user's checkpoint is. The references are
independent of the code under test: transformers on the same folder, or a plain float64 computation on the
CPU of the same (device-rounded) weights. bfloat16 is compared within bfloat16's precision; where float32
is exact (a batch against each prompt alone, greedy labels) it is asserted exactly.
"""
import numpy as np
import pytest
import torch

import adapt
from data import cls
import checkpoint
import config
import loop
import lora
import options
import methods
import rl
import svf
from engine import generate_all
from model import generate
from tiny import CharTokenizer, ChoiceTask, EchoTask, ToyTask, ToyTokenizer, toy_problems, toy_train_problems

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(d, t) for d in DEVICES for t in ("float32", "bfloat16")]
on_every_device = pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{t}" for d, t in CASES])
# max |difference| allowed against a float64 (or transformers float32) reference, relative to the largest logit
LOGIT_TOL = {"float32": 1e-4, "bfloat16": 1e-1}
LOGPROB_TOL = {"float32": 1e-4, "bfloat16": 1e-1}   # a token's log-probability, absolute
SUM_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}      # a sum of them (a reply's), relative


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Llama 3.1-style checkpoint: 2 layers, 4 query and 2 key/value heads, 64 ids (CharTokenizer's and
    ToyTokenizer's), a context long enough for the classification prompt, three safetensors shards."""
    import transformers as tf
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, max_position_embeddings=1024, rms_norm_eps=1e-5,
                            rope_theta=500000.0, tie_word_embeddings=False,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    torch.manual_seed(0)
    ref = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough for peaked attention and clear greedy choices; random norms
        for name, p in ref.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.15)
    path = tmp_path_factory.mktemp("llama")
    ref.save_pretrained(path, max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) >= 3 and (path / "model.safetensors.index.json").exists()
    return path, ref


def load(folder, device, dtype):
    return checkpoint.load_model(folder[0], device=device, dtype=dtype)


def cpu64(folder, model):
    """The reference: the same weights as `model` holds them (bfloat16-rounded there), in float64 on the CPU."""
    ref = checkpoint.load_model(folder[0], device="cpu", dtype="float32").double()
    ref.load_state_dict({k: v.detach().cpu().double() for k, v in model.state_dict().items()})
    return ref


def close(got: torch.Tensor, want: torch.Tensor, dtype: str) -> float:
    """max |got - want| over max |want|, both moved to float64 on the CPU; asserted below LOGIT_TOL."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
    assert err < LOGIT_TOL[dtype], f"{dtype}: relative difference {err:.2e}"
    return err


def tokens(device, seed=1, shape=(3, 20)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------- loading
@on_every_device
def test_loading_puts_every_tensor_on_the_device_and_matches_transformers(folder, device, dtype):
    model = load(folder, device, dtype)
    dt = getattr(torch, dtype)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device, dt)}
    assert {(b.device.type, b.dtype) for b in model.buffers()} == {(device, torch.float32)}  # rotary tables
    x = tokens(device)
    with torch.no_grad():
        logits = model(x)
        want = folder[1](x.cpu()).logits  # transformers, float32 on the CPU, from the same folder
    assert logits.device.type == device and logits.dtype == torch.float32
    close(logits, want, dtype)
    cache = model.new_cache(3, 24)
    assert all(c.k.device.type == device for c in cache)


# ----------------------------------------------------------------------------- generation
@on_every_device
def test_greedy_decoding_equals_full_recomputation_and_batching_changes_nothing(folder, device, dtype):
    model, tok = load(folder, device, dtype), CharTokenizer()
    prompts = [[5, 17, 33, 2], [7] * 11, [9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12, 13, 14], [5, 17, 33, 2]]
    batch = generate(model, tok, prompts, 10)  # left-padded, the repeated prompt prefilled once
    ref = cpu64(folder, model)
    for p, c in zip(prompts, batch):
        with torch.no_grad():  # independent: one plain forward pass of prompt + answer, in float64
            logp = torch.log_softmax(ref(torch.tensor([p + c.tokens])), -1)[0, len(p) - 1:-1]
        chosen = logp.gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        np.testing.assert_allclose(c.logprobs, chosen.numpy(), atol=LOGPROB_TOL[dtype])
        # greedy: each token is the argmax (in bfloat16, within its rounding of the best)
        assert (logp.max(-1).values - chosen).max() <= (0 if dtype == "float32" else LOGPROB_TOL[dtype])
        if dtype == "float32":  # exact here: a row of a padded batch decodes as the prompt alone
            [alone] = generate(model, tok, [p], 10)
            assert alone.tokens == c.tokens
            np.testing.assert_allclose(alone.logprobs, c.logprobs, atol=1e-4)
    all_ = generate_all(model, tok, prompts, 2, max_new_tokens=10)
    if dtype == "float32":
        assert [c.tokens for c in all_] == [c.tokens for c in batch]


@on_every_device
def test_sampling_draws_from_a_generator_on_the_device(folder, device, dtype):
    model, tok = load(folder, device, dtype), CharTokenizer()
    run = lambda seed: generate(model, tok, [[5, 6, 7]] * 3, 12, temperature=1.0, top_p=0.9,
                                generator=torch.Generator(device).manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


# ----------------------------------------------------------------------------- SVF
def random_z(model, seed: int, scale: float = 0.3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (1 + scale * torch.randn(v.shape, generator=g)).to(v.device) for n, v in svf.ones(model).items()}


def composed_reference(ref, z: dict) -> None:
    """Put W' = U diag(s z) V^T into the float64 reference's plain linears, from its own float64 SVD."""
    with torch.no_grad():
        for n, zn in z.items():
            lin = ref.get_submodule(n)
            U, s, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
            lin.weight.copy_((U * (s * zn.cpu().double())) @ Vh)


@on_every_device
def test_svf_experts_compose_on_the_device(folder, device, dtype):
    model = load(folder, device, dtype)
    ref, x = cpu64(folder, model), tokens(device)
    with torch.no_grad():
        base = model(x)
    svd = svf.decompose(model, "all", cache=False)
    assert {(t.device.type, t.dtype) for d in svd.values() for t in (d.U, d.s, d.Vh)} == {(device, torch.float32)}
    svf.attach(model, svd)
    svf.use_expert(model, svf.ones(model))
    with torch.no_grad():
        close(model(x), base, dtype)                              # z = 1 is the base model
    z = random_z(model, 3)
    svf.use_expert(model, z)
    with torch.no_grad():
        merged = model(x)
    composed_reference(ref, z)
    with torch.no_grad():
        close(merged, ref(x.cpu()), dtype)                        # = U diag(s z) V^T computed independently
    svf.use_expert(model, z, cache=True)                          # kept, keyed by z's contents
    svf.use_expert(model, z, cache=True)
    with torch.no_grad():
        assert torch.equal(model(x), merged)
    svf.train_z(model, z)
    close(model(x), merged, dtype)                                # the training path composes the same
    svf.use_expert(model, None)
    with torch.no_grad():
        close(model(x), base, dtype)
    assert (merged - base).abs().max() > 0.1                      # the expert really changes the model


@on_every_device
def test_svf_mixture_of_experts_on_the_device(folder, device, dtype):
    model = load(folder, device, dtype)
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    a, b = random_z(model, 1), random_z(model, 2)
    alpha = torch.tensor([0.3, 0.9])  # CEM's alphas live on the CPU
    mixed = svf.mix([a, b], alpha)
    assert all(v.device.type == device for v in mixed.values())
    for n, v in mixed.items():  # the library's definition, evaluated on the CPU
        want = svf.mix([{n: a[n].cpu()}, {n: b[n].cpu()}], alpha)[n]
        torch.testing.assert_close(v.cpu(), want)


# ----------------------------------------------------------------------------- training
def reinforce_case(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 64, (n,), generator=g).tolist() for n in (5, 9)]
    samples = [[torch.randint(2, 64, (n,), generator=g).tolist() for n in ns] for ns in ((4, 2), (6,))]
    return prompts, samples, torch.tensor([1.0, -1.0, 0.5])


@on_every_device
def test_reinforce_loss_and_its_gradient_match_a_float64_cpu_computation(folder, device, dtype):
    model = load(folder, device, dtype)
    ref = cpu64(folder, model)
    prompts, samples, adv = reinforce_case(model)
    results = []
    for m in (model, ref):
        svf.attach(m, svf.decompose(m, "mlp", cache=False))
    start = random_z(model, 5, 0.2)  # off the base model, so that the KL term and its gradient are not 0
    for m in (model, ref):
        ones = svf.ones(m)
        z = {n: torch.nn.Parameter(v.to(ones[n])) for n, v in start.items()}
        loss, parts = rl.reinforce_loss(m, z, prompts, samples, adv, kl_coef=0.1, n_total=3, pad_id=0,
                                        temperature=0.7)
        loss.backward()
        methods.base_mode(m)
        assert all(v.grad is not None and v.grad.device == v.device for v in z.values())
        results.append((loss.item(), parts["kl"], torch.cat([v.grad.cpu().double() for v in z.values()])))
    (loss, kl, grad), (loss64, kl64, grad64) = results
    assert kl64 > 0 and kl == pytest.approx(kl64, rel=1e-4 if dtype == "float32" else 0.05)
    assert loss == pytest.approx(loss64, rel=1e-5 if dtype == "float32" else 1e-2)
    cosine = torch.nn.functional.cosine_similarity(grad, grad64, dim=0).item()
    assert cosine > (1 - 1e-7 if dtype == "float32" else 0.998), cosine
    assert grad.norm().item() == pytest.approx(grad64.norm().item(), rel=1e-4 if dtype == "float32" else 2e-2)


@on_every_device
@pytest.mark.parametrize("method", ["svf", "lora"])
def test_a_training_step_runs_on_the_device(folder, device, dtype, method):
    """rl.train_step end to end: sampled rollout (a device generator), scoring, loss, backward, AdamW."""
    model, tok, task = load(folder, device, dtype), ToyTokenizer(), ToyTask()
    cfg = config.TrainConfig(task="toy", method=method, targets="mlp", batch_size=2, samples=3, temperature=1.0, lr=0.05,
                         kl_coef=0.1, baseline="none", micro_batch=4, gen_batch=6, lora_rank=2, lora_dropout=0.1)
    if method == "lora":
        z = methods.setup(model, cfg)[0]   # attached, A random and B = 0, on the model's device
    else:                             # (methods.setup would cache the SVD on disk)
        svf.attach(model, svf.decompose(model, "mlp", cache=False))
        z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    start = {n: v.detach().clone() for n, v in z.items()}
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
    stats = rl.train_step(model, tok, task, toy_train_problems(2, 0), z, opt, cfg,
                          torch.Generator(device).manual_seed(0))
    assert np.isfinite([stats["pg"], stats["kl"], stats["grad_norm"]]).all() and stats["grad_norm"] > 0
    assert all(v.device.type == device for v in z.values())
    assert max((z[n] - start[n]).abs().max().item() for n in z) > 1e-3  # AdamW moved the tensors


@on_every_device
def test_a_training_run_saves_and_reloads_its_expert_on_the_device(folder, device, dtype, tmp_path, monkeypatch):
    """loop.train: validation, checkpoints (torch.save of device tensors and the device generator's state), and
    the best expert read back onto the device."""
    monkeypatch.setattr(svf, "CACHE_DIR", tmp_path / "svd")
    model = load(folder, device, dtype)
    cfg = config.TrainConfig(task="toy", targets="mlp", steps=2, batch_size=2, samples=2, temperature=1.0, lr=0.05,
                         kl_coef=0.1, baseline="none", micro_batch=4, gen_batch=4, eval_every=1, val_limit=0)
    best = loop.train(model, ToyTokenizer(), cfg, tmp_path / "run", log=lambda *a: None, task=ToyTask(),
                    train_set=toy_train_problems(4, 0), val_set=toy_train_problems(2, 1))
    assert all(v.device.type == device for v in best.z.values())
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 2 and all(v.device.type == device for v in state["params"].values())
    last = svf.Expert.load(tmp_path / "run" / "last.safetensors", model)
    assert all(torch.equal(last.z[n], state["params"][n].float()) for n in last.z)
    assert max((v - 1).abs().max().item() for v in last.z.values()) > 1e-3  # it trained


@on_every_device
def test_the_multiple_choice_step_samples_on_the_device(folder, device, dtype):
    model, tok, task = load(folder, device, dtype), CharTokenizer(), ChoiceTask()
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    z = {n: torch.nn.Parameter(v) for n, v in svf.ones(model).items()}
    cfg = config.TrainConfig(task="choice", rollout="options", samples=4, temperature=1.0, baseline="none", lr=0.05)
    opt = torch.optim.AdamW(z.values(), lr=cfg.lr, weight_decay=0.0)
    stats = options.option_step(model, tok, task, toy_problems(3), z, opt, cfg, torch.Generator(device).manual_seed(0))
    assert np.isfinite([stats["pg"], stats["grad_norm"]]).all() and stats["z_dev"] > 1e-3


# ----------------------------------------------------------------------------- LoRA
@on_every_device
def test_lora_on_the_device(folder, device, dtype):
    model = load(folder, device, dtype)
    ref, x = cpu64(folder, model), tokens(device)
    with torch.no_grad():
        base = model(x)
    cfg = lora.LoRAConfig(rank=4, targets="all", dropout=0.1)
    lora.attach(model, cfg)
    with torch.no_grad():
        wrapped = model(x)  # the base layers one by one (not stacked): on a GPU other kernels, so only close
    close(wrapped, base, dtype)
    fresh = lora.init_params(model, seed=0)
    assert all(v.device.type == device for v in fresh.values())
    lora.train_ab(model, fresh)
    with torch.no_grad():
        assert torch.equal(model(x), wrapped)                     # B = 0: exactly the base model
    g = torch.Generator().manual_seed(1)
    params = {n: (v.cpu() + 0.05 * torch.randn(v.shape, generator=g)).to(device)  # a change of W's own size
              for n, v in fresh.items()}
    lora.use_adapter(model, params)
    with torch.no_grad():
        merged = model(x)
    with torch.no_grad():  # the reference merges W + (alpha / r) B A by hand, in float64
        for n in lora.target_names(model, cfg.targets):
            w = ref.get_submodule(n).weight
            w += cfg.scale * params[f"{n}.B"].cpu().double() @ params[f"{n}.A"].cpu().double()
        close(merged, ref(x.cpu()), dtype)
    lora.train_ab(model, params)
    with torch.no_grad():
        close(model(x), merged, dtype)                            # unmerged = merged
    trainable = {n: torch.nn.Parameter(v) for n, v in params.items()}
    run = lambda seed: (lora.train_ab(model, trainable, torch.Generator(device).manual_seed(seed)), model(x))[1]
    a, b, c = run(0), run(0), run(1)                              # dropout masks from the device generator
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 and v.grad.device.type == device
               for v in trainable.values())
    lora.train_ab(model, None)


# ----------------------------------------------------------------------------- the two passes
def plain_label_scores(ref, tok, questions: list[str]) -> torch.Tensor:
    """log p("\\boxed{label}" | the classification prompt), summed over the reply's tokens, for every question
    and label: one unpadded float64 forward pass per (question, label), on the CPU. (questions, labels)"""
    scores = []
    for q in questions:
        p = tok.encode_chat(cls.classify_messages(q))
        row = []
        for r in (tok.encode(f"\\boxed{{{label}}}") for label in cls.LABELS):
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([p + r]))[0, len(p) - 1:-1], -1)
            row.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
        scores.append(torch.stack(row))
    return torch.stack(scores)


@on_every_device
def test_classification_reads_the_likeliest_label_on_the_device(folder, device, dtype):
    model, tok = load(folder, device, dtype), CharTokenizer()
    ref = cpu64(folder, model)
    svf.attach(model, svf.decompose(model, "mlp", cache=False))
    svf.attach(ref, svf.decompose(ref, "mlp", cache=False))
    questions = ["what is 2 + 2?", "write a function that sorts a list", "which gas do plants take in?",
                 "name a prime number"]
    lengths = torch.tensor([len(tok.encode(f"\\boxed{{{label}}}")) for label in cls.LABELS])
    z = random_z(model, 7)
    for expert in (None, z):
        got = adapt.label_logprobs(model, tok, questions, z=expert, batch_size=3)
        svf.use_expert(ref, None if expert is None else {n: v.cpu().double() for n, v in expert.items()})
        scores = plain_label_scores(ref, tok, questions)
        svf.use_expert(ref, None)
        np.testing.assert_allclose(got.numpy(), scores.numpy(), rtol=SUM_RTOL[dtype])
        for reduce, read in (("sum", scores), ("mean", scores / lengths)):  # classify's two readings
            labels = adapt.classify(model, tok, questions, z=expert, batch_size=3, reduce=reduce)
            picked = read[range(len(questions)), [cls.LABELS.index(label) for label in labels]]
            if dtype == "float32":
                assert labels == [cls.LABELS[k] for k in read.argmax(1).tolist()], reduce
            else:  # bfloat16 may swap two labels whose scores are within its rounding
                tol = LOGPROB_TOL[dtype] * (1 if reduce == "mean" else lengths.max().item())
                assert (read.max(1).values - picked).max() < tol, reduce
    assert all(m.merged is None for m in svf.wrappers(model).values())  # back to the base model


@on_every_device
def test_few_shot_search_mixes_experts_on_the_device(folder, device, dtype):
    model, tok, task = load(folder, device, dtype), CharTokenizer(), EchoTask()
    ref = cpu64(folder, model)
    for m in (model, ref):
        svf.attach(m, svf.decompose(m, "mlp", cache=False))
    experts = {"gsm8k": random_z(model, 9), "mbpp": random_z(model, 10)}
    shots = toy_problems(3)
    z, report = adapt.fewshot(model, tok, task, shots, experts, generations=2, population=3)
    alpha = torch.tensor(report["alpha"])
    assert len(report["history"]) == 2 and all(v.device.type == device for v in z.values())
    for n, v in svf.mix(list(experts.values()), alpha.float()).items():
        torch.testing.assert_close(z[n], v)
    # the objective of the best alpha against the same objective on the float64 CPU reference
    got = adapt.fewshot_objective(model, tok, task, shots, list(experts.values()))(alpha)
    cpu_experts = [{n: v.cpu().double() for n, v in e.items()} for e in experts.values()]
    want = adapt.fewshot_objective(ref, tok, task, shots, cpu_experts)(alpha)
    assert got[1] == pytest.approx(want[1], abs=LOGPROB_TOL[dtype])  # mean log-likelihood of the references
    if dtype == "float32":
        assert got[0] == want[0]                                  # accuracy of the greedy answers
