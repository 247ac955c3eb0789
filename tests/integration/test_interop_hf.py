"""Interop with the Hugging Face layout through rwkv7-hf 0.9.0 (transformers, CPU), the independent HF
reference, and the official `rwkv` package for the converter direction.

Random checkpoints come from the documented official key table (test_interop_official.official_state_dict),
>= 2 layers, two LoRA-rank sets, with and without block-0 v0/v1/v2:
- official .pth -> ours -> `save_hf` -> rwkv7-hf: full logits, and token by token through its cache;
- official .pth -> rwkv7-hf's own converter -> `from_hf` / `train --init-from` -> the `rwkv` package's logits;
- ours -> HF -> ours bit for bit; a bf16 file;
- the World tokenizer files: AutoTokenizer / AutoModelForCausalLM with trust_remote_code (what
  lm-evaluation-harness calls) encode like our WorldTokenizer and give our logits;
- the collision: a directory `save_pretrained` writes is refused by rwkv7-hf, never read as a random model;
- the CLI: fine-tune an HF directory and export the run back to HF; bad input exits 2 with one line.

Tolerance: RMS-relative error < 1e-5, fp32 on both sides (as in test_interop_official; rwkv7-hf computes
the decay as exp(-e^-0.5 * sigmoid(z)) like the `rwkv` package; measured ~5e-7).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_interop_official import official_state_dict, rms_rel

from rwkvslice import RWKV7

pytestmark = [pytest.mark.interop, pytest.mark.hf, pytest.mark.component("HF Interop")]

TOL = 1e-5

CASES = [
    # (V, C, L, N, (d_decay, d_aaa, d_mv, d_gate), layer-0 v0/v1/v2 in the source)
    pytest.param(320, 128, 2, 64, (32, 32, 32, 64), True, id="ranks-a-with-v0"),
    pytest.param(257, 128, 3, 64, (64, 48, 16, 96), False, id="ranks-b-no-v0"),
]


@pytest.fixture(scope="module")
def rwkv7_hf(tmp_path_factory):
    # trust_remote_code copies the entry module into HF_MODULES_CACHE: keep it out of the home directory
    os.environ.setdefault("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("rwkv7_hf", reason="rwkv7-hf is not installed (the integration session has it)")


@pytest.fixture(scope="module")
def RWKV():
    os.environ["RWKV_V7_ON"] = "1"  # must be set before rwkv.model is imported
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    return pytest.importorskip("rwkv.model", reason="the official `rwkv` package is not installed").RWKV


def _hf_logits_stepwise(hf_model, tokens):
    """rwkv7-hf one token at a time through its recurrent cache."""
    cache, outs = None, []
    for t in tokens:
        out = hf_model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        outs.append(out.logits[0, -1])
    return torch.stack(outs)


@pytest.mark.parametrize("V,C,L,N,ranks,layer0_v", CASES)
def test_ours_to_hf_runs_the_same_in_rwkv7_hf(rwkv7_hf, tmp_path, V, C, L, N, ranks, layer0_v):
    torch.save(official_state_dict(V, C, L, N, ranks, layer0_v=layer0_v), tmp_path / "official.pth")
    ours = RWKV7.from_official(tmp_path / "official.pth")
    ours.save_hf(tmp_path / "hf")
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert theirs.config.num_hidden_layers == L and theirs.config.v_low_rank_dim == ranks[2]

    tokens = torch.randint(0, V, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = ours(torch.tensor([tokens]), backend="reference")[0]
        assert rms_rel(theirs(torch.tensor([tokens])).logits[0], ref) < TOL
        stepwise = _hf_logits_stepwise(theirs, tokens)
        state = ours.init_state(1)
        for i, t in enumerate(tokens):
            out, state = ours.step(torch.tensor([t]), state)
            assert rms_rel(stepwise[i], out[0]) < TOL, i

    again = RWKV7.from_hf(tmp_path / "hf")  # ours -> HF -> ours, bit for bit
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("V,C,L,N,ranks,layer0_v", [
    *CASES,
    # head size 32: rwkv7-hf would run it with another GroupNorm eps, but its converter writes the
    # official weights unchanged, so ours (official eps) must still give the official logits
    pytest.param(256, 128, 2, 32, (32, 32, 32, 64), True, id="head-32"),
])
def test_rwkv7_hf_converter_output_gives_the_official_logits(rwkv7_hf, RWKV, tmp_path, V, C, L, N, ranks,
                                                              layer0_v):
    from rwkv7_hf.converter import main as convert  # what `rwkv7-hf convert` runs

    torch.save(official_state_dict(V, C, L, N, ranks, layer0_v=layer0_v, seed=2), tmp_path / "official.pth")
    assert convert(["--input", str(tmp_path / "official.pth"), "--output", str(tmp_path / "conv"),
                    "--precision", "fp32"]) == 0
    ref = RWKV(str(tmp_path / "official"), strategy="cpu fp32")
    if N == 64:
        ours = RWKV7.from_hf(tmp_path / "conv")
    else:
        with pytest.warns(UserWarning, match="head_dim 32"):
            ours = RWKV7.from_hf(tmp_path / "conv")
    assert (ours.config.n_layer, ours.config.head_size, ours.config.lora_ranks) == (L, N, ranks)
    tokens = torch.randint(0, V, (31,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref_logits, _ = ref.forward(tokens, None, full_output=True)
        assert rms_rel(ours(torch.tensor([tokens]))[0], ref_logits) < TOL
    # the same weights as loading the official file directly
    direct = RWKV7.from_official(tmp_path / "official.pth")
    for k, v in direct.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_bf16_export_loads_in_rwkv7_hf(rwkv7_hf, tmp_path):
    torch.save(official_state_dict(320, 128, 2, 64, (32, 32, 32, 64), layer0_v=False, seed=4), tmp_path / "o.pth")
    RWKV7.from_official(tmp_path / "o.pth").save_hf(tmp_path / "bf16", dtype=torch.bfloat16)
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ours = RWKV7.from_hf(tmp_path / "bf16")  # the same bf16-rounded weights, run in fp32 on both sides
    tokens = torch.arange(1, 40).view(1, -1)
    with torch.no_grad():
        assert rms_rel(theirs(tokens).logits, ours(tokens)) < TOL


def test_world_tokenizer_and_auto_classes(rwkv7_hf, tmp_path):
    """What lm-evaluation-harness's HF loader calls: AutoConfig, AutoModelForCausalLM and AutoTokenizer
    with trust_remote_code=True on the exported directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rwkvslice.data import get_tokenizer

    torch.save(official_state_dict(65536, 64, 2, 64, (32, 32, 32, 64), layer0_v=False, seed=5), tmp_path / "o.pth")
    ours = RWKV7.from_official(tmp_path / "o.pth")
    ours.save_hf(tmp_path / "world", tokenizer="world")
    import hashlib

    from rwkvslice.data.tokenizers import WORLD_VOCAB_SHA256

    vocab = (tmp_path / "world" / "rwkv_vocab_v20230424.txt").read_bytes()
    assert hashlib.sha256(vocab).hexdigest() == WORLD_VOCAB_SHA256  # the published World vocab, LF line ends
    assert AutoConfig.from_pretrained(tmp_path / "world", trust_remote_code=True).hidden_size == 64
    tok = AutoTokenizer.from_pretrained(tmp_path / "world", trust_remote_code=True)
    world = get_tokenizer("world")
    text = "User: What is 2+2?\n\nAssistant: 4 — 你好, naïve café 🙂\n"
    ids = tok(text)["input_ids"]
    assert ids == world.encode(text)
    assert tok.decode(ids) == text and tok.eos_token_id == 0 and tok.pad_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "world", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        assert rms_rel(model(torch.tensor([ids])).logits, ours(torch.tensor([ids]))) < TOL


