"""One end-to-end test per row of the coverage table, through the public API only.

Each test runs on the layer's device and dtype (fixtures `device`, `dtype`: fp32 on CPU in e2e_cpu, bf16
autocast on CUDA in e2e_gpu) and compares against an independent reference: a float64 copy of the model
on the CPU whose loss is the plain full-logits masked cross-entropy with the WKV reference loop, hand-built
windows, or a fresh process state. Tolerances are stated per dtype below.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.data import ResumableLoader, build_dataset, get_tokenizer
from rwkvslice.errors import ConfigError
from rwkvslice.generate import generate
from rwkvslice.slicing import linear_cross_entropy, sliced_cross_entropy
from rwkvslice.train import LossModule, TrainConfig, resolve_weights_dir, train, train_step
from rwkvslice.train.distributed import DistEnv

# Relative errors against the float64 reference. fp32: the model and the chunked loss agree with fp64
# to ~1e-6; bf16 autocast rounds every matmul input to 8 bits of mantissa (~4e-3 each).
LOSS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
GRAD_RTOL = {torch.float32: 2e-4, torch.bfloat16: 1e-1}
IGNORE = -100


def small_model(vocab_size: int = 97, n_embd: int = 32, n_layer: int = 2, seed: int = 0) -> RWKV7:
    """A small RWKV-7 with every parameter perturbed (the official init zeroes several projections,
    which would hide their gradients)."""
    torch.manual_seed(seed)
    model = RWKV7(RWKV7Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, head_size=16))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def masked_batch(B: int, T: int, V: int, keep: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (B, T) and targets aligned with it (the next token), with a `keep` fraction kept."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T + 1), generator=g)
    idx, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    targets[torch.rand(B, T, generator=g) >= keep] = IGNORE
    targets[0, -1] = tokens[0, -1]  # at least one kept position
    return idx, targets


def reference_loss(model: RWKV7, idx, targets, num_items=None) -> torch.Tensor:
    """Float64 CPU copy, WKV reference loop, full logits, then the textbook masked mean CE."""
    ref = copy.deepcopy(model).to("cpu", torch.float64)
    logits = ref(idx.cpu(), backend="reference")
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.cpu().reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    n = num_items if num_items is not None else int((targets != IGNORE).sum())
    return total / n, ref


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().cpu().double(), ref.detach().cpu().double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def precision_context(device: torch.device, dtype: torch.dtype):
    """How the layer computes: plain fp32, or bf16 autocast with fp32 master weights (as training does)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def saved_for_backward_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd keeps for the backward pass of fn()."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# -------------------------------------------------------------------------------------------------- Dataset


@pytest.mark.component("Dataset")
def test_e2e_data_pipeline(tmp_path):
    """JSONL prompt/response records and a .txt stream become (idx, targets) windows with the loss on the
    right tokens only, and the loader's batches are deterministic and resume exactly."""
    tok = get_tokenizer("byte")
    records = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f" {2 * i}"} for i in range(10)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ctx_len = 24
    ds = build_dataset(str(path), tok, ctx_len)
    assert len(ds) == len(records)
    for i, r in enumerate(records):
        idx, targets = ds[i]
        assert idx.dtype == targets.dtype == torch.int64 and idx.shape == targets.shape == (ctx_len,)
        prompt, response = tok.encode(r["prompt"]), tok.encode(r["response"])
        seq = prompt + response + [tok.eod_id]  # the sample; idx = seq[:-1], targets = seq[1:]
        n = len(seq) - 1
        expected_idx = seq[:-1] + [0] * (ctx_len - n)
        expected_targets = [IGNORE] * (len(prompt) - 1) + response + [tok.eod_id] + [IGNORE] * (ctx_len - n)
        assert idx.tolist() == expected_idx
        assert targets.tolist() == expected_targets
        assert tok.decode([t for t in targets.tolist() if t != IGNORE]) == r["response"]

    text = "first document\nline two\n\nsecond document\n"
    txt = tmp_path / "corpus.txt"
    txt.write_text(text)
    stream = tok.encode("first document\nline two") + [0] + tok.encode("second document") + [0]
    windows = build_dataset(str(txt), tok, 8)
    kept = [t for i in range(len(windows)) for t in windows[i][1].tolist() if t != IGNORE]
    assert kept == stream[1:], "every token after the first is a target exactly once, in order"

    loader = ResumableLoader(ds, batch_size=3, seed=7)
    it = iter(loader)
    first_epoch = [next(it) for _ in range(3)]  # 10 windows, batch 3, drop_last: 3 steps per epoch
    seen = torch.cat([b[0] for b in first_epoch])
    assert len({tuple(r) for r in seen.tolist()}) == 9, "an epoch visits distinct windows"
    state = loader.state_dict()
    after = [next(it) for _ in range(4)]
    resumed = ResumableLoader(ds, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    rit = iter(resumed)
    for (i1, t1), (i2, t2) in zip(after, [next(rit) for _ in range(4)], strict=True):
        assert torch.equal(i1, i2) and torch.equal(t1, t2)
    again = iter(ResumableLoader(ds, batch_size=3, seed=7))
    replay = [next(again) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first_epoch, replay, strict=True)), "same seed, same order"
    other = iter(ResumableLoader(ds, batch_size=3, seed=8))
    assert not torch.equal(torch.cat([next(other)[0] for _ in range(3)]), seen), "the seed changes the order"


