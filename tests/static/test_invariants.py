"""The critical invariants of rwkvslice, checked on the source code (AST), without torch.

Each test names the invariant it guards; TESTING.md lists them. They parse files and never import the
package, so they run in the torch-free `static` session in well under a second.
"""

from __future__ import annotations

import ast
import re

import pytest
from sourcetree import (
    ROOT,
    SRC,
    call_name,
    calls,
    classes,
    dotted,
    find_function,
    functions,
    imported_modules,
    keyword,
    module_name,
    parse,
    py_files,
    rel,
)

# ---------------------------------------------------------------------------------------------------------
# Loss Computation: physical slicing on the training path


@pytest.mark.component("Loss Computation")
def test_model_loss_goes_through_sliced_cross_entropy():
    """RWKV7.loss scores only kept positions: it hands the hidden states to the head's `loss` (Head.loss,
    a method of the head so FSDP can shard the head as its own unit), which passes its *weight* to
    rwkvslice.slicing.sliced_cross_entropy; neither applies the head (or the model's forward)."""
    path = SRC / "model" / "rwkv7.py"
    loss = find_function(path, "RWKV7.loss")
    head_loss = find_function(path, "Head.loss")
    assert loss is not None and head_loss is not None, f"{rel(path)}: RWKV7.loss / Head.loss not found"
    names = [call_name(c) for c in calls(loss)]
    assert "self.head.loss" in names, f"RWKV7.loss must score through self.head.loss, calls {names}"
    sliced = [c for c in calls(head_loss) if call_name(c).split(".")[-1] == "sliced_cross_entropy"]
    assert sliced, f"Head.loss must call sliced_cross_entropy, calls {[call_name(c) for c in calls(head_loss)]}"
    assert any(dotted(arg) == "self.weight" for arg in sliced[0].args), (
        "Head.loss must pass self.weight (not logits) to sliced_cross_entropy"
    )
    forbidden = {"self.head", "self", "self.forward", "F.linear", "torch.nn.functional.linear"}
    for fn in (loss, head_loss):
        used = [call_name(c) for c in calls(fn)]
        bad = [n for n in used if n in forbidden or n.endswith("cross_entropy") and "sliced" not in n]
        assert not bad, f"{fn.name} must not build logits itself, but calls {bad}"
    imports = imported_modules(head_loss, "rwkvslice.model.rwkv7") | imported_modules(
        parse(path), "rwkvslice.model.rwkv7"
    )
    assert "rwkvslice.slicing.sliced_cross_entropy" in imports or any(
        m.startswith("rwkvslice.slicing") for m in imports
    ), "sliced_cross_entropy must come from rwkvslice.slicing"


@pytest.mark.component("Loss Computation")
def test_sliced_cross_entropy_selects_kept_rows_before_projecting():
    """sliced_cross_entropy gathers the kept rows (select_kept) before anything projects them."""
    path = SRC / "slicing" / "loss.py"
    fn = find_function(path, "sliced_cross_entropy")
    assert fn is not None, f"{rel(path)}: sliced_cross_entropy not found"
    order = [(c.lineno, call_name(c).split(".")[-1]) for c in calls(fn)]
    select = [line for line, name in order if name == "select_kept"]
    project = [line for line, name in order if name in {"linear_cross_entropy", "linear", "matmul", "mm"}]
    assert select, "sliced_cross_entropy must call select_kept"
    assert project, "sliced_cross_entropy must call linear_cross_entropy on the kept rows"
    assert min(select) < min(project), "select_kept must run before the head projection"