@pytest.mark.parametrize("head_size", [64, 32])
def test_save_pretrained_directory_is_refused_by_hf_loaders(rwkv7_hf, tmp_path, head_size):
    """The collision: a directory of ours must never load in rwkv7-hf as a default-shaped random model."""
    from transformers import AutoModelForCausalLM

    from rwkvslice import RWKV7Config

    RWKV7(RWKV7Config(vocab_size=320, n_embd=128, n_layer=2, head_size=head_size)).save_pretrained(tmp_path / "d")
    # rwkv7-hf's class takes a missing config.json for its default config; the weights file it requires is not there
    with pytest.raises(OSError, match="no file named model.safetensors"):
        rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="Unrecognized model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "d", trust_remote_code=True)


# -------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(capsys):
    """`rwkvslice ARGS` through the CLI's main() in this process: (exit status, stdout, stderr). The CLI as a
    real process is test_cli.py's; here a fresh interpreter would only add ~20 s of imports under coverage."""
    from rwkvslice.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_fine_tune_an_hf_directory_and_export_it_back(rwkv7_hf, tmp_path, cli):
    """README's flow: train --init-from an HF directory (rwkv7-hf's converter output), export --hf."""
    from rwkv7_hf.converter import main as convert

    from rwkvslice.generate.loading import load_model

    torch.save(official_state_dict(320, 128, 2, 64, (32, 32, 32, 64), layer0_v=True, seed=6), tmp_path / "o.pth")
    convert(["--input", str(tmp_path / "o.pth"), "--output", str(tmp_path / "base"), "--precision", "fp32"])
    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog\n\n" * 40)
    # bad input alongside (one line, exit 2): a directory that is neither format, a head size HF cannot run
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "model.safetensors").write_bytes(b"")
    from rwkvslice import RWKV7Config

    RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32)).save_pretrained(tmp_path / "h32")
    bad = {
        "neither": cli("train", "--init-from", tmp_path / "neither", "--data", tmp_path / "data.txt",
                       "--out", tmp_path / "r2", "--steps", 1),
        "h32": cli("export", "--ckpt", tmp_path / "h32", "--hf", tmp_path / "h32-hf"),
    }
    rc, _, err = cli("train", "--init-from", tmp_path / "base", "--data", tmp_path / "data.txt",
                     "--out", tmp_path / "run", "--steps", 2, "--ctx-len", 16, "--batch-size", 2)
    assert rc == 0, err[-3000:]
    rc, out, err = cli("export", "--ckpt", tmp_path / "run", "--hf", tmp_path / "out")
    assert rc == 0, err[-3000:]
    assert "wrote" in out
    expect = {"neither": "no config.json (Hugging Face layout) or rwkvslice_config.json (rwkvslice)",
              "h32": "head_size 32 has no exact HF config"}
    for name, (rc, _, err) in bad.items():
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and expect[name] in lines[0] and "Traceback" not in err, (name, err)
    assert not (tmp_path / "r2").exists() or not list((tmp_path / "r2").rglob("model.safetensors"))
    assert not (tmp_path / "h32-hf").exists()

    trained, _, _, _ = load_model(tmp_path / "run")
    base = RWKV7.from_hf(tmp_path / "base")
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed  # it trained from the base (same shapes), and moved
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.arange(1, 33).view(1, -1)
    with torch.no_grad():
        assert rms_rel(theirs(tokens).logits, trained(tokens)) < TOL


