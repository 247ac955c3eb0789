"""The repository agrees with itself: README and TESTING.md commands vs the noxfile and the CLI, pytest
markers vs their registration, the coverage table in TESTING.md vs tools/coverage_table.py, and CI vs
the README's test command. Parsed, never imported (tools/coverage_table.py is torch-free and loaded
from its path).
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import shlex
import sys

import pytest
from sourcetree import (
    ROOT,
    SRC,
    calls,
    dotted,
    markdown_code_blocks,
    nox_sessions,
    parse,
    py_files,
    registered_markers,
    rel,
    shell_commands,
)

pytestmark = pytest.mark.component("Project-wide")

# Marks pytest and its plugins register themselves.
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings", "timeout"}


def _coverage_table_module():
    spec = importlib.util.spec_from_file_location("coverage_table", ROOT / "tools" / "coverage_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("coverage_table", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # torch-free: it imports coverage only inside main()
    return module


def _nox_commands(path) -> list[list[str]]:
    return [
        shlex.split(cmd)
        for block in markdown_code_blocks(path)
        for cmd in shell_commands(block)
        if cmd.split()[0] == "nox"
    ]


def _selected_sessions(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg in {"-s", "--session", "--sessions", "-e"}:
            for name in argv[i + 1 :]:
                if name.startswith("-"):
                    break
                out.append(name)
    return out


def _check_nox_command(argv: list[str], where: str) -> list[str]:
    sessions = nox_sessions()
    problems = []
    for name in _selected_sessions(argv):
        base = name.split("(", 1)[0]
        if base not in sessions:
            problems.append(
                f"{where}: `{' '.join(argv)}` names session {name!r}; noxfile has {sorted(sessions)}"
            )
        elif "(" in name and not sessions[base]["parametrized"]:
            problems.append(f"{where}: {name!r} passes a parameter to unparametrized session {base!r}")
    return problems


def test_readme_test_command_is_bare_nox_and_its_nox_commands_exist():
    """The README's quickstart runs the tests with `nox` (every default session), and every other
    `nox ...` command it shows names sessions the noxfile defines."""
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    commands = _nox_commands(readme)
    assert ["nox"] in commands, f"README.md must show the test command `nox`; its nox commands: {commands}"
    problems = [p for argv in commands for p in _check_nox_command(argv, "README.md")]
    assert not problems, "\n".join(problems)


def test_testing_md_nox_commands_exist():
    """Every `nox -s X` in TESTING.md names a session of the noxfile, and every session is documented."""
    testing = ROOT / "TESTING.md"
    assert testing.exists(), "TESTING.md is missing"
    problems = [p for argv in _nox_commands(testing) for p in _check_nox_command(argv, "TESTING.md")]
    text = testing.read_text()
    for name in nox_sessions():
        if f"`{name}`" not in text and f"-s {name}" not in text:
            problems.append(f"TESTING.md does not document session {name!r}")
    assert not problems, "\n".join(problems)


def test_readme_rwkvslice_commands_match_the_cli():
    """Every `rwkvslice SUBCOMMAND --flag` in the README names a registered subcommand whose module
    declares that flag (argparse add_argument), so the quickstart cannot drift from the CLI."""
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    tree = parse(SRC / "cli" / "__init__.py")
    commands = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in n.targets)
    )
    problems = []
    seen = 0
    for block in markdown_code_blocks(readme):
        for cmd in shell_commands(block):
            argv = shlex.split(cmd)
            if argv[:1] != ["rwkvslice"] or len(argv) < 2:
                continue
            seen += 1
            sub = argv[1]
            if sub not in commands:
                problems.append(f"README.md: `{cmd}`: no subcommand {sub!r} in COMMANDS {sorted(commands)}")
                continue
            path = ROOT / "src" / (commands[sub].replace(".", "/") + ".py")
            if not path.exists():
                problems.append(f"README.md: `{cmd}`: {rel(path)} does not exist")
                continue
            declared = {
                arg.value
                for call in calls(parse(path))
                if dotted(call.func).endswith("add_argument")
                for arg in call.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            }
            for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
                if flag not in declared:
                    problems.append(f"README.md: `{cmd}`: {rel(path)} declares no {flag}")
    assert seen, "README.md shows no `rwkvslice ...` command"
    assert not problems, "\n".join(problems)


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run installs its tools and then runs `nox` with no session selection (nothing weaker)."""
    script = (ROOT / ".ci" / "run").read_text()
    runs = [
        shlex.split(line.strip())
        for line in script.splitlines()
        if re.match(r"^\s*(exec\s+)?(\"?\$\w+\"?/)?nox(\s|$)", line)
    ]
    assert runs, ".ci/run never runs nox"
    for argv in runs:
        args = argv[1:] if argv[0] != "exec" else argv[2:]
        assert not _selected_sessions(args) and not any(
            a in {"-k", "-t", "--tags", "--keywords"} for a in args
        ), f".ci/run must run every default session, runs {argv}"