@pytest.mark.component("Loss Computation")
def test_training_path_never_builds_full_logits():
    """The training code (rwkvslice/train) reaches the loss only through model.loss: it never calls the
    model's forward, its head, or a cross-entropy on logits."""
    offenders = []
    uses_model_loss = False
    for path in py_files("src/rwkvslice/train"):
        for node in ast.walk(parse(path)):  # model.loss, called directly or through a local alias
            if isinstance(node, ast.Attribute) and node.attr == "loss" and dotted(node.value).endswith("model"):
                uses_model_loss = True
        for call in calls(parse(path)):
            name = call_name(call)
            last = name.split(".")[-1]
            if (
                last in {"cross_entropy", "log_softmax", "nll_loss"}
                or name.endswith(".head")
                or (last in {"model", "forward"} and not name.startswith(("build_", "torch.")))
            ):
                offenders.append(f"{rel(path)}:{call.lineno}: {name}(...)")
    assert not offenders, "training path must not build full logits:\n" + "\n".join(offenders)
    assert uses_model_loss, "rwkvslice/train must call model.loss(...) for the training loss"


# ---------------------------------------------------------------------------------------------------------
# BFloat16


def _grad_scalers() -> list[tuple]:
    found = []
    for path in py_files("src", "tools", "benchmarks"):
        for call in calls(parse(path)):
            if call_name(call).split(".")[-1] == "GradScaler":
                found.append((path, call))
    return found


