"""The CUDA kernel's sources agree with the Python that calls them (no torch, no compiler needed).

Every boundary between languages is checked by parsing both sides:
- the torch op schemas registered in cuda/wkv7_op.cpp vs the calls (and the host stand-ins) in ops/wkv7_cuda.py;
- the binding's calls to the launchers vs the launcher declarations in cuda/wkv7_launch.h;
- the host library's extern "C" signatures vs the ctypes argtypes in cuda/build.py and the pointers passed;
- the snapshot chunk length and the compiled head sizes in C++ vs their Python copies.
A mismatch at any of these corrupts memory or mislabels gradients silently instead of failing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "src" / "rwkvslice" / "cuda"
OPS_PY = ROOT / "src" / "rwkvslice" / "ops" / "wkv7_cuda.py"
BUILD_PY = CUDA_DIR / "build.py"


# ---- tiny C++ parsing helpers ------------------------------------------------------------------------


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside (), [], {} or <>."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _call_args(src: str, name: str) -> list[str]:
    """The argument expressions of the first call `name(...)` in src (balanced parentheses)."""
    start = src.index(name + "(") + len(name) + 1
    depth = 1
    for pos in range(start, len(src)):
        depth += {"(": 1, ")": -1}.get(src[pos], 0)
        if depth == 0:
            return _split_top_level(src[start:pos])
    raise AssertionError(f"unbalanced call to {name}")


def _c_params(src: str, func: str) -> list[tuple[str, str]]:
    """(type, name) of the parameters of the C/C++ function declaration or definition `func`."""
    m = re.search(r"\b" + re.escape(func) + r"\s*\(([^)]*)\)", _strip_comments(src))
    assert m, f"{func} not found"
    params = []
    for p in _split_top_level(m.group(1)):
        if p in ("", "void"):
            continue
        pm = re.match(r"(.*?)(\w+)$", p.strip(), flags=re.S)
        params.append((" ".join(pm.group(1).split()), pm.group(2)))
    return params


SCHEMA_TYPES = ("Tensor", "Tensor?", "bool")


def _schemas() -> dict[str, tuple[list[str], list[str]]]:
    """op name -> (argument names, return names) from the m.def(...) strings of wkv7_op.cpp."""
    src = _strip_comments((CUDA_DIR / "wkv7_op.cpp").read_text())
    out = {}
    for m in re.finditer(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", src):
        schema = "".join(re.findall(r"\"([^\"]*)\"", m.group(1)))
        sm = re.fullmatch(r"\s*(\w+)\((.*)\)\s*->\s*\((.*)\)\s*", schema)
        assert sm, f"unparsed schema {schema!r}"
        args = [a.split()[-1] for a in sm.group(2).split(",")]
        rets = [a.split()[-1] for a in sm.group(3).split(",")]
        for decl in sm.group(2).split(",") + sm.group(3).split(","):
            assert decl.split()[0] in SCHEMA_TYPES, f"{sm.group(1)}: unexpected type in {decl!r}"
        for decl in sm.group(3).split(","):
            assert decl.split()[0] == "Tensor", f"{sm.group(1)}: returns must be plain tensors: {decl!r}"
        out[sm.group(1)] = (args, rets)
    return out


# ---- Python AST helpers ------------------------------------------------------------------------------


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _name_list(nodes) -> list[str]:
    names = []
    for n in nodes:
        assert isinstance(n, ast.Name), f"expected a plain name, got {ast.dump(n)}"
        names.append(n.id)
    return names


def _module_constant(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"module constant {name} not found")


def _op_calls(tree: ast.Module, op: str) -> list[ast.Assign]:
    """Assignments `targets = <something>.op(args)` anywhere in the module."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == op
        ):
            found.append(node)
    return found


# ---- tests ---------------------------------------------------------------------------------------------


def test_schemas_define_both_ops_and_cuda_implements_them():
    schemas = _schemas()
    assert set(schemas) == {"wkv7_forward", "wkv7_backward"}
    src = _strip_comments((CUDA_DIR / "wkv7_op.cpp").read_text())
    assert re.search(r"TORCH_LIBRARY(_FRAGMENT)?\(\s*rwkvslice\s*,", src)
    impl = re.search(r"TORCH_LIBRARY_IMPL\(\s*rwkvslice\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\}", src, flags=re.S)
    assert impl, "no CUDA implementation block"
    assert set(re.findall(r"m\.impl\(\"(\w+)\"", impl.group(1))) == set(schemas)
    assert "torch.ops.rwkvslice" in OPS_PY.read_text()


