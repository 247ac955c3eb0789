"""Merge the coverage of every nox session into the per-component table of reports/coverage.md.

Run by `nox -s coverage` (and by `nox`, last). Inputs, all under build/nox/ (written by the noxfile):
  coverage/.coverage.<session>.*   coverage data; each session's static context names its layer
  junit/<session>.xml              pytest results; tests carry a `component` property when tagged
  status/<session>.json            each session's outcome (success / failed / skipped + reason)
Outputs: reports/coverage.md, reports/coverage.xml, reports/html/. Exits 1 when the merged
line + branch coverage is under [tool.coverage.report] fail_under, or when there is no data at all.

Cells come from what actually ran: a layer that did not run shows "not run: <reason>", never 0 % or a
pass. Coverage of a component = (covered statements + covered branches) / (statements + branches) of
the code regions mapped to it (coverage.py's own formula), within one layer's context.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


def source_version() -> str:
    """The commit the measured code came from, and whether src/ or tests/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "tests"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head.stdout.strip()}" + (" + uncommitted changes" if dirty.stdout.strip() else "")


# Component -> code it covers. "file-glob" maps a whole module (relative to src/); "file-glob:qualname-glob"
# maps functions/methods (and what they nest). The most specific match wins (see component_of_region).
# TESTING.md documents the same rows (a static check keeps the two in agreement).
COMPONENTS: dict[str, list[str]] = {
    "Architecture": [
        "rwkvslice/__init__.py",
        "rwkvslice/errors.py",
        "rwkvslice/model/__init__.py",
        "rwkvslice/model/config.py",
        "rwkvslice/model/rwkv7.py",
        "rwkvslice/ops/__init__.py",
        "rwkvslice/ops/wkv7.py",
        "rwkvslice/ops/wkv7_reference.py",
        "rwkvslice/ops/wkv7_torch.py",
    ],
    "Dataset": ["rwkvslice/data/*"],
    "Training Loop": ["rwkvslice/train/*"],
    "Loss Computation": ["rwkvslice/slicing/*", "rwkvslice/model/rwkv7.py:RWKV7.loss"],
    "Backward Pass": [
        "rwkvslice/ops/wkv7_torch.py:*backward*",
        "rwkvslice/ops/wkv7_torch.py:_Intra.*",
        "rwkvslice/slicing/*.py:*backward*",
    ],
    "BFloat16": [
        "rwkvslice/train/step.py:autocast_context",
        "rwkvslice/train/step.py:check_precision",
        "rwkvslice/slicing/loss.py:compute_dtype",
        "rwkvslice/slicing/loss.py:_autocast_dtype",
        "rwkvslice/ops/wkv7_torch.py:_compute_dtype",
    ],
    "CUDA Kernels": ["rwkvslice/ops/wkv7_cuda.py", "rwkvslice/ops/selfcheck.py", "rwkvslice/cuda/*",
                     "rwkvslice/selfcheck.py", "rwkvslice/slicing/selfcheck.py"],
    "Checkpoints": [
        "rwkvslice/model/official.py",
        "rwkvslice/train/checkpoint.py",
        "rwkvslice/train/rng.py",
        "rwkvslice/model/rwkv7.py:RWKV7.save_*",
        "rwkvslice/model/rwkv7.py:RWKV7.from_*",
    ],
    "HF Interop": [
        "rwkvslice/model/hf.py",
        "rwkvslice/model/rwkv7.py:RWKV7.save_hf",
        "rwkvslice/model/rwkv7.py:RWKV7.from_hf",
        "rwkvslice/cli/export.py:_export_hf",
    ],
    "Generation": [
        "rwkvslice/generate/*",
        "rwkvslice/ops/rnn_step_cpu.py",
        "rwkvslice/cuda/build.py:load_rnn_step_library",
        "rwkvslice/model/rwkv7.py:RWKV7.step",
        "rwkvslice/model/rwkv7.py:RWKV7.init_state",
    ],
    "CLI": ["rwkvslice/cli/*"],
    "PEFT": ["rwkvslice/peft/*"],
    "Held-out Evaluation": ["rwkvslice/train/evaluate.py", "rwkvslice/cli/eval.py:data_loss"],
    "Clean Stop": ["rwkvslice/train/stopping.py"],
    "Sharding (FSDP)": ["rwkvslice/train/sharding.py"],
}
# Rows for checks that are about the repository as a whole (ruff, mypy, docs agreement): Static column only.
PROJECT_ROW = "Project-wide"