# ---------------------------------------------------------------------------------------------- Architecture


@pytest.mark.component("Architecture")
def test_e2e_model_forward_with_physical_slicing(device, dtype):
    """The model's loss equals full-logits masked cross-entropy, yet it never materialises the (B, T, V)
    logits: the largest tensor it creates and the memory it keeps for backward are a fraction of the full
    path's. Inference slicing (positions=) gives exactly the requested rows of the full logits."""
    B, T, V, C = 2, 64, 4096, 32
    model = small_model(vocab_size=V, n_embd=C).to(device)
    idx, targets = masked_batch(B, T, V, keep=0.1)
    idx, targets = idx.to(device), targets.to(device)
    n_kept = int((targets != IGNORE).sum())

    with precision_context(device, dtype):
        sliced_probe = LargestTensor()
        with sliced_probe:
            sliced_saved, loss = saved_for_backward_bytes(lambda: model.loss(idx, targets))
        loss.backward()
        full_probe = LargestTensor()
        with full_probe:

            def full():
                logits = model(idx)
                return F.cross_entropy(
                    logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE
                )

            full_saved, full_loss = saved_for_backward_bytes(full)

    expected, _ = reference_loss(model, idx, targets)
    assert rel(loss, expected) < LOSS_RTOL[dtype]
    assert rel(full_loss, expected) < LOSS_RTOL[dtype]

    logits_elems = B * T * V
    assert full_probe.numel >= logits_elems, "the full path does build (B, T, V) logits"
    bound = max(n_kept * V, V * C, B * T * 4 * C)  # kept rows' logits, the head (grad), the FFN activations
    assert sliced_probe.numel <= bound < logits_elems, (sliced_probe.numel, bound, logits_elems)
    assert sliced_saved < full_saved - logits_elems * 2, (sliced_saved, full_saved)  # >= half the fp32 logits
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with precision_context(device, dtype):
            model.loss(idx, targets).backward()
        sliced_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        with precision_context(device, dtype):
            full().backward()
        full_peak = torch.cuda.max_memory_allocated() - base
        assert sliced_peak < full_peak - logits_elems * 2, (sliced_peak, full_peak)

    with torch.no_grad(), precision_context(device, dtype):
        everything = model(idx)
        positions = torch.tensor([[0, 5, 63], [1, 2, 40]], device=device)
        picked = model(idx, positions=positions)
        last = model(idx, positions="last")
    assert picked.shape == (B, 3, V) and last.shape == (B, 1, V)
    gathered = torch.gather(everything, 1, positions[..., None].expand(-1, -1, V))
    torch.testing.assert_close(picked.float(), gathered.float(), rtol=LOSS_RTOL[dtype], atol=LOSS_RTOL[dtype])
    torch.testing.assert_close(
        last.float(), everything[:, -1:].float(), rtol=LOSS_RTOL[dtype], atol=LOSS_RTOL[dtype]
    )


# ----------------------------------------------------------------------------------------- Loss Computation