@pytest.mark.parametrize("op", ["wkv7_forward", "wkv7_backward"])
def test_python_calls_match_schema(op):
    """ops.<op>(...) in the autograd Function passes the schema's arguments in order and unpacks its returns."""
    args, rets = _schemas()[op]
    calls = _op_calls(_tree(OPS_PY), op)
    assert calls, f"no call to {op} in {OPS_PY.name}"
    for call in calls:
        assert not call.value.keywords
        assert _name_list(call.value.args) == args
        (target,) = call.targets
        assert isinstance(target, ast.Tuple)
        assert _name_list(target.elts) == rets


@pytest.mark.parametrize("op", ["wkv7_forward", "wkv7_backward"])
def test_host_ops_mirror_schema(op):
    """HostOps (the CPU stand-in for torch.ops.rwkvslice) has the same parameters and returns as the schema."""
    args, rets = _schemas()[op]
    host_ops = next(n for n in _tree(OPS_PY).body if isinstance(n, ast.ClassDef) and n.name == "HostOps")
    fn = next(n for n in host_ops.body if isinstance(n, ast.FunctionDef) and n.name == op)
    assert [a.arg for a in fn.args.args] == args
    returns = [n for n in ast.walk(fn) if isinstance(n, ast.Return)]
    assert len(returns) == 1 and isinstance(returns[0].value, ast.Tuple)
    assert _name_list(returns[0].value.elts) == rets


@pytest.mark.parametrize("op", ["wkv7_forward", "wkv7_backward"])
def test_binding_passes_launcher_arguments_in_order(op):
    """wkv7_op.cpp calls rwkvslice::wkv7_cuda_<fwd|bwd>(...) with arguments in the declared order."""
    launcher = "wkv7_cuda_" + op.split("_")[1]
    declared = [name for _, name in _c_params((CUDA_DIR / "wkv7_launch.h").read_text(), launcher)]
    src = _strip_comments((CUDA_DIR / "wkv7_op.cpp").read_text())
    passed = []
    for expr in _call_args(src, "rwkvslice::" + launcher):
        if "dtype_code" in expr:
            passed.append("dtype")
        elif "Stream" in expr:
            passed.append("stream")
        elif m := re.fullmatch(r"\(int\)\s*(\w+)", expr):
            passed.append(m.group(1))
        elif m := re.fullmatch(r"(\w+)\.data_ptr(<float>)?\(\)", expr):
            passed.append(m.group(1))
        elif m := re.fullmatch(r"data_or_null(<\w+>)?\((\w+)\)", expr):  # a skipped buffer / absent input
            passed.append(m.group(2))
        else:
            raise AssertionError(f"unrecognised argument {expr!r}")
    assert passed == declared
    # And the schema's tensors all reach the kernel (the outputs are allocated in between); flags (bool) are
    # turned into null pointers by the binding.
    args, rets = _schemas()[op]
    flags = {"need_backward"}
    assert (set(args) - flags) | set(rets) <= set(declared)


def _eval_argtypes(tree: ast.Module, func: str) -> list[str]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Attribute)
            and node.targets[0].attr == "argtypes"
            and isinstance(node.targets[0].value, ast.Attribute)
            and node.targets[0].value.attr == func
        ):
            expr = ast.Expression(node.value)
            return eval(
                compile(expr, "argtypes", "eval"), {"__builtins__": {}}, {"_INT": "int", "_PTR": "ptr"}
            )
    raise AssertionError(f"no argtypes for {func}")


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_host_library_ctypes_signature(op):
    """build.py's argtypes and the pointers HostOps passes match the extern "C" function, name by name."""
    func = f"rwkvslice_wkv7_host_{op}"
    params = _c_params((CUDA_DIR / "wkv7_host.cpp").read_text(), func)
    c_kinds = ["ptr" if "*" in ty else "int" if ty == "int" else ty for ty, _ in params]
    assert _eval_argtypes(_tree(BUILD_PY), func) == c_kinds
    # HostOps calls lib.<func>(B, T, H, N, *_ptrs(<tensors>)).
    calls = [
        n
        for n in ast.walk(_tree(OPS_PY))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == func
    ]
    assert len(calls) == 1
    call = calls[0]
    leading = _name_list(call.args[:-1])
    starred = call.args[-1]
    assert isinstance(starred, ast.Starred) and starred.value.func.id == "_ptrs"
    assert leading + _name_list(starred.value.args) == [name for _, name in params]


