"""`rwkvslice train --tune lora|state`, `export --state`, `generate --state` through the CLI entry point
(in-process `rwkvslice.cli.main`, so the exit status is the one a shell sees): bad input is one line,
exit status 2, and nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cli import main as cli_main
from rwkvslice.data import DemoTask

pytestmark = pytest.mark.component("PEFT")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=320, n_embd=64, n_layer=2, head_size=32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_official(d / "base.pth")
    data = DemoTask(seed=3).write_jsonl(d / "train.jsonl", 32, "train")
    return d / "base.pth", data


def train_args(base, out, *extra):
    return ["train", "--data", str(base[1]), "--init-from", str(base[0]), "--out", str(out), "--ctx-len", "32",
            "--batch-size", "4", "--steps", "2", "--no-progress", "--device", "cpu", *extra]


def one_line_error(capsys, argv, match):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rwkvslice: error: "), err
    assert match in err, err


@pytest.mark.parametrize("extra, match", [
    (["--tune", "lora", "--lora-targets", "att.key,att.gate"],
     "unknown module 'att.gate'; RWKV-7 blocks have att.receptance,att.key,att.value,att.output,ffn.key,ffn.value"),
    (["--tune", "lora", "--lora-r", "0"], "--lora-r must be >= 1, got 0"),
    (["--tune", "lora", "--lora-r", "65"], "--lora-r 65 is larger than att.receptance allows (64 x 64: at most 64)"),
    (["--tune", "state", "--train-also", "ln"], "--tune state trains only the initial state; drop --train-also"),
    (["--tune", "lora", "--train-also", "bias"], "--train-also: unknown part 'bias'"),
    (["--lora-r", "8"], "--lora-r needs --tune lora (got --tune full)"),
])
def test_bad_tuning_arguments(tmp_path, base, capsys, extra, match):
    one_line_error(capsys, train_args(base, tmp_path / "run", *extra), match)
    assert not (tmp_path / "run").exists()


def test_resume_against_another_base_is_refused(tmp_path, base, capsys):
    pth = tmp_path / "base.pth"
    pth.write_bytes(base[0].read_bytes())
    out = tmp_path / "run"
    assert cli_main(train_args((pth, base[1]), out, "--tune", "lora")) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    metrics = (out / "metrics.jsonl").read_text()
    other = RWKV7.from_official(pth)  # same path, other weights
    with torch.no_grad():
        other.emb.weight.add_(0.01)
    other.save_official(pth)
    one_line_error(capsys, train_args((pth, base[1]), out, "--tune", "lora", "--steps", "4", "--resume"),
                   "was tuned on base")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "metrics.jsonl").read_text() == metrics
    # and the checkpoint's loader refuses the changed base too
    one_line_error(capsys, ["export", "--ckpt", str(out), "--official", str(tmp_path / "m.pth")],
                   "has changed since training")
    assert not (tmp_path / "m.pth").exists()


def test_state_run_default_lr_export_and_generate_with_state_files(tmp_path, base, capsys):
    out = tmp_path / "run"
    assert cli_main(train_args(base, out, "--tune", "state", "--steps", "3")) == 0
    args = json.loads((out / "checkpoints" / "step-00000003" / "run.json").read_text())["args"]
    assert args["tune"] == "state" and args["lr"] == 1.0 and args["min_lr"] == 0.01
    ckpt = out / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "peft.json",
                                                      "peft.safetensors", "run.json",
                                                      "rwkvslice_config.json", "trainer_state.pt"]
    assert cli_main(["export", "--ckpt", str(out), "--state", str(tmp_path / "s.pth")]) == 0
    capsys.readouterr()

    def gen(*extra):
        assert cli_main(["generate", "--ckpt", str(out), "--prompt", "k", "--temperature", "0",
                         "--max-new-tokens", "12", *extra]) == 0
        return capsys.readouterr().out

    tuned = gen()
    assert gen("--state", str(tmp_path / "s.pth")) == tuned  # the exported state is the run's own
    zeros = {k: torch.zeros_like(v) for k, v in torch.load(tmp_path / "s.pth", weights_only=True).items()}
    torch.save(zeros, tmp_path / "zeros.pth")
    assert gen("--state", str(tmp_path / "zeros.pth"))  # any state file of the right shape runs
    from rwkvslice.generate.loading import load_model
    from rwkvslice.peft import set_initial_state

    model = load_model(out)[0]  # ... and the tuned state matters (greedy text may not show it)
    idx = torch.tensor([[0, 107, 58, 33]])
    with torch.no_grad():
        tuned_logits = model(idx)
        set_initial_state(model, None)
        assert (model(idx) - tuned_logits).abs().max() > 1e-3

    torch.save({"blocks.0.att.time_state": zeros["blocks.0.att.time_state"]}, tmp_path / "one.pth")
    one_line_error(capsys, ["generate", "--ckpt", str(out), "--prompt", "k", "--state", str(tmp_path / "one.pth")],
                   "has 1 layer state(s)")
    torch.save({k: v[:, :8] for k, v in zeros.items()}, tmp_path / "shape.pth")
    one_line_error(capsys, ["generate", "--ckpt", str(out), "--prompt", "k", "--state", str(tmp_path / "shape.pth")],
                   "has shape (2, 8, 32), the model needs (2, 32, 32)")
    one_line_error(capsys, ["export", "--ckpt", str(out)], "nothing to export")
    one_line_error(capsys, ["export", "--ckpt", str(out), "--state", str(tmp_path / "no" / "s.pth")],
                   "does not exist")


def test_lora_run_trains_only_adapters_and_its_checkpoint_is_small(tmp_path, base):
    out = tmp_path / "run"
    assert cli_main(train_args(base, out, "--tune", "lora", "--lora-r", "4", "--train-also", "ln")) == 0
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-00000002" / "peft.safetensors"))
    assert saved and all(".lora_" in k or ".ln" in k or k.startswith("ln_out") for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(v.numel() for v in
                                                             torch.load(base[0], weights_only=True).values())
    opt = torch.load(out / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(saved)  # AdamW moments for the trainable tensors only