def fp64_sliced_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of CE over kept rows, a row at a time in float64 (logsumexp - target logit)."""
    h, weight = h.detach().cpu().double(), weight.detach().cpu().double()
    total = torch.zeros((), dtype=torch.float64)
    for x, t in zip(h.reshape(-1, h.shape[-1]), targets.cpu().reshape(-1), strict=True):
        if t != IGNORE:
            z = weight @ x
            total += torch.logsumexp(z, 0) - z[t]
    return total


@pytest.mark.component("Loss Computation")
def test_e2e_loss_computation(device, dtype):
    """sliced_cross_entropy = sum of CE over kept positions / (num_items or N kept), equal to a float64
    row-by-row reference, for a sparse mask, a full mask, an empty mask and an explicit num_items; the
    chunked and full implementations of linear_cross_entropy agree."""
    B, T, C, V = 3, 20, 48, 500
    g = torch.Generator().manual_seed(3)
    h = torch.randn(B, T, C, generator=g).to(device)
    weight = (torch.randn(V, C, generator=g) * 0.2).to(device)
    targets = torch.randint(0, V, (B, T), generator=g)
    masks = {
        "sparse": torch.rand(B, T, generator=g) < 0.2,
        "full": torch.ones(B, T, dtype=torch.bool),
        "empty": torch.zeros(B, T, dtype=torch.bool),
    }
    for name, keep in masks.items():
        t = torch.where(keep, targets, torch.full_like(targets, IGNORE)).to(device)
        n = int(keep.sum())
        with precision_context(device, dtype):
            loss = sliced_cross_entropy(h, weight, t)
            loss_items = sliced_cross_entropy(h, weight, t, num_items=100)
            chunked = linear_cross_entropy(
                h.reshape(-1, C), weight, t.reshape(-1), impl="chunked", chunk_size=7
            )
            full = linear_cross_entropy(h.reshape(-1, C), weight, t.reshape(-1), impl="full")
        assert loss.dtype == torch.float32, name
        if dtype == torch.bfloat16:  # the reference sees the same bf16-rounded GEMM inputs
            ref_sum = fp64_sliced_ce(h.to(dtype), weight.to(dtype), t)
        else:
            ref_sum = fp64_sliced_ce(h, weight, t)
        if n == 0:
            assert loss.item() == 0.0 and loss_items.item() == 0.0 and chunked.item() == 0.0, name
            continue
        assert rel(loss, ref_sum / n) < LOSS_RTOL[dtype], name
        assert rel(loss_items, ref_sum / 100) < LOSS_RTOL[dtype], name
        assert rel(chunked, ref_sum) < LOSS_RTOL[dtype], name
        assert rel(full, ref_sum) < LOSS_RTOL[dtype], name


# -------------------------------------------------------------------------------------------- Backward Pass


@pytest.mark.component("Backward Pass")
def test_e2e_backward_pass(device, dtype):
    """Every parameter's gradient of model.loss (chunked WKV backward + chunked loss backward) equals the
    gradient of the float64 full-logits reference through the WKV reference loop; parameters of ignored
    positions' logits get nothing, so no gradient leaks from -100 targets."""
    B, T, V = 2, 37, 97  # T not a multiple of the chunk length
    model = small_model(vocab_size=V).to(device)
    idx, targets = masked_batch(B, T, V, keep=0.3, seed=5)
    with precision_context(device, dtype):
        loss = model.loss(idx.to(device), targets.to(device))
    loss.backward()
    expected, ref = reference_loss(model, idx, targets)
    expected.backward()
    assert rel(loss, expected) < LOSS_RTOL[dtype]
    ref_params = dict(ref.named_parameters())
    worst = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.dtype == torch.float32, f"{name}: master gradients stay fp32"
        worst[name] = rel(p.grad, ref_params[name].grad)
    bad = {k: v for k, v in worst.items() if v > GRAD_RTOL[dtype]}
    assert not bad, f"gradients off the fp64 reference (rtol {GRAD_RTOL[dtype]}): {bad}"
    # head rows of tokens that are never a kept target still get the softmax gradient; embedding rows of
    # tokens that never occur in idx get exactly zero
    unused = sorted(set(range(V)) - set(idx.reshape(-1).tolist()))
    assert unused and model.emb.weight.grad[unused].abs().max().item() == 0.0


