"""Data benchmarks -> reports/bench-data.md.

1. Tokenisation throughput (tokens/s) on the same text: our World tokenizer vs the official `rwkv`
   package's TRIE_TOKENIZER (ids checked identical), plus our byte tokenizer; vocab load times.
2. Dataset build time (tokenise + window) for the demo's 20000-sample .jsonl and for a .txt corpus.
3. Batching throughput (tokens/s out of ResumableLoader, num_workers=0) for .txt, packed .jsonl and a
   memory-mapped binidx, against the tokens/s of a CPU training step (forward + backward + AdamW) of the
   demo-sized model at the same batch shape: the data path must not be the bottleneck.

Rounds alternate between contenders; medians are reported. The machine is shared, so absolute numbers
are noisy; ratios from the same run are the point.

Usage: python benchmarks/bench_data.py [--rounds 5] [--out reports/bench-data.md]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MULTILINGUAL = ("RWKV 是一种 RNN，具有 Transformer 级别的 LLM 性能。它可以像 GPT 一样直接训练（可并行化）。"
                "日本語のテキストも少し。한국어 문장도 조금. Émojis 😀🎉🚀 et accents: ça, naïve, Straße.\n")


def corpus() -> tuple[str, str]:
    """~1 MB of mixed text from files every machine with Python has: stdlib source, license prose,
    and a fixed multilingual paragraph (CJK, Hangul, emoji, accents)."""
    stdlib = Path(os.__file__).parent
    parts = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[:40]]
    licenses = [Path(p).read_text(encoding="utf-8", errors="replace")
                for p in sorted(glob.glob("/usr/share/common-licenses/GPL-3"))]
    text = "".join(parts + licenses) + MULTILINGUAL * 400
    desc = (f"{len(parts)} Python stdlib modules, {len(licenses)} license text(s), a multilingual paragraph x400: "
            f"{len(text):,} characters, {len(text.encode()):,} UTF-8 bytes")
    return text, desc


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_tokenizers(text: str, rounds: int) -> dict:
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkvslice.data.tokenizers import ByteTokenizer, WorldTokenizer

    load_ours, ours = timed(WorldTokenizer)
    load_ref, ref = timed(lambda: TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt")))
    byte = ByteTokenizer()
    ids = ours.encode(text)
    assert ids == ref.encode(text), "World tokenizer ids differ from the official package"
    assert ours.decode(ids) == text
    times = {"world (rwkvslice)": [], "world (official rwkv)": [], "byte (rwkvslice)": []}
    counts = {"world (rwkvslice)": len(ids), "world (official rwkv)": len(ids),
              "byte (rwkvslice)": len(text.encode())}
    for _ in range(rounds):
        times["world (rwkvslice)"].append(timed(lambda: ours.encode(text))[0])
        times["world (official rwkv)"].append(timed(lambda: ref.encode(text))[0])
        times["byte (rwkvslice)"].append(timed(lambda: byte.encode(text))[0])
    dec = {"world (rwkvslice)": [timed(lambda: ours.decode(ids))[0] for _ in range(rounds)],
           "world (official rwkv)": [timed(lambda: ref.decode(ids))[0] for _ in range(rounds)]}
    return {"load": {"rwkvslice": load_ours, "official": load_ref}, "encode": times, "decode": dec,
            "tokens": counts}


def bench_build(tmp: Path, text: str) -> dict:
    from rwkvslice.data import DemoTask, build_dataset

    demo = DemoTask(seed=0).write_jsonl(tmp / "demo.jsonl", 20000)
    txt = tmp / "corpus.txt"
    txt.write_text(text)
    t_demo, ds_demo = timed(lambda: build_dataset(demo, "byte", 32, pack=False))
    t_txt, ds_txt = timed(lambda: build_dataset(txt, "byte", 256))
    return {"demo jsonl (20000 samples, byte, ctx 32)": (t_demo, ds_demo.stats),
            "corpus .txt (byte, ctx 256)": (t_txt, ds_txt.stats)}


def loader_tokens_per_s(dataset, batch_size: int, n_batches: int) -> float:
    from rwkvslice.data import ResumableLoader

    loader = ResumableLoader(dataset, batch_size, seed=0, drop_last=False)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        idx, _ = next(it)
    return n_batches * idx.numel() / (time.perf_counter() - t0)


class TrainStep:
    """The demo preset (2 layers, n_embd 128, byte vocab) at one batch shape; `run()` times one
    forward + backward + AdamW step through model.loss and returns its tokens/s."""

    def __init__(self, batch_size: int, ctx_len: int):
        from rwkvslice import RWKV7, RWKV7Config

        torch.manual_seed(0)
        self.model = RWKV7(RWKV7Config.preset("demo", 320))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.idx = torch.randint(1, 257, (batch_size, ctx_len))
        self.targets = torch.roll(self.idx, -1, 1)
        self.targets[:, : ctx_len // 2] = -100  # about the masking of an SFT batch
        self.run()  # warm-up (first calls allocate and pick kernels)

    def run(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model.loss(self.idx, self.targets).backward()
        self.opt.step()
        return self.idx.numel() / (time.perf_counter() - t0)


def bench_batching(tmp: Path, text: str, rounds: int) -> list[dict]:
    from rwkvslice.data import DemoTask, build_dataset, prepare

    txt = tmp / "corpus.txt"
    txt.write_text(text)
    prepare(txt, tmp / "corpus", "byte")
    sft = DemoTask(seed=0).write_jsonl(tmp / "demo.jsonl", 5000)
    specs = [
        ("demo .jsonl, pack=False", lambda: build_dataset(sft, "byte", 32), 32, 32),
        ("demo .jsonl, pack=True", lambda: build_dataset(sft, "byte", 256, pack=True), 8, 256),
        (".txt stream", lambda: build_dataset(txt, "byte", 256), 8, 256),
        ("binidx (memmap)", lambda: build_dataset(tmp / "corpus", "byte", 256), 8, 256),
    ]
    rows = [{"label": label, "dataset": make(), "batch": batch, "ctx": ctx, "data": []}
            for label, make, batch, ctx in specs]
    steps = {(r["batch"], r["ctx"]): TrainStep(r["batch"], r["ctx"]) for r in rows}
    train = {shape: [] for shape in steps}
    for _ in range(rounds):  # alternate data and training measurements
        for r in rows:
            r["data"].append(loader_tokens_per_s(r["dataset"], r["batch"], 200))
        for shape, speeds in train.items():
            speeds.extend(steps[shape].run() for _ in range(5))
    for r in rows:
        r["train"] = train[(r["batch"], r["ctx"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "reports" / "bench-data.md"))
    args = parser.parse_args()
    med = statistics.median

    text, desc = corpus()
    tok = bench_tokenizers(text, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        build = bench_build(Path(tmp), text)
        batching = bench_batching(Path(tmp), text, args.rounds)

    enc = {k: tok["tokens"][k] / med(v) for k, v in tok["encode"].items()}
    ratio = enc["world (rwkvslice)"] / enc["world (official rwkv)"]
    lines = [
        "# Benchmark: data pipeline (CPU)",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'unknown CPU'}), "
        f"torch threads {torch.get_num_threads()}; shared with other jobs, so absolute numbers are noisy",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {version('numpy')}, "
        f"rwkv {version('rwkv')}, rwkvslice {version('rwkvslice')}",
        f"- Command: `python benchmarks/bench_data.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- Rounds: {args.rounds}, alternating between contenders; medians.",
        "",
        "## 1. Tokenisation (encode), same text",
        "",
        f"Text: {desc}. Ids of our World tokenizer and the official TRIE_TOKENIZER were checked identical "
        f"({tok['tokens']['world (rwkvslice)']:,} tokens).",
        "",
        "| tokenizer | median encode s | tokens/s | UTF-8 bytes/s |",
        "|---|---|---|---|",
    ]
    n_bytes = len(text.encode())
    for k, v in tok["encode"].items():
        lines.append(f"| {k} | {med(v):.3f} | {enc[k]:,.0f} | {n_bytes / med(v):,.0f} |")
    lines += [
        "",
        f"**World encode, ours / official: {ratio:.2f}x.** Decode of the same ids: ours "
        f"{med(tok['decode']['world (rwkvslice)']) * 1e3:.1f} ms, official "
        f"{med(tok['decode']['world (official rwkv)']) * 1e3:.1f} ms. Vocab load: ours "
        f"{tok['load']['rwkvslice']:.2f} s, official {tok['load']['official']:.2f} s (single run).",
        "",
        "## 2. Dataset build (read, tokenise, window), single run",
        "",
        "| input | seconds | windows | kept targets |",
        "|---|---|---|---|",
    ]
    for k, (t, st) in build.items():
        lines.append(f"| {k} | {t:.2f} | {st['windows']:,} | {st['kept_tokens']:,} |")
    lines += [
        "",
        "## 3. Batching vs a CPU training step",
        "",
        "Batching: tokens/s (batch x ctx_len per batch) out of `ResumableLoader`, num_workers=0, 200 batches "
        "per round. Training: forward + backward + AdamW step of the `demo` preset (2 layers, n_embd 128, "
        "vocab 320) through `model.loss` at the same shape, half the targets masked.",
        "",
        "| dataset | batch x ctx | batching tokens/s | training tokens/s | training / batching time |",
        "|---|---|---|---|---|",
    ]
    for r in batching:
        d, t = med(r["data"]), med(r["train"])
        lines.append(f"| {r['label']} | {r['batch']} x {r['ctx']} | {d:,.0f} | {t:,.0f} | {d / t:,.0f}x |")
    worst = min(med(r["data"]) / med(r["train"]) for r in batching)
    lines += [
        "",
        f"**Producing a batch takes at most 1/{worst:,.0f} of the time of a training step on it** (the data "
        "path is not the bottleneck; with num_workers > 0 it also overlaps the step).",
        "",
        "Raw medians: " + json.dumps({r["label"]: {"batching": round(med(r["data"])),
                                                   "training": round(med(r["train"]))} for r in batching}),
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
