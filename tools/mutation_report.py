"""Write reports/mutation.md from the results `mutmut run` left in mutants/ (run by `nox -s mutation`).

Score = (killed + timeout) / (mutants - skipped), mutmut's own definition (`mutmut badge`). A surviving
mutant is a change of behaviour no CPU runtime test noticed; each one is listed with its diff, unless
tools/mutation_equivalent.json documents it (equivalent: no observable behaviour change on the measured
configuration; or accepted, e.g. memory-only or last-bit changes, said so in its reason), in which case it is
listed with that reason. Documented mutants still count as survivors in the score; a second score leaves
them out. Modules with no checked mutant are reported as not run.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from coverage_table import source_version  # tools/ is sys.path[0] when run as a script

# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code, mutmut 3.8)
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "caught by type check",
    -11: "segfault",
    -9: "segfault",
    None: "not checked",
}


def load_results(mutants_dir: Path) -> dict[str, dict[str, str]]:
    """source file -> {mutant name: status}."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        source = meta.relative_to(mutants_dir).as_posix().removesuffix(".meta")
        for name, code in data.get("exit_code_by_key", {}).items():
            out[source][name] = STATUS.get(code, "suspicious")
    return out


def load_equivalent(path: Path) -> dict[str, str]:
    """mutant name -> one-line reason it is equivalent, from the "equivalent" object of a JSON file."""
    if not path.is_file():
        return {}
    table = json.loads(path.read_text(encoding="utf-8")).get("equivalent", {})
    return {str(name): " ".join(str(reason).split()) for name, reason in table.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", default="mutants")
    ap.add_argument("--out", default="reports/mutation.md")
    ap.add_argument("--command", default="nox -s mutation", help="the command that produced the results")
    ap.add_argument("--max-diffs", type=int, default=80)
    ap.add_argument(
        "--note", default="", help="a sentence about the run (e.g. its wall time), added after the header"
    )
    ap.add_argument(
        "--equivalent",
        default="tools/mutation_equivalent.json",
        help='JSON file whose "equivalent" object maps surviving mutant names to why they are equivalent',
    )
    args = ap.parse_args(argv)
    equivalent = load_equivalent(Path(args.equivalent))

    results = load_results(Path(args.mutants))
    if not results:
        print(f"mutation_report: no mutmut results under {args.mutants}/", file=sys.stderr)
        return 1
    totals: Counter[str] = Counter()
    per_file: dict[str, Counter[str]] = {}
    survivors: list[str] = []
    stale: list[str] = []  # listed as equivalent but killed, or no longer a mutant
    for source, mutants in results.items():
        counts = Counter(mutants.values())
        counts["equivalent"] = sum(
            1 for name, status in mutants.items() if name in equivalent and status == "survived"
        )
        per_file[source] = counts
        totals.update(counts)
        survivors += [
            name for name, status in mutants.items() if status in {"survived", "no tests", "suspicious"}
        ]
    all_statuses = {name: status for mutants in results.values() for name, status in mutants.items()}
    for name in equivalent:
        if all_statuses.get(name) != "survived" and all_statuses.get(name) != "not checked":
            stale.append(name)
    equivalents = [name for name in survivors if name in equivalent and all_statuses[name] == "survived"]
    gaps = [name for name in survivors if name not in equivalents]

    def tested(c: Counter[str]) -> int:
        return sum(c.values()) - c["equivalent"] - c["skipped"] - c["not checked"]

    def score(c: Counter[str], without_equivalent: bool = False) -> str:
        n = tested(c) - (c["equivalent"] if without_equivalent else 0)
        if tested(c) <= 0:
            return "not run"
        return "—" if n <= 0 else f"{100.0 * (c['killed'] + c['timeout']) / n:.1f} %"

    try:
        from importlib.metadata import version as _version

        version = _version("mutmut")
    except Exception:  # noqa: BLE001 - a missing distribution only loses the version label
        version = "?"
    import torch

    lines = [
        "# Mutation testing",
        "",
        f"Generated by `{args.command}` (tools/mutation_report.py) on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{source_version()}: "
        f"mutmut {version}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} with {__import__('os').cpu_count()} CPUs. Mutated: the core logic listed in "
        "pyproject [tool.mutmut] only_mutate; tests: the CPU runtime tests (`tests/runtime -m 'not gpu and not "
        "slow'`), only those that execute the mutated function.",
        *(["", args.note] if args.note else []),
        "",
        f"**Score: {score(totals)}** (killed + timeout) / (mutants - skipped - not run), over the modules "
        f"that were run; **{score(totals, without_equivalent=True)}** leaving out the {totals['equivalent']} "
        "survivors documented below (equivalent on this configuration, or accepted with the reason given). "
        "Goal: >= 85 %.",
        "",
        "| File | Mutants | Killed | Timeout | Survived | of which documented | No tests | Not run / other | Score "
        "| Score without documented |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, c: Counter[str], bold: bool = False) -> str:
        mutants = sum(c.values()) - c["equivalent"]
        other = mutants - c["killed"] - c["timeout"] - c["survived"] - c["no tests"]
        b = "**" if bold else ""
        return (
            f"| {label} | {mutants} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['equivalent']} | "
            f"{c['no tests']} | {other} | {b}{score(c)}{b} | {b}{score(c, without_equivalent=True)}{b} |"
        )

    for source, c in sorted(per_file.items()):
        lines.append(row(f"`{source}`", c))
    lines.append(row("**Total**", totals, bold=True))
    not_run = [source for source, c in sorted(per_file.items()) if tested(c) <= 0]
    if not_run:
        lines += [
            "",
            "Not run (no mutant checked, not a 0 % score): " + ", ".join(f"`{s}`" for s in not_run) + ".",
        ]
    lines += ["", f"## Documented survivors ({len(equivalents)})", ""]
    if equivalents:
        lines.append(
            "Survivors whose change no test can observe on the measured configuration (CPU, this torch), or that "
            "are accepted (the reason says so), listed in tools/mutation_equivalent.json. `mutmut show NAME` "
            "prints the diff."
        )
        lines.append("")
    lines += [f"- `{name}`: {equivalent[name]}" for name in equivalents]
    lines += ["", f"## Surviving mutants not explained ({len(gaps)})", ""]
    if gaps:
        lines.append(
            "Each is a change to the code that every test executing it still passed (or, for 'no tests', that "
            "no test executes). `mutmut show NAME` prints one; `mutmut apply NAME` applies it."
        )
        lines.append("")
    for name in gaps[: args.max_diffs]:
        try:
            diff = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout.strip()
        except OSError:  # mutmut not on PATH (run outside the mutation session)
            diff = ""
        body = "\n".join(line for line in diff.splitlines() if not line.startswith("# "))
        lines += [f"### `{name}`", "", "```diff", body or "(no diff available)", "```", ""]
    if len(gaps) > args.max_diffs:
        lines.append(f"... and {len(gaps) - args.max_diffs} more (`mutmut results`).")
    for name in stale:
        print(
            f"mutation_report: {args.equivalent} lists {name}, which is not a surviving mutant",
            file=sys.stderr,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + (2 if args.note else 0) + len(per_file)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
