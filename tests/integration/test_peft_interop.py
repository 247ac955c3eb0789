"""Tuned runs in other tools: the official `rwkv` package and Hugging Face `peft`.

- A `--tune state` run exported with `rwkvslice export --state` and loaded as the WKV entries
  (state[3i+1]) of the `rwkv` package's state reproduces rwkvslice's tuned logits; the transposed state
  does not (so the direction is proven, not assumed).
- A `--tune lora` run exported with `--official` (merged) loads in the `rwkv` package and matches the
  unmerged tuned model.
- `save_hf_adapter` files load with `peft.PeftModel.from_pretrained` on the base model (LoRA and PiSSA).

Tolerance: RMS-relative < 1e-5 against the `rwkv` package (fp32; its decay constant differs by ~1e-7
relative, see test_interop_official.py); < 1e-6 against peft (same model code, fp32).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cli import main as cli_main
from rwkvslice.data import DemoTask
from rwkvslice.generate.loading import load_model
from rwkvslice.peft import TuneSpec, lora_modules, prepare, save_hf_adapter
from rwkvslice.peft.tuning import load_trainable, read_tuned
from rwkvslice.train.checkpoint import latest_checkpoint
from rwkvslice.train.trainer import TrainConfig, train

pytestmark = [pytest.mark.interop, pytest.mark.component("PEFT")]

TOL = 1e-5
TOKENS = [0, 5, 17, 200, 33, 101, 7, 64, 250, 3, 99, 12]


def rms_rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@pytest.fixture(scope="module")
def RWKV():
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    return pytest.importorskip("rwkv.model", reason="the official `rwkv` package is not installed").RWKV


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An official .pth whose every weight matters (random perturbation of the official init)."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=320, n_embd=128, n_layer=2, head_size=64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_official(d / "base.pth")
    data = DemoTask(seed=3).write_jsonl(d / "train.jsonl", 32, "train")
    return d / "base.pth", data


def tuned_run(tmp_path, base, **kw):
    pth, data = base
    cfg = TrainConfig(out=str(tmp_path / "run"), data=str(data), init_from=str(pth), ctx_len=32, batch_size=4,
                      steps=3, warmup_steps=0, progress=False, device="cpu", **kw)
    train(cfg, log=lambda m: None)
    return tmp_path / "run"


def test_exported_state_is_the_rwkv_packages_wkv_state(tmp_path, base, RWKV):
    run = tuned_run(tmp_path, base, tune="state", lr=1.0)
    assert cli_main(["export", "--ckpt", str(run), "--state", str(tmp_path / "state.pth")]) == 0
    model, _, _, _ = load_model(run)
    assert model.initial_state is not None and model.initial_state.abs().max() > 0.1  # it trained
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS]))[0]

    sd = torch.load(tmp_path / "state.pth", weights_only=True)
    official = RWKV(str(base[0])[: -len(".pth")], "cpu fp32")
    C = model.config.n_embd

    def package_logits(transpose):
        state = []
        for i in range(model.config.n_layer):
            s = sd[f"blocks.{i}.att.time_state"]
            state += [torch.zeros(C), (s.transpose(1, 2) if transpose else s).clone(), torch.zeros(C)]
        logits, _ = official.forward(TOKENS, state, full_output=True)
        return logits.float()

    assert rms_rel(package_logits(False), ours) < TOL
    assert rms_rel(package_logits(True), ours) > 100 * TOL  # the other direction is measurably wrong
    # without the state the package gives the base model, not ours
    base_logits, _ = official.forward(TOKENS, None, full_output=True)
    assert rms_rel(base_logits.float(), ours) > 100 * TOL


def test_merged_lora_pth_loads_in_the_rwkv_package_and_matches_the_unmerged_model(tmp_path, base, RWKV):
    run = tuned_run(tmp_path, base, tune="lora", lora_r=4, lr=2e-2)
    assert cli_main(["export", "--ckpt", str(run), "--official", str(tmp_path / "merged.pth")]) == 0
    spec, _, tensors, factors = read_tuned(latest_checkpoint(run / "checkpoints"))
    unmerged = RWKV7.from_official(base[0])
    prepare(unmerged, spec, pissa_factors=factors or None)
    load_trainable(unmerged, tensors, "ckpt")
    assert lora_modules(unmerged)
    with torch.no_grad():
        ours = unmerged(torch.tensor([TOKENS]))[0]
        plain = RWKV7.from_official(base[0])(torch.tensor([TOKENS]))[0]
    assert rms_rel(ours, plain) > 100 * TOL  # the adapters trained
    official = RWKV(str(tmp_path / "merged"), "cpu fp32")
    logits, _ = official.forward(TOKENS, None, full_output=True)
    assert rms_rel(logits.float(), ours) < TOL


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_hf_adapter_files_load_in_peft(tmp_path, base, init):
    peft = pytest.importorskip("peft", reason="Hugging Face peft is not installed")
    model = RWKV7.from_official(base[0])
    prepare(model, TuneSpec(kind="lora", lora_r=4, lora_alpha=8, lora_init=init))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
            m.lora_A.add_(torch.randn(m.lora_A.shape, generator=g) * 0.05)
    save_hf_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base[0]))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(RWKV7.from_official(base[0]), str(tmp_path / "adapter"))
    idx = torch.tensor([TOKENS])
    with torch.no_grad():
        want = model(idx)
        got = loaded(idx)
        assert rms_rel(want, copy.deepcopy(RWKV7.from_official(base[0]))(idx)) > 100 * TOL
    assert rms_rel(got, want) < 1e-6