def test_bad_hf_directory_for_init_from_exits_2(tmp_path, cli):
    """A config.json with a contradictory field: one line naming the file and the field, no run output."""
    cfg = {"model_type": "rwkv7", "vocab_size": 320, "hidden_size": 128, "num_hidden_layers": 2, "head_dim": 64,
           "num_heads": 4, "decay_low_rank_dim": 32, "a_low_rank_dim": 32, "v_low_rank_dim": 32,
           "gate_low_rank_dim": 64}
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "data.txt").write_text("hello world, and more words to fill windows\n\n" * 60)
    rc, _, err = cli("train", "--init-from", tmp_path / "base", "--data", tmp_path / "data.txt",
                     "--out", tmp_path / "run", "--steps", 1)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(tmp_path / "base" / "config.json") in lines[0] and "'num_heads' (4)" in lines[0], lines
    assert not list(tmp_path.glob("run/checkpoints/step-*"))


def test_a_lora_run_on_an_hf_base_exports_to_hf_with_the_adapters_merged(rwkv7_hf, tmp_path, capsys):
    """--tune lora with an HF directory as --init-from (its identity: sha256 over the directory's files),
    then `export --hf`: rwkv7-hf runs the merged export with the logits of our *unmerged* tuned model
    (base + trained adapters as LoRALinear, built here from the checkpoint's tensors, not through merge)."""
    from rwkv7_hf.converter import main as convert

    from rwkvslice.cli import main as cli_main
    from rwkvslice.model.hf import load_base
    from rwkvslice.peft.tuning import load_trainable, prepare, read_tuned
    from rwkvslice.train.checkpoint import latest_checkpoint

    torch.save(official_state_dict(320, 128, 2, 64, (32, 32, 32, 64), layer0_v=True, seed=8), tmp_path / "o.pth")
    convert(["--input", str(tmp_path / "o.pth"), "--output", str(tmp_path / "base"), "--precision", "fp32"])
    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog\n\n" * 40)
    assert cli_main(["train", "--init-from", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"),
                     "--out", str(tmp_path / "run"), "--steps", "3", "--ctx-len", "16", "--batch-size", "2",
                     "--tune", "lora", "--lora-r", "4", "--lr", "1e-2", "--no-progress"]) == 0
    assert cli_main(["export", "--ckpt", str(tmp_path / "run"), "--hf", str(tmp_path / "out")]) == 0
    capsys.readouterr()

    spec, _, tensors, factors = read_tuned(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    unmerged = load_base(tmp_path / "base", RWKV7)
    prepare(unmerged, spec, pissa_factors=factors or None)
    load_trainable(unmerged, tensors, "run")
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in tensors.items())  # adapters moved
    theirs = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    base = rwkv7_hf.RWKV7ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    tokens = torch.arange(1, 33).view(1, -1)
    with torch.no_grad():
        ours = unmerged(tokens)
        assert rms_rel(theirs(tokens).logits, ours) < TOL
        assert rms_rel(base(tokens).logits, ours) > 100 * TOL  # the adapters changed the model visibly