def test_chunk_length_is_one_constant():
    core = _strip_comments((CUDA_DIR / "wkv7_core.cuh").read_text())
    (c_value,) = re.findall(r"#define\s+WKV7_CHUNK_LEN\s+(\d+)", core)
    assert _module_constant(_tree(OPS_PY), "CHUNK_LEN") == int(c_value)
    # No other file hard-codes its own chunk length.
    for path in CUDA_DIR.glob("*.c*"):
        assert "define WKV7_CHUNK_LEN" not in path.read_text() or path.name == "wkv7_core.cuh"


def test_head_sizes_match_compiled_instantiations():
    tree = _tree(OPS_PY)
    cu = _strip_comments((CUDA_DIR / "wkv7_cuda.cu").read_text())
    host = _strip_comments((CUDA_DIR / "wkv7_host.cpp").read_text())
    for launch in ("launch_forward", "launch_backward"):
        sizes = [int(n) for n in re.findall(r"case\s+(\d+):\s*return\s+" + launch, cu)]
        assert tuple(sizes) == _module_constant(tree, "CUDA_HEAD_SIZES")
    for run in ("forward_all", "backward_all"):
        sizes = [int(n) for n in re.findall(r"case\s+(\d+):\s*" + run, host)]
        assert tuple(sizes) == _module_constant(tree, "HOST_HEAD_SIZES")


def test_kernel_sources_have_no_torch_headers():
    """The .cu/.cuh/.h files must compile with plain nvcc (the torch binding is wkv7_op.cpp alone)."""
    for path in [
        *CUDA_DIR.glob("*.cu"),
        *CUDA_DIR.glob("*.cuh"),
        *CUDA_DIR.glob("*.h"),
        CUDA_DIR / "wkv7_host.cpp",
    ]:
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)", path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")], path.name


def test_grid_puts_batch_and_heads_on_x():
    """gridDim.y and .z are limited to 65,535 blocks, x to 2^31 - 1: every launch is a one-dimensional grid of
    B * H blocks and no kernel reads blockIdx.y/z (a batch of 65,536 sequences must still launch)."""
    cu = _strip_comments((CUDA_DIR / "wkv7_cuda.cu").read_text())
    grids = re.findall(r"<<<\s*([^,]*\([^)]*\)|[^,]*)\s*,", cu)
    assert len(grids) == 2 and all(re.fullmatch(r"dim3\(p\.B \* p\.H\)", g.strip()) for g in grids), grids
    assert not re.search(r"blockIdx\.[yz]|gridDim\.[yz]", cu)
    for kind in ("forward", "backward"):
        assert re.search(rf"wkv7_{kind}_block<N>\(blk, p, blockIdx\.x / p\.H, blockIdx\.x % p\.H, step\)", cu)


PER_THREAD_BODIES = re.compile(r"\bwkv7_(forward|backward)_(begin|load|step|phase1|phase2|reset|replay|end)\b")


def test_gpu_and_host_run_the_same_drivers():
    """The kernels and the host build only place blocks: every per-thread body and every barrier is in the shared
    drivers of wkv7_core.cuh, so the CPU tests run the GPU's phase order (a barrier the .cu adds or drops on its
    own would escape them). The device policy ends each phase with __syncthreads(); the host one loops."""
    core = _strip_comments((CUDA_DIR / "wkv7_core.cuh").read_text())
    for name in ("wkv7_cuda.cu", "wkv7_host.cpp"):
        src = _strip_comments((CUDA_DIR / name).read_text())
        assert not PER_THREAD_BODIES.search(src), f"{name} calls a per-thread body outside the drivers"
        assert "__syncthreads" not in src and "__syncwarp" not in src, name
        assert {"wkv7_forward_block", "wkv7_backward_block"} <= set(re.findall(r"wkv7_\w+_block", src)), name
    assert core.count("__syncthreads") == 1
    device = re.search(r"struct Wkv7DeviceBlock \{(.*?)\n\};", core, flags=re.S).group(1)
    assert re.search(r"body\(\(int\)threadIdx\.x\);\s*__syncthreads\(\);", device)
    host = re.search(r"struct Wkv7HostBlock \{(.*?)\n\};", core, flags=re.S).group(1)
    assert re.search(r"for \(int i = 0; i < N; i\+\+\) body\(i\);", host)