@pytest.mark.component("BFloat16")
def test_bf16_is_never_paired_with_grad_scaler():
    """bf16 has fp32's exponent range: a GradScaler with it is wrong (and fp16 is refused). Any
    GradScaler must be switched on only for float16, never in the same function as bfloat16."""
    problems = []
    for path in py_files("src", "tools", "benchmarks"):
        tree = parse(path)
        for name, fn in functions(tree):
            text = ast.unparse(fn)
            scalers = [c for c in calls(fn) if call_name(c).split(".")[-1] == "GradScaler"]
            for call in scalers:
                enabled = keyword(call, "enabled")
                enabled_text = ast.unparse(enabled) if enabled is not None else ""
                if not re.search(r"float16|fp16", enabled_text) or re.search(r"bfloat16|bf16", enabled_text):
                    problems.append(
                        f"{rel(path)}:{call.lineno}: GradScaler not gated on float16 ({enabled_text!r})"
                    )
                if re.search(r"bfloat16|\bbf16\b", text):
                    problems.append(
                        f"{rel(path)}:{call.lineno}: GradScaler in {name}, which also handles bf16"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.component("BFloat16")
def test_bf16_training_uses_autocast_and_rejects_fp16():
    """The bf16 path exists and is autocast (fp32 master weights) on the model's device type; the
    trainer refuses fp16 (which would need a GradScaler) instead of silently running it."""
    sources = {path: ast.unparse(parse(path)) for path in py_files("src/rwkvslice/train")}
    autocasts = [
        (path, call)
        for path in sources
        for call in calls(parse(path))
        if call_name(call) in {"torch.autocast", "torch.amp.autocast", "autocast"}
    ]
    assert autocasts, "rwkvslice/train must use torch.autocast for bf16"
    for path, call in autocasts:
        dtype = keyword(call, "dtype")
        assert dtype is not None and "bfloat16" in ast.unparse(dtype), (
            f"{rel(path)}:{call.lineno}: autocast must name dtype=torch.bfloat16"
        )
        assert keyword(call, "device_type") is not None or call.args, (
            f"{rel(path)}:{call.lineno}: autocast must name its device type"
        )
    assert any(re.search(r"fp16|float16", text) and "ConfigError" in text for text in sources.values()), (
        "the trainer must reject fp16 with a ConfigError"
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _torch_load_calls(paths):
    for path in paths:
        tree = parse(path)
        load_aliases = {"torch.load"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                load_aliases.update(a.asname or a.name for a in node.names if a.name == "load")
        for call in calls(tree):
            if call_name(call) in load_aliases:
                yield path, call


@pytest.mark.component("Checkpoints")
def test_every_torch_load_passes_weights_only_true():
    """torch.load unpickles arbitrary code unless weights_only=True: every call in the package, tools
    and benchmarks passes it literally."""
    paths = py_files("src", "tools", "benchmarks")
    found = list(_torch_load_calls(paths))
    assert found, "expected the package to load checkpoints with torch.load somewhere"
    bad = []
    for path, call in found:
        value = keyword(call, "weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            bad.append(f"{rel(path)}:{call.lineno}: {ast.unparse(call)}")
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)


@pytest.mark.component("Checkpoints")
def test_no_raw_pickle_in_the_package():
    """No pickle.load/loads (or torch.jit.load) anywhere in the package: checkpoints are safetensors or
    weights-only torch.load."""
    bad = [
        f"{rel(path)}:{call.lineno}: {call_name(call)}"
        for path in py_files("src")
        for call in calls(parse(path))
        if call_name(call)
        in {"pickle.load", "pickle.loads", "torch.jit.load", "dill.load", "cloudpickle.load"}
    ]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------
# Backward Pass


def _is_autograd_function(cls: ast.ClassDef) -> bool:
    return any(
        dotted(base).split(".")[-1] == "Function" and "autograd" in dotted(base) for base in cls.bases
    ) or any(dotted(base) == "Function" for base in cls.bases)


@pytest.mark.component("Backward Pass")
def test_autograd_functions_return_one_gradient_per_forward_input():
    """Every torch.autograd.Function defines static forward and backward, and every tuple backward
    returns has exactly one entry per forward input (a missing or extra gradient is a silent bug)."""
    found = 0
    problems = []
    for path in py_files("src"):
        for cls in classes(parse(path)):
            if not _is_autograd_function(cls):
                continue
            found += 1
            methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
            for required in ("forward", "backward"):
                fn = methods.get(required)
                if fn is None:
                    problems.append(f"{rel(path)}:{cls.lineno}: {cls.name} has no {required}")
                elif not any(dotted(d) == "staticmethod" for d in fn.decorator_list):
                    problems.append(f"{rel(path)}:{fn.lineno}: {cls.name}.{required} must be a @staticmethod")
            if "forward" not in methods or "backward" not in methods:
                continue
            fwd = methods["forward"].args
            if fwd.vararg is not None:
                continue
            n_inputs = len(fwd.posonlyargs) + len(fwd.args) - 1  # minus ctx
            for node in ast.walk(methods["backward"]):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                    if any(isinstance(e, ast.Starred) for e in node.value.elts):
                        continue
                    if len(node.value.elts) != n_inputs:
                        problems.append(
                            f"{rel(path)}:{node.lineno}: {cls.name}.backward returns {len(node.value.elts)} "
                            f"gradients for {n_inputs} forward inputs"
                        )
    assert found, "expected at least one torch.autograd.Function (the wkv7 and loss backward passes)"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# Architecture


# Which subpackages each part of the package may import (data flow: data -> model (+ ops, cuda) ->
# slicing -> train -> generate -> cli). The core (ops, cuda, model, slicing, data) never imports the
# application layers (train, generate, cli); model may import slicing (model.loss); train and generate
# share checkpoint/evaluation helpers; nothing but cli imports cli.
ALLOWED_IMPORTS = {
    "errors": set(),
    "selfcheck": {"errors"},  # the self-checks' shared verdict cache (rwkvslice/selfcheck.py)
    "ops": {"errors", "ops", "cuda", "selfcheck"},
    "cuda": {"errors", "cuda"},
    "slicing": {"errors", "slicing", "selfcheck"},
    "data": {"errors", "data"},
    "model": {"errors", "model", "ops", "cuda", "slicing", "selfcheck"},
    "peft": {"errors", "peft", "model", "ops", "cuda", "slicing", "selfcheck"},
    "generate": {"errors", "peft", "generate", "model", "ops", "cuda", "slicing", "data", "train", "selfcheck"},
    "train": {"errors", "peft", "train", "model", "ops", "cuda", "slicing", "data", "generate", "selfcheck"},
    "cli": {"errors", "peft", "cli", "train", "model", "ops", "cuda", "slicing", "data", "generate", "selfcheck"},
}


@pytest.mark.component("Architecture")
def test_import_layering_follows_the_data_flow():
    """The core never imports the application layers (ops/cuda/model/slicing/data never import train,
    generate or cli; nothing but cli imports cli), so the model stays usable without the trainer."""
    problems = []
    for path in py_files("src/rwkvslice"):
        mod = module_name(path)
        parts = mod.split(".")
        if len(parts) < 2:
            continue  # rwkvslice/__init__.py re-exports the public API
        part = parts[1]
        allowed = ALLOWED_IMPORTS.get(part)
        assert allowed is not None, f"{rel(path)}: subpackage {part!r} missing from ALLOWED_IMPORTS"
        for imported in imported_modules(parse(path), mod):
            bits = imported.split(".")
            if bits[0] != "rwkvslice" or len(bits) < 2 or bits[1] == part:
                continue
            if bits[1] not in allowed and bits[1] in ALLOWED_IMPORTS:
                problems.append(f"{rel(path)} imports {imported} ({part} may import {sorted(allowed)})")
    assert not problems, "\n".join(problems)


@pytest.mark.component("Architecture")
def test_no_cuda_work_at_import_time():
    """Importing rwkvslice never touches CUDA or builds the kernel: module-level code makes no torch.cuda
    call and no cpp_extension load (so `import rwkvslice` is cheap and safe on CPU-only machines)."""
    bad = []
    for path in py_files("src/rwkvslice"):
        for stmt in parse(path).body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for call in calls(stmt):
                name = call_name(call)
                if name.startswith("torch.cuda.") or name.endswith(("cpp_extension.load", "load_inline")):
                    bad.append(f"{rel(path)}:{call.lineno}: {name}")
    assert not bad, "CUDA work at import time:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------
# Dataset


@pytest.mark.component("Dataset")
def test_data_pipeline_uses_only_seeded_generators():
    """Batches are deterministic by (seed, epoch) and resumable: the data package never draws from the
    global RNGs (random.*, np.random.*, torch.rand* / randperm without generator=, manual_seed)."""
    bad = []
    for path in py_files("src/rwkvslice/data"):
        for call in calls(parse(path)):
            name = call_name(call)
            if re.fullmatch(
                r"random\.(random|randint|shuffle|choice|choices|sample|uniform|seed|randrange)", name
            ):
                bad.append(f"{rel(path)}:{call.lineno}: {name} (global random state)")
            elif re.fullmatch(r"(np|numpy)\.random\.\w+", name) and name.split(".")[-1] not in {
                "default_rng",
                "Generator",
                "PCG64",
                "SeedSequence",
            }:
                bad.append(f"{rel(path)}:{call.lineno}: {name} (global numpy RNG)")
            elif name in {"torch.manual_seed", "torch.seed"}:
                bad.append(f"{rel(path)}:{call.lineno}: {name} (reseeds the global torch RNG)")
            elif name in {
                "torch.randperm",
                "torch.randint",
                "torch.rand",
                "torch.randn",
                "torch.multinomial",
            }:
                if keyword(call, "generator") is None:
                    bad.append(f"{rel(path)}:{call.lineno}: {name} without generator=")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------
# Generation


@pytest.mark.component("Generation")
def test_generation_is_constant_work_per_token():
    """Token-by-token generation runs the model in RNN mode: inside a loop it only calls model.step
    (O(1) per token), never the full forward over the growing sequence."""
    token_loops = 0
    bad = []
    for path in py_files("src/rwkvslice/generate"):
        for node in ast.walk(parse(path)):
            if not isinstance(node, (ast.For, ast.While)):
                continue
            names = [(call.lineno, call_name(call)) for call in calls(node)]
            if not any(name.endswith("model.step") for _, name in names):
                continue  # not a token loop (e.g. prefill's loop over prompt-length groups)
            token_loops += 1
            for line, name in names:
                if name in {
                    "model",
                    "self.model",
                    "model.forward",
                    "self.model.forward",
                    "model.hidden_states",
                }:
                    bad.append(f"{rel(path)}:{line}: {name}(...) inside the token loop")
    assert token_loops, "rwkvslice/generate must decode with model.step inside its token loop"
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------
# CLI


@pytest.mark.component("CLI")
def test_every_cli_subcommand_module_follows_the_contract():
    """Each module in rwkvslice.cli.COMMANDS that exists defines add_parser(subparsers) which calls
    set_defaults(run=run), and run(args)."""
    tree = parse(SRC / "cli" / "__init__.py")
    commands = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            commands = ast.literal_eval(node.value)
    assert isinstance(commands, dict) and commands, "rwkvslice/cli/__init__.py must define COMMANDS"
    problems = []
    present = 0
    for module in commands.values():
        path = ROOT / "src" / (module.replace(".", "/") + ".py")
        if not path.exists():
            continue  # an optional subcommand still being written: build_parser skips it
        present += 1
        add_parser = find_function(path, "add_parser")
        run = find_function(path, "run")
        if add_parser is None or run is None:
            problems.append(f"{rel(path)}: needs add_parser(subparsers) and run(args)")
            continue
        sets_run = any(
            call_name(c).endswith("set_defaults") and any(kw.arg == "run" for kw in c.keywords)
            for c in calls(add_parser)
        )
        if not sets_run:
            problems.append(f"{rel(path)}: add_parser must call p.set_defaults(run=run)")
    assert present, "no CLI subcommand module exists"
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# Training Loop


def _string_subscripts(tree: ast.AST, name: str) -> set[str]:
    return {
        node.slice.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == name
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    }


@pytest.mark.component("Training Loop")
def test_resume_restores_exactly_what_checkpoints_save():
    """Exact resume: every entry of trainer_state that a resumed run reads is written at save time and every
    entry written is read back (a key saved but never restored, or restored but never saved, breaks the
    bit-for-bit continuation); the optimizer, schedule and loader states and the RNGs are all restored."""
    trainer = SRC / "train" / "trainer.py"
    checkpoint = SRC / "train" / "checkpoint.py"
    tree = parse(trainer)
    written: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "trainer_state" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            written |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    for call in calls(parse(checkpoint)):  # save_checkpoint adds entries: dict(trainer_state, step=step)
        if call_name(call) == "dict" and call.args and dotted(call.args[0]) == "trainer_state":
            written |= {kw.arg for kw in call.keywords if kw.arg}
    read = _string_subscripts(tree, "trainer_state")
    assert written, f"{rel(trainer)}: no trainer_state dict is saved"
    assert read == written, f"trainer_state saved {sorted(written)} but resume reads {sorted(read)}"
    restored = {
        call_name(c).rsplit(".", 1)[0] for c in calls(tree) if call_name(c).endswith(".load_state_dict")
    }
    for obj in ("optimizer", "schedule", "loader", "held_out"):  # held_out: --eval-data best-so-far
        assert obj in restored, f"{rel(trainer)}: resume never calls {obj}.load_state_dict"
    assert any(call_name(c).endswith("restore_rng_state") for c in calls(tree)), (
        "resume must restore the RNGs"
    )


@pytest.mark.component("Training Loop")
def test_every_optimizer_step_starts_from_fresh_gradients():
    """train_step zeroes the gradients (set_to_none) after every step, applied or not, so no micro-batch
    of one step leaks into the next; and it steps the optimizer only under the finite-gradient branch."""
    path = SRC / "train" / "step.py"
    fn = find_function(path, "train_step")
    assert fn is not None, f"{rel(path)}: train_step not found"
    zero = [c for c in calls(fn) if call_name(c).endswith("zero_grad")]
    assert zero, "train_step must call optimizer.zero_grad"
    assert all(
        isinstance(keyword(c, "set_to_none"), ast.Constant) and keyword(c, "set_to_none").value is True
        for c in zero
    ), "zero_grad(set_to_none=True): stale zeros would still be summed into by the next backward"
    top_level_zero = [s for s in fn.body if any(call_name(c).endswith("zero_grad") for c in calls(s))]
    assert any(isinstance(s, ast.Expr) for s in top_level_zero), (
        "zero_grad must run on every path, not in a branch"
    )
    steps = [
        (node, c)
        for node in ast.walk(fn)
        if isinstance(node, ast.If)
        for c in calls(node)
        if call_name(c) == "optimizer.step"
    ]
    assert steps, "optimizer.step() must be guarded by the non-finite check"
