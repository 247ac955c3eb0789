"""The command line in-process (tests/integration/test_cli.py runs the real commands): error handling of
`main`, subcommand discovery, streamed generation and eval's argument checks. One subprocess, to see a
fresh sys.modules: argument errors and `data prepare` never import torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import rwkvslice.cli as cli
from rwkvslice import RWKV7, RWKV7Config
from rwkvslice.cli import build_parser, main
from rwkvslice.cli.generate import StreamDecoder
from rwkvslice.data import ByteTokenizer
from rwkvslice.errors import DataError
from rwkvslice.generate import generate

pytestmark = pytest.mark.component("CLI")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A randomly initialised byte-vocab model saved with save_pretrained (no run.json)."""
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=ByteTokenizer.vocab_size, n_embd=32, n_layer=1, head_size=16))
    path = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvslice: error: ") and "Traceback" not in err[0], err
    return err[0]


# ------------------------------------------------------------------------------------------------ main


def test_library_errors_exit_2_with_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import rwkvslice.cli.eval as eval_cmd

    def user_error(args):
        raise DataError(f"{args.ckpt}:3: broken line")

    monkeypatch.setattr(eval_cmd, "run", user_error)
    assert main(["eval", "--ckpt", "data.jsonl"]) == 2
    assert _one_error_line(capsys) == "rwkvslice: error: data.jsonl:3: broken line"

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(eval_cmd, "run", bug)
    with pytest.raises(ZeroDivisionError):  # not swallowed into an exit status
        main(["eval", "--ckpt", "x"])


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    import rwkvslice.cli.eval as eval_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "run", interrupted)
    assert main(["eval", "--ckpt", "x"]) == 130
    assert capsys.readouterr().err == "rwkvslice: interrupted\n"


def test_a_subcommand_module_not_written_yet_is_left_out(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "rwkvslice.cli.ghost")
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["ghost"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rwkvslice: error: argument COMMAND: invalid choice: 'ghost'")
    assert parser.parse_args(["eval", "--ckpt", "x"]).command == "eval"  # the others still work


def test_a_missing_dependency_of_a_subcommand_is_not_hidden(monkeypatch):
    real_import = cli.importlib.import_module

    def import_module(name):
        if name == "rwkvslice.cli.export":
            raise ModuleNotFoundError("No module named 'safetensors'", name="safetensors")
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="safetensors"):
        build_parser()


# -------------------------------------------------------------------------------------------- generate


def test_stream_decoder_holds_back_incomplete_utf8():
    tok = ByteTokenizer()
    text = "hé😀!"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in tok.encode(text)]
    # h, then é's 2 bytes (first held), then the emoji's 4 bytes (first three held), then "!"
    assert pieces == ["h", "", "é", "", "", "", "😀", "!"]
    assert decoder.flush() == ""


def test_stream_decoder_flushes_a_trailing_invalid_byte():
    tok = ByteTokenizer()
    decoder = StreamDecoder(tok)
    assert decoder.push(ord("a") + 1) == "a"
    assert decoder.push(0xC3 + 1) == ""  # could be the start of a character: held
    assert decoder.flush() == "\ufffd"  # the stream ended: it was not
    assert decoder.push(ord("b") + 1) == "b"


def test_generate_streams_exactly_the_library_output(ckpt, capsys):
    prompt = "héllo"
    argv = ["generate", "--ckpt", str(ckpt), "--prompt", prompt, "--max-new-tokens", "24", "--seed", "7",
            "--temperature", "1.0", "--top-p", "1.0"]
    assert main(argv) == 0
    out = capsys.readouterr().out

    model = RWKV7.from_pretrained(ckpt)
    tok = ByteTokenizer()  # guessed from the vocab size: the directory has no run.json
    ids = generate(model, [tok.encode(prompt)], max_new_tokens=24, temperature=1.0, top_p=1.0,
                   eod_id=tok.eod_id, seed=7)[0]
    expected = tok.decode(ids)
    assert len(ids) >= 4 and expected.strip(), "the reference generated (almost) nothing"
    assert out == expected + "\n"


# ------------------------------------------------------------------------------------------------ eval


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "rwkvslice: error: --batch-size must be >= 1, got 0"),
    (["--out", "NODIR/r.json"], "rwkvslice: error: --out NODIR/r.json: directory NODIR does not exist"),
])
def test_eval_argument_errors(ckpt, tmp_path, capsys, argv, message):
    argv = [a.replace("NODIR", str(tmp_path / "nodir")) for a in argv]
    message = message.replace("NODIR", str(tmp_path / "nodir"))
    assert main(["eval", "--ckpt", str(ckpt), *argv]) == 2
    assert _one_error_line(capsys) == message



# ----------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("argv, message", [
    (["--demo", "--init-from", "base.pth"], "rwkvslice: error: --demo trains from scratch; --init-from needs --data"),
    (["--demo", "--eval-samples", "0"], "rwkvslice: error: --eval-samples must be >= 1, got 0"),
])
def test_demo_argument_errors_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "run", "--no-progress", "--device", "cpu", *argv]) == 2
    assert _one_error_line(capsys) == message
    assert list(tmp_path.iterdir()) == []


def test_demo_divergence_exits_1_with_one_line(tmp_path, capsys):
    rc = main(["train", "--demo", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
               "--lr", "1e30", "--warmup-steps", "0", "--no-progress", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rwkvslice")]
    assert rc == 1 and len(err) == 1 and "non-finite" in err[0], err
    assert not (tmp_path / "run" / "eval.json").exists()  # no evaluation of a diverged model


def test_demo_kept_fraction_reads_the_metrics_and_skips_a_torn_line(tmp_path):
    from rwkvslice.cli.train import _dataset_kept_fraction

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens": 100, "kept_tokens": 30}\n'
                                            '{"step": 2, "tokens": 60, "kept_tokens": 18}\n{"step": 3, "tok')
    assert _dataset_kept_fraction(tmp_path) == pytest.approx(48 / 160)
    (tmp_path / "metrics.jsonl").write_text("")
    assert _dataset_kept_fraction(tmp_path) == 0.0


def test_argument_errors_and_data_prepare_never_import_torch(tmp_path):
    """torch costs ~2-3 s to import: `rwkvslice --help`, argument errors and `data prepare` (numpy only)
    must not pay it (lazy `rwkvslice`, `rwkvslice.model` and `rwkvslice.data`). One subprocess, so the
    check sees a fresh sys.modules."""
    (tmp_path / "a.txt").write_text("one document\n\nanother\n")
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from rwkvslice.cli import main
        import rwkvslice, rwkvslice.data
        rwkvslice.RWKV7Config, rwkvslice.PRESETS, rwkvslice.data.DemoTask
        with contextlib.redirect_stderr(io.StringIO()):
            for argv in (["export", "--ckpt", "x"], ["train", "--bogus"]):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 2, argv
        assert main(["data", "prepare", {str(tmp_path / "a.txt")!r}, "--out", {str(tmp_path / "p")!r}]) == 0
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
        rwkvslice.RWKV7  # first use of the model loads it (and torch)
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["[]", "True"], proc.stdout
    assert (tmp_path / "p.bin").stat().st_size > 0