# Test file -> component, for tests without an explicit @pytest.mark.component (first match wins).
TEST_FILES: list[tuple[str, str]] = [
    ("tests/*/test_fsdp*", "Sharding (FSDP)"),
    ("tests/*/test_train_sharding*", "Sharding (FSDP)"),
    ("tests/static/test_cuda_*", "CUDA Kernels"),
    ("tests/*/test_*cuda*", "CUDA Kernels"),
    ("tests/*/test_wkv7_host*", "CUDA Kernels"),
    ("tests/*/test_*bf16*", "BFloat16"),
    ("tests/*/test_*backward*", "Backward Pass"),
    ("tests/*/test_*grad*", "Backward Pass"),
    ("tests/*/test_*_hf*", "HF Interop"),
    ("tests/*/test_checkpoint*", "Checkpoints"),
    ("tests/*/test_train_checkpoint*", "Checkpoints"),
    ("tests/*/test_resume*", "Checkpoints"),
    ("tests/*/test_interop*", "Checkpoints"),
    ("tests/*/test_data*", "Dataset"),
    ("tests/*/test_token*", "Dataset"),
    ("tests/*/test_loader*", "Dataset"),
    ("tests/*/test_window*", "Dataset"),
    ("tests/*/test_binidx*", "Dataset"),
    ("tests/*/test_records*", "Dataset"),
    ("tests/*/test_synthetic*", "Dataset"),
    ("tests/*/test_prepare*", "Dataset"),
    ("tests/*/test_slicing*", "Loss Computation"),
    ("tests/*/test_loss*", "Loss Computation"),
    ("tests/*/test_chunked*", "Loss Computation"),
    ("tests/*/test_select*", "Loss Computation"),
    ("tests/*/test_model*", "Architecture"),
    ("tests/*/test_wkv*", "Architecture"),
    ("tests/*/test_ops*", "Architecture"),
    ("tests/*/test_config*", "Architecture"),
    ("tests/*/test_generat*", "Generation"),
    ("tests/*/test_sampl*", "Generation"),
    ("tests/*/test_rnn*", "Generation"),
    ("tests/*/test_peft*", "PEFT"),
    ("tests/*/test_cli*", "CLI"),
    ("tests/*/test_train*", "Training Loop"),
    ("tests/*/test_step*", "Training Loop"),
    ("tests/*/test_optim*", "Training Loop"),
    ("tests/*/test_ddp*", "Training Loop"),
    ("tests/*/test_distributed*", "Training Loop"),
    ("tests/*/test_demo*", "Training Loop"),
    ("tests/*/test_metrics*", "Training Loop"),
]

# Table columns: (header, session whose layer fills it). The Total line merges every session that ran.
LAYER_COLUMNS = [("E2E CPU", "e2e_cpu"), ("E2E GPU", "e2e_gpu"), ("Integration", "integration")]


@dataclass
class Tally:
    statements: int = 0
    covered_lines: int = 0
    branches: int = 0
    covered_branches: int = 0

    def add(self, summary: dict) -> None:
        self.statements += summary["num_statements"]
        self.covered_lines += summary["covered_lines"]
        self.branches += summary.get("num_branches", 0)
        self.covered_branches += summary.get("covered_branches", 0)

    @property
    def total(self) -> int:
        return self.statements + self.branches

    @property
    def percent(self) -> float | None:
        return None if self.total == 0 else 100.0 * (self.covered_lines + self.covered_branches) / self.total


@dataclass
class TestResults:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return self.passed + self.failed


# ------------------------------------------------------------------------------------------------ mapping


def _split(pattern: str) -> tuple[str, str | None]:
    file_glob, _, func_glob = pattern.partition(":")
    return file_glob, func_glob or None


def _specificity(pattern: str) -> tuple[int, int, int]:
    file_glob, func_glob = _split(pattern)
    literal = lambda g: len(g.replace("*", "").replace("?", ""))  # noqa: E731
    return (func_glob is not None, literal(func_glob or ""), literal(file_glob))