def test_every_pytest_marker_used_is_registered():
    """--strict-markers fails a run on an unknown marker; this catches it without collecting (and checks
    the noxfile's -m expressions too)."""
    registered = registered_markers() | BUILTIN_MARKS
    used: dict[str, str] = {}
    for path in py_files("tests"):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute):
                chain = dotted(node)
                if chain.startswith("pytest.mark.") and chain.count(".") == 2:
                    used.setdefault(node.attr, f"{rel(path)}:{node.lineno}")
    noxfile = (ROOT / "noxfile.py").read_text()
    expressions = re.findall(r'"-m",\s*"([^"]+)"', noxfile) + re.findall(r'MARKERS\s*=\s*"([^"]+)"', noxfile)
    for expr in (e for e in expressions if e != "pytest"):  # `coverage run -m pytest` is not a marker
        for word in re.findall(r"[A-Za-z_]\w*", expr):
            if word not in {"and", "or", "not"}:
                used.setdefault(word, f"noxfile.py -m {expr!r}")
    unknown = {m: where for m, where in used.items() if m not in registered}
    assert not unknown, f"markers not registered in pyproject [tool.pytest.ini_options]: {unknown}"
    for required in ("gpu", "slow", "interop", "ddp", "nvcc", "component"):
        assert required in registered, f"marker {required!r} must stay registered"


def test_coverage_table_components_agree_with_testing_md():
    """TESTING.md documents the coverage table with the same rows, in the same order, as the table
    tools/coverage_table.py generates."""
    module = _coverage_table_module()
    expected = [*module.COMPONENTS, module.PROJECT_ROW]
    text = (ROOT / "TESTING.md").read_text()
    rows: list[str] = []
    in_table = False
    for line in text.splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else None
        )
        if cells and cells[0] == "Component":
            in_table, rows = True, []
            continue
        if in_table and cells is None:
            if rows:
                break
            in_table = False
            continue
        if in_table and cells and not set(cells[0]) <= set("-: "):
            rows.append(cells[0].strip("*` "))
    rows = [r for r in rows if not r.lower().startswith("total")]
    assert rows == expected, f"TESTING.md coverage table rows {rows} != tools/coverage_table.py {expected}"


def test_every_package_module_maps_to_a_component():
    """Each module of the package belongs to a table row, so no code escapes the per-component report."""
    module = _coverage_table_module()
    unmapped = [
        rel(path)
        for path in py_files("src/rwkvslice")
        if module.component_of_region(path.relative_to(ROOT / "src").as_posix(), "") is None
    ]
    assert not unmapped, f"modules in no component of tools/coverage_table.py COMPONENTS: {unmapped}"
    for component, patterns in module.COMPONENTS.items():
        for pattern in patterns:
            file_glob = pattern.split(":", 1)[0]
            hits = [
                p
                for p in py_files("src/rwkvslice")
                if fnmatch.fnmatch(p.relative_to(ROOT / "src").as_posix(), file_glob)
            ]
            assert hits, f"{component}: pattern {pattern!r} matches no file under src/"


def test_every_static_check_names_its_component():
    """Each test in tests/static carries @pytest.mark.component(<table row>) (or lives in a file the table
    attributes, e.g. test_cuda_*.py), and every named component is a row of the table."""
    module = _coverage_table_module()
    valid = {*module.COMPONENTS, module.PROJECT_ROW}
    problems = []
    for path in py_files("tests/static"):
        if not path.name.startswith("test_"):
            continue
        tree = parse(path)
        file_default = module.component_of_test(rel(path), None)
        module_mark = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "pytestmark" for t in node.targets
            ):
                for call in calls(node.value):
                    if dotted(call.func) == "pytest.mark.component":
                        module_mark = ast.literal_eval(call.args[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func) == "pytest.mark.component":
                name = ast.literal_eval(node.args[0])
                if name not in valid:
                    problems.append(f"{rel(path)}:{node.lineno}: unknown component {name!r}")
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            tagged = any(
                isinstance(d, ast.Call) and dotted(d.func) == "pytest.mark.component"
                for d in node.decorator_list
            )
            if not (tagged or module_mark or file_default):
                problems.append(f"{rel(path)}:{node.lineno}: {node.name} has no @pytest.mark.component")
    assert not problems, "\n".join(problems)
