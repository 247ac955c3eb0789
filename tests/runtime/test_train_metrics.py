"""metrics.jsonl reading/writing corner cases and the loss plot's skip notes (the normal paths are in
test_train_checkpoint.py)."""

from __future__ import annotations

import json
import sys

import pytest

from rwkvslice.train.metrics import MetricsLog, plot_loss, read_metrics

pytestmark = pytest.mark.component("Training Loop")


def test_read_metrics_keeps_only_step_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no file yet
    path.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n"text"\n{"note": "no step"}\n\n{"step": 2, "loss": 1.0}\n'
                    '{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]


def test_metrics_log_writes_lines_and_closes_once(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.close()  # never started: nothing to close
    log.start(keep_up_to=0)
    log.write({"step": 1, "loss": 3.5})
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1, "loss": 3.5}\n'  # flushed per line
    log.close()
    log.close()
    with pytest.raises(AssertionError, match="call start"):
        log.write({"step": 2})


def test_plot_without_finite_losses_is_skipped(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the plot is skipped without it")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": None}, {"step": 2, "loss": "nan"}, {"step": 3}, {"step": 4, "loss": float("inf")})))
    assert plot_loss(path, tmp_path / "loss.png") == "no finite losses to plot; skipped loss.png"
    assert not (tmp_path / "loss.png").exists()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n')
    note = plot_loss(path, tmp_path / "loss.png")
    assert note == "matplotlib is not installed; skipped loss.png (pip install 'rwkvslice[plot]')"
    assert not (tmp_path / "loss.png").exists()


def test_plot_draws_the_held_out_loss_beside_the_training_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.75},
        {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.5, "eval_loss": 1.75}, {"step": 5, "eval_loss": None}]))
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real(fig, *a, **k))[1])
    assert plot_loss(path, tmp_path / "loss.png") == f"wrote {tmp_path / 'loss.png'}"
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in drawn[0].axes[0].get_lines()}
    assert lines == {"train": ([1, 2, 3, 4], [3.0, 2.5, 2.0, 1.5]),
                     "held-out (--eval-data)": ([2, 4], [2.75, 1.75])}
    assert (tmp_path / "loss.png").stat().st_size > 0