def component_of_region(path: str, qualname: str) -> str | None:
    """The component a code region belongs to. path is relative to src/ ("rwkvslice/ops/wkv7.py");
    qualname "" is the module-level code, "Cls.meth.inner" a nested function (matched by itself or by
    any enclosing name). The most specific matching pattern wins (a function pattern over a module
    pattern, then the longest literal text); among equals the first listed."""
    names = [".".join(qualname.split(".")[:i]) for i in range(1, qualname.count(".") + 2)] if qualname else []
    best: tuple[tuple[int, int, int], str] | None = None
    for component, patterns in COMPONENTS.items():
        for pattern in patterns:
            file_glob, func_glob = _split(pattern)
            if not fnmatch.fnmatch(path, file_glob):
                continue
            if func_glob is not None and not any(fnmatch.fnmatch(n, func_glob) for n in names):
                continue
            score = _specificity(pattern)
            if best is None or score > best[0]:
                best = (score, component)
    return None if best is None else best[1]


def src_relative(filename: str) -> str:
    """'/abs/src/rwkvslice/ops/x.py' or '.../site-packages/rwkvslice/ops/x.py' -> 'rwkvslice/ops/x.py'."""
    parts = Path(filename).as_posix().split("/")
    idx = len(parts) - 1 - parts[::-1].index("rwkvslice")
    return "/".join(parts[idx:])