# -------------------------------------------------------------------------------------------- Training Loop


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradient each parameter had when step() ran."""

    def __init__(self, params):
        super().__init__(params, lr=1e-3)
        self.seen: dict[int, torch.Tensor] = {}

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.seen[id(p)] = p.grad.detach().clone()
        return super().step(closure)


def step_grads(model, micro, device, precision):
    """Run train_step and return its stats and the gradients the optimizer applied."""
    optimizer = RecordingSGD(model.parameters())
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    stats = train_step(LossModule(model), optimizer, micro, env, precision=precision, grad_clip=0.0)
    missing = [n for n, p in model.named_parameters() if id(p) not in optimizer.seen]
    assert not missing, f"the optimizer step saw no gradient for {missing}"
    return stats, {n: optimizer.seen[id(p)] for n, p in model.named_parameters()}


@pytest.mark.component("Training Loop")
def test_e2e_training_step(device, dtype):
    """One optimizer step over two gradient-accumulation micro-batches with different numbers of kept
    tokens applies exactly the gradient of the mean CE over all kept tokens of both (one big batch), and
    reports that loss and the token counts."""
    V = 97
    model = small_model(vocab_size=V).to(device)
    idx1, t1 = masked_batch(2, 24, V, keep=0.8, seed=11)
    idx2, t2 = masked_batch(2, 24, V, keep=0.1, seed=12)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    reference_model = copy.deepcopy(model)
    stats, grads = step_grads(model, [(idx1, t1), (idx2, t2)], device, precision)

    kept = int((t1 != IGNORE).sum() + (t2 != IGNORE).sum())
    expected, ref = reference_loss(reference_model, torch.cat([idx1, idx2]), torch.cat([t1, t2]))
    expected.backward()
    assert stats.kept_tokens == kept and stats.tokens == 2 * 2 * 24
    assert stats.applied and stats.nonfinite is None
    assert abs(stats.loss - expected.item()) / expected.item() < LOSS_RTOL[dtype]
    ref_params = dict(ref.named_parameters())
    bad = {
        n: rel(g, ref_params[n].grad)
        for n, g in grads.items()
        if rel(g, ref_params[n].grad) > GRAD_RTOL[dtype]
    }
    assert not bad, f"applied update != gradient of the global mean loss: {bad}"
    assert all(p.grad is None or not p.grad.any() for p in model.parameters()), "gradients are zeroed"


# ------------------------------------------------------------------------------------------------ BFloat16


@pytest.mark.component("BFloat16")
def test_e2e_bf16_training_without_grad_scaler(device, monkeypatch, tmp_path):
    """precision="bf16" trains under torch.autocast(bfloat16) on the layer's device (CPU autocast in
    e2e_cpu) with fp32 master weights and no GradScaler: the linear layers compute in bf16, the applied
    update matches the fp64 gradient to bf16 accuracy (nothing underflows without loss scaling), and fp16
    is refused."""

    def no_scaler(*args, **kwargs):
        raise AssertionError("a GradScaler was created for bf16 training")

    for owner in (torch.amp, getattr(torch.cuda, "amp", None), getattr(torch.cpu, "amp", None)):
        if owner is not None and hasattr(owner, "GradScaler"):
            monkeypatch.setattr(owner, "GradScaler", no_scaler)

    V = 97
    model = small_model(vocab_size=V).to(device)
    reference_model = copy.deepcopy(model)
    linear_dtypes = set()
    hooks = [
        m.register_forward_hook(lambda m, i, o: linear_dtypes.add(o.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    idx, targets = masked_batch(4, 32, V, keep=0.25, seed=21)
    stats, grads = step_grads(model, [(idx, targets)], device, "bf16")
    for h in hooks:
        h.remove()

    assert linear_dtypes == {torch.bfloat16}, f"linear layers ran in {linear_dtypes}, not bf16 autocast"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"
    expected, ref = reference_loss(reference_model, idx, targets)
    expected.backward()
    assert stats.applied and math.isfinite(stats.loss)
    assert abs(stats.loss - expected.item()) / expected.item() < LOSS_RTOL[torch.bfloat16]
    ref_params = dict(ref.named_parameters())
    errors = {n: rel(g, ref_params[n].grad) for n, g in grads.items()}
    bad = {n: e for n, e in errors.items() if e > GRAD_RTOL[torch.bfloat16]}
    assert not bad, f"bf16 gradients off the fp64 reference: {bad}"

    with pytest.raises(ConfigError, match="fp16"):
        train(TrainConfig(out=str(tmp_path / "fp16"), data=str(tmp_path / "unused.txt"), precision="fp16"))


# ------------------------------------------------------------------------------------------------ Generation


@pytest.mark.component("Generation")
def test_e2e_full_training_and_inference(device, dtype, tmp_path):
    """train() on a small prompt/response file learns it: the loss falls, the checkpoint reloads to the
    same logits, and greedy RNN-mode generation from the reloaded model answers every training prompt
    with its response."""
    pairs = {"red?": " apple", "sky?": " blue", "cat?": " meow", "one?": " two"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs.items()) * 2)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"n_embd": 32, "n_layer": 2, "head_size": 16}))
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        data=str(data),
        tokenizer="byte",
        model=str(config),
        steps=40,
        ctx_len=16,
        batch_size=8,
        lr=2e-2,
        min_lr=2e-3,
        warmup_steps=5,
        weight_decay=0.0,
        seed=0,
        device=device.type,
        precision="bf16" if dtype == torch.bfloat16 else "fp32",
        progress=False,
        save_every=0,
    )
    result = train(cfg, log=lambda msg: None)
    assert result.step == 40 and result.checkpoint is not None
    assert sum(result.losses[-5:]) / 5 < 0.05 * sum(result.losses[:5]) / 5, result.losses[::5]

    tok = get_tokenizer("byte")
    reloaded = RWKV7.from_pretrained(resolve_weights_dir(result.checkpoint)).to(device)
    probe = torch.tensor([tok.encode("red? apple")], device=device)
    exact = 0.0 if device.type == "cpu" else 1e-5  # GPU kernels may pick another algorithm per call
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe), result.model.eval()(probe), rtol=exact, atol=exact)
    prompts = list(pairs)
    outs = generate(
        reloaded, [tok.encode(p) for p in prompts], max_new_tokens=8, temperature=0.0, eod_id=tok.eod_id
    )
    assert {p: tok.decode(o) for p, o in zip(prompts, outs, strict=True)} == pairs


# ---------------------------------------------------------------------------------------------------- PEFT


@pytest.mark.component("PEFT")
def test_e2e_peft_lora_and_state_tuning(device, dtype):
    """LoRA and state tuning through the public API (rwkvslice.peft) on the layer's device and dtype:
    LoRA at init is the base model bit for bit; the adapters' and the initial state's gradients through
    model.loss equal the float64 full-logits reference's; frozen weights get none; after a step the merged
    model equals the unmerged one (fp32 logits)."""
    from rwkvslice.peft import TuneSpec, lora_modules, merge_lora, prepare

    V = 97
    idx, targets = masked_batch(2, 29, V, keep=0.5, seed=21)
    for kind in ("lora", "state"):
        base = small_model(vocab_size=V).to(device)
        model = copy.deepcopy(base)
        prepare(model, TuneSpec(kind=kind, lora_r=4, lora_alpha=8))
        with torch.no_grad():
            assert torch.equal(model(idx.to(device)), base(idx.to(device)))
            for m in lora_modules(model).values():  # B != 0 so that A gets a gradient too
                m.lora_B.add_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(2)).to(device) * 0.05)
            if kind == "state":
                model.initial_state.normal_(0, 0.3)
        with precision_context(device, dtype):
            loss = model.loss(idx.to(device), targets.to(device))
        loss.backward()
        expected, ref = reference_loss(model, idx, targets)
        expected.backward()
        assert rel(loss, expected) < LOSS_RTOL[dtype]
        ref_params = dict(ref.named_parameters())
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained == ["initial_state"] if kind == "state" else all("lora_" in n for n in trained)
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert rel(p.grad, ref_params[n].grad) < GRAD_RTOL[dtype], n
            else:
                assert p.grad is None, n
        if kind == "lora":
            with torch.no_grad():
                unmerged = model(idx.to(device)).float()
                assert rel(merge_lora(model)(idx.to(device)).float(), unmerged) < 1e-6