def component_of_test(file: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for pattern, component in TEST_FILES:
        if fnmatch.fnmatch(file, pattern):
            return component
    return None


# ------------------------------------------------------------------------------------------------ inputs


def read_status(status_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(status_dir.glob("*.json")):
        record = json.loads(path.read_text())
        out[record["slug"]] = record
    return out


def read_junit(path: Path) -> list[dict]:
    """One dict per test case: file, name, outcome (passed/failed/skipped), component, message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        classname = case.get("classname", "")
        file = classname.replace(".", "/")
        # classname is "tests.runtime.test_x" or "tests.runtime.test_x.TestClass"
        parts = classname.split(".")
        for i in range(len(parts), 0, -1):
            if parts[i - 1].startswith("test_"):
                file = "/".join(parts[:i]) + ".py"
                break
        outcome, message = "passed", ""
        for tag in ("failure", "error"):
            node = case.find(tag)
            if node is not None:
                outcome, message = "failed", (node.get("message") or "")[:200]
        node = case.find("skipped")
        if node is not None and outcome == "passed":
            outcome, message = "skipped", (node.get("message") or "")[:200]
        cases.append(
            {
                "file": file,
                "name": case.get("name", ""),
                "outcome": outcome,
                "component": props.get("component"),
                "message": message,
            }
        )
    return cases


def coverage_json(cov, contexts: list[str] | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cov.json"
        cov.json_report(outfile=str(out), contexts=contexts, ignore_errors=True)
        return json.loads(out.read_text())


def tally_components(report: dict) -> tuple[dict[str, Tally], Tally, dict[str, Tally]]:
    per: dict[str, Tally] = defaultdict(Tally)
    unmapped: dict[str, Tally] = defaultdict(Tally)
    total = Tally()
    for filename, data in report["files"].items():
        path = src_relative(filename)
        total.add(data["summary"])
        for qualname, region in data.get("functions", {"": data}).items():
            component = component_of_region(path, qualname)
            if component is None:
                unmapped[f"{path}:{qualname}" if qualname else path].add(region["summary"])
            else:
                per[component].add(region["summary"])
    return per, total, unmapped


# ------------------------------------------------------------------------------------------------ output


def pct(t: Tally | None) -> str:
    if t is None or t.percent is None:
        return "—"
    return f"{t.percent:.1f} %"


def session_result_text(record: dict | None, run_id: str) -> str:
    if record is None:
        return "not run"
    text = {"success": "passed", "failed": "FAILED", "skipped": "skipped"}.get(
        record["result"], record["result"]
    )
    if record["run_id"] != run_id:
        text += f" (earlier run, {record['started']})"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="build/nox", help="what the nox sessions wrote")
    ap.add_argument("--reports", default="reports", help="where coverage.md, coverage.xml, html/ go")
    ap.add_argument("--run-id", default="", help="this nox invocation's id (older records are marked)")
    ap.add_argument(
        "--fail-under", type=float, default=None, help="default: [tool.coverage.report] fail_under"
    )
    args = ap.parse_args(argv)

    import coverage  # noqa: PLC0415 - only the coverage session has it

    artifacts, reports = Path(args.artifacts), Path(args.reports)
    cov_dir = artifacts / "coverage"
    status = read_status(artifacts / "status")
    data_files = sorted(p for p in cov_dir.glob(".coverage.*"))
    if not data_files:
        print(
            "coverage_table: no coverage data under",
            cov_dir,
            "- run the test sessions first (`nox`)",
            file=sys.stderr,
        )
        return 1

    combined = cov_dir / ".coverage"
    combined.unlink(missing_ok=True)
    cov = coverage.Coverage(data_file=str(combined), config_file="pyproject.toml")
    cov.combine([str(cov_dir)], keep=True)
    cov.save()
    cov = coverage.Coverage(data_file=str(combined), config_file="pyproject.toml")
    cov.load()
    contexts = sorted(c for c in cov.get_data().measured_contexts() if c)

    # per-layer and merged tallies
    merged, merged_total, unmapped = tally_components(coverage_json(cov, None))
    layer: dict[str, dict[str, Tally] | None] = {}
    layer_total: dict[str, Tally] = {}
    for _, session in LAYER_COLUMNS:
        if session in contexts:
            per, tot, _ = tally_components(coverage_json(cov, [f"^{session}$"]))
            layer[session], layer_total[session] = per, tot
        else:
            layer[session] = None

    # test results per component, from every session's JUnit XML
    per_component_tests: dict[str, dict[str, TestResults]] = defaultdict(lambda: defaultdict(TestResults))
    session_tests: dict[str, TestResults] = {}
    unattributed: dict[str, TestResults] = defaultdict(TestResults)
    for xml in sorted((artifacts / "junit").glob("*.xml")):
        slug = xml.stem
        totals = TestResults()
        for case in read_junit(xml):
            component = component_of_test(case["file"], case["component"])
            if slug == "static" and component is None:
                component = PROJECT_ROW
            bucket = per_component_tests[component][slug] if component else unattributed[slug]
            for results in (bucket, totals):
                if case["outcome"] == "passed":
                    results.passed += 1
                elif case["outcome"] == "failed":
                    results.failed += 1
                    results.failures.append(f"{case['file']}::{case['name']}")
                else:
                    results.skipped += 1
                    results.skip_reasons[case["message"]] = results.skip_reasons.get(case["message"], 0) + 1
        session_tests[slug] = totals

    def static_cell(component: str) -> str:
        res = per_component_tests.get(component, {}).get("static")
        record = status.get("static")
        if record is None:
            return "not run"
        if res is None or res.ran + res.skipped == 0:
            return "0 checks"
        text = f"{res.passed}/{res.ran} pass" if res.failed == 0 else f"**{res.failed}/{res.ran} FAIL**"
        if res.skipped:
            text += f", {res.skipped} skipped"
        return text

    def layer_cell(component: str, session: str) -> str:
        record = status.get(session)
        if record is not None and record["result"] == "skipped":
            return f"not run: {record['reason'].split(':')[0]}"  # the full reason is in the Sessions table
        per = layer[session]
        if per is None:
            return "not run" if record is None else f"no data ({session_result_text(record, args.run_id)})"
        return pct(per.get(component))

    def status_cell(component: str) -> str:
        by_session = per_component_tests.get(component, {})
        failed = [(s, r) for s, r in by_session.items() if r.failed]
        ran = sum(r.ran for r in by_session.values())
        if failed:
            return "**FAIL**: " + "; ".join(f"{r.failed} failed in {s}" for s, r in failed)
        if ran == 0:
            return "no tests ran"
        layers = [s for s, r in by_session.items() if r.ran]
        return f"pass ({ran} tests in {', '.join(sorted(layers))})"

    fail_under = args.fail_under
    if fail_under is None:
        fail_under = float(cov.get_option("report:fail_under") or 0.0)

    lines: list[str] = []
    w = lines.append
    w("# Coverage by component")
    w("")
    w(
        f"Generated by `nox -s coverage` (tools/coverage_table.py) on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"nox run `{args.run_id or '?'}`, {source_version()}. Percentages are merged line + branch coverage "
        "(coverage.py) of the code each component maps to (TESTING.md), measured in that layer's session. Static = the "
        "torch-free checks tagged with the component (they parse code, so they have no line coverage). "
        "Status = the outcome of every test attributed to the component in the sessions that ran."
    )
    w("")
    header = ["Component", "Static", *[h for h, _ in LAYER_COLUMNS], "All sessions", "Status"]
    w("| " + " | ".join(header) + " |")
    w("|" + "|".join("---" for _ in header) + "|")
    for component in [*COMPONENTS, PROJECT_ROW]:
        if component == PROJECT_ROW:
            row = [
                component,
                static_cell(component),
                *["—" for _ in LAYER_COLUMNS],
                "—",
                status_cell(component),
            ]
        else:
            row = [
                component,
                static_cell(component),
                *[layer_cell(component, s) for _, s in LAYER_COLUMNS],
                pct(merged.get(component)),
                status_cell(component),
            ]
        w("| " + " | ".join(row) + " |")
    static_res = session_tests.get("static")
    total_row = [
        "**Total (merged)**",
        (
            f"{static_res.passed}/{static_res.ran} pass"
            if static_res and not static_res.failed
            else (f"**{static_res.failed} FAIL**" if static_res else "not run")
        ),
        *[(pct(layer_total[s]) if s in layer_total else "—") for _, s in LAYER_COLUMNS],
        f"**{pct(merged_total)}** ({merged_total.covered_lines}/{merged_total.statements} lines, "
        f"{merged_total.covered_branches}/{merged_total.branches} branches)",
        f"threshold {fail_under:.1f} %",
    ]
    w("| " + " | ".join(total_row) + " |")
    w("")
    if unmapped:
        w("Code not mapped to any component (add it to COMPONENTS in tools/coverage_table.py, TESTING.md):")
        w("")
        for name, t in sorted(unmapped.items()):
            w(f"- `{name}`: {pct(t)}")
        w("")

    w("## Sessions")
    w("")
    w("| Session | Result | Tests pass / fail / skip | Package coverage | Duration | Started | Note |")
    w("|---|---|---|---|---|---|---|")
    ctx_total = {}
    for ctx in contexts:
        _, tot, _ = tally_components(coverage_json(cov, [f"^{ctx}$"]))
        ctx_total[ctx] = tot
    for slug, record in sorted(status.items(), key=lambda kv: kv[1]["started"]):
        res = session_tests.get(slug)
        tests = f"{res.passed} / {res.failed} / {res.skipped}" if res else "—"
        cover = pct(ctx_total.get(record["layer"])) if record["layer"] in ctx_total else "—"
        said = record["reason"] or record.get("note", "")  # why it failed / skipped, or what it stands for
        note = said.replace("|", "/")[:200]
        if res and res.failures:
            note = (note + " " if note else "") + "failed: " + ", ".join(res.failures[:5])
        w(
            f"| {record['session']} | {session_result_text(record, args.run_id)} | {tests} | {cover} | "
            f"{record['duration_s']:.0f} s | {record['started']} | {note} |"
        )
    w("")
    skips = defaultdict(int)
    for slug, res in session_tests.items():
        for reason, n in res.skip_reasons.items():
            skips[(slug, reason)] += n
    if skips:
        w("Skipped tests (reason as pytest reports it):")
        w("")
        for (slug, reason), n in sorted(skips.items()):
            w(f"- {slug}: {n} × {reason}")
        w("")
    if any(unattributed.values()):
        w(
            "Tests not attributed to a component (tag them with `@pytest.mark.component(...)` or name "
            "the file after its module): "
            + ", ".join(f"{s}: {r.ran + r.skipped}" for s, r in unattributed.items() if r.ran + r.skipped)
        )
        w("")
    source = "pyproject [tool.coverage.report] fail_under" if args.fail_under is None else "--fail-under"
    w(
        f"Merged total: {pct(merged_total)} line + branch; threshold ({source}) {fail_under:.1f} %. "
        "Also: reports/coverage.xml (Cobertura), reports/html/index.html (with per-line contexts)."
    )

    reports.mkdir(parents=True, exist_ok=True)
    (reports / "coverage.md").write_text("\n".join(lines) + "\n")
    cov.xml_report(outfile=str(reports / "coverage.xml"), ignore_errors=True)
    cov.html_report(
        directory=str(reports / "html"),
        ignore_errors=True,
        show_contexts=True,
        title="rwkvslice coverage (all nox sessions)",
    )
    print("\n".join(lines))

    percent = merged_total.percent or 0.0
    if percent + 1e-9 < fail_under:
        print(
            f"coverage_table: merged coverage {percent:.2f} % is under the threshold {fail_under:.1f} %",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
