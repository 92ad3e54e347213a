"""The C core's files form layers: no file of cmetal/ calls up into a file that uses it.

Each `cmetal/*.c` is compiled to an object file and `nm` lists the symbols
it defines and the ones it needs. File A depends on file B when A needs a
symbol B defines; that graph must have no circle, every edge must go
from a layer to a lower one, as the layer list at the top of
`cmetal/internal.h` says (so the list cannot go stale: a new file must be
placed in it), and only backend.c may name a backend. `cmetal/metal.m`
joins the graph when clang-19 is there (in CI it must be): it is compiled
for an Apple target against the stub headers of `cmetal/stubs` (as
`cmetal/check_objc.sh` does), which is enough for `llvm-nm` to read what it
calls. Mutated copies of the sources show that each check bites.

`python tests/test_c_layers.py` prints the graph.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CMETAL = ROOT / "cmetal"
INTERNAL_H = CMETAL / "internal.h"
CC = os.environ.get("CC", "cc")
CLANG = os.environ.get("CLANG", "clang-19")
# llvm-nm reads Mach-O objects (metal.m's) as well as ELF.
NM = "llvm-nm-19" if shutil.which("llvm-nm-19") else "nm"
# The sanitizer pass preloads ASan into the interpreter; the compilers and
# nm must not inherit it.
TOOL_ENV = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

# Compiled as the extension compiles them, with the Metal backend declared
# so backend.c's use of it shows. pycapsule.c needs Python.h.
C_FLAGS = ["-std=c11", "-O0", "-DCM_HAVE_METAL", f"-I{CMETAL}", f"-I{sysconfig.get_paths()['include']}"]
OBJC_FLAGS = [
    "-x", "objective-c", "-fobjc-arc", "-fblocks", "-DCM_HAVE_METAL",
    "-target", "arm64-apple-macos14", "-nostdlibinc",
    "-isystem", str(CMETAL / "stubs" / "libc"), "-isystem", str(CMETAL / "stubs" / "sdk"),
    f"-I{CMETAL}",
]


def _compile(source: Path, out_dir: Path) -> Path:
    obj = out_dir / (source.name + ".o")
    if source.suffix == ".m":
        cmd = [CLANG, *OBJC_FLAGS, "-c", str(source), "-o", str(obj)]
    else:
        cmd = [CC, *C_FLAGS, "-c", str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=TOOL_ENV)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return obj


def _symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(defined, needed) global symbols of an object file."""
    out = subprocess.run(
        [NM, "-P", str(obj)], capture_output=True, text=True, check=True, timeout=60, env=TOOL_ENV
    ).stdout
    macho = obj.name.endswith(".m.o") or sys.platform == "darwin"  # Mach-O prefixes C names with '_'
    defined, needed = set(), set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if macho and name.startswith("_"):
            name = name[1:]
        if kind in ("U", "w"):
            needed.add(name)
        elif kind.isupper():
            defined.add(name)
    return defined, needed


def dependency_graph(objects: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    """{file: {file it calls: the symbols it uses there}} for the given objects."""
    tables = {name: _symbols(obj) for name, obj in objects.items()}
    owner = {}
    for name, (defined, _) in tables.items():
        for sym in defined:
            assert sym not in owner, f"{sym} is defined by both {owner[sym]} and {name}"
            owner[sym] = name
    graph: dict[str, dict[str, set[str]]] = {name: {} for name in objects}
    for name, (_, needed) in tables.items():
        for sym in needed:
            target = owner.get(sym)
            if target is not None and target != name:
                graph[name].setdefault(target, set()).add(sym)
    return graph


def circles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one file (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def documented_layers() -> tuple[dict[str, int], set[str]]:
    """({file: layer number, 0 lowest}, the backends) from the list at the
    top of internal.h; the backends' line is marked "(backends)"."""
    text = INTERNAL_H.read_text()
    block = re.search(r"Layers, lowest first.*?:\n(.*?)\n \*\s*\n", text, re.S)
    assert block, "internal.h has no 'Layers, lowest first' list"
    layers: dict[str, int] = {}
    backends: set[str] = set()
    for number, line in enumerate(block.group(1).splitlines()):
        if not line.startswith(" *   "):
            break
        names = re.findall(r"\b\w+\.[cm]\b", line)
        for name in names:
            assert name not in layers, f"{name} is listed twice in internal.h's layers"
            layers[name] = number
        if "(backends)" in line:
            backends.update(names)
    assert backends, "internal.h's layer list marks no line (backends)"
    return layers, backends


def format_graph(graph: dict[str, dict[str, set[str]]]) -> str:
    lines = []
    for name in sorted(graph):
        for target in sorted(graph[name]):
            lines.append(f"  {name} -> {target}: {', '.join(sorted(graph[name][target]))}")
        if not graph[name]:
            lines.append(f"  {name} -> (nothing in cmetal/)")
    return "\n".join(lines)


def check(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """What is wrong with the graph: circles, files missing from the layer
    list, calls that do not go down a layer, backends named outside
    backend.c. Empty when all is well."""
    problems = [f"circle: {' <-> '.join(c)}" for c in circles(graph)]
    layers, backends = documented_layers()
    for name in sorted(graph):
        if name not in layers:
            problems.append(f"{name} is not in the layer list at the top of internal.h")
    for name in sorted(graph):
        for target, syms in sorted(graph[name].items()):
            used = ", ".join(sorted(syms))
            if name in layers and target in layers and layers[target] >= layers[name]:
                problems.append(
                    f"{name} (layer {layers[name]}) calls up or sideways into {target} "
                    f"(layer {layers[target]}): {used}"
                )
            if target in backends and name != "backend.c":
                problems.append(f"{name} names the backend {target} ({used}); only backend.c may")
    return problems


def _assert_layered(graph: dict[str, dict[str, set[str]]]) -> None:
    problems = check(graph)
    assert not problems, "\n".join(problems) + "\n\nthe graph (file -> file it calls: symbols):\n" + format_graph(graph)


def _require_clang() -> None:
    # As the Objective-C type-check does: CI must have clang-19.
    if shutil.which(CLANG):
        return
    reason = f"{CLANG} not found: compiling cmetal/metal.m for an Apple target needs it"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI must run this check, so this is a failure, not a skip.", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def c_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cobj")
    return {src.name: _compile(src, out) for src in sorted(CMETAL.glob("*.c"))}


def test_c_files_call_down_the_layers_and_never_in_a_circle(c_objects):
    graph = dependency_graph(c_objects)
    # The split is real: the concepts are separate files that use each other.
    assert {"device.c", "storage.c", "residency.c", "cmdbuf.c", "pool.c"} <= set(graph)
    assert "storage.c" in graph["pool.c"] and "device.c" in graph["cmdbuf.c"]
    _assert_layered(graph)


def test_metal_backend_calls_only_below_it(c_objects, tmp_path):
    _require_clang()
    graph = dependency_graph({**c_objects, "metal.m": _compile(CMETAL / "metal.m", tmp_path)})
    assert "metal.m" in graph["backend.c"]  # the registry reaches Metal through its table
    assert set(graph["metal.m"]) <= {"error.c"}, format_graph(graph)
    _assert_layered(graph)


def _graph_with(c_objects, tmp_path, name: str, code: str) -> dict[str, dict[str, set[str]]]:
    """The graph with `code` appended to cmetal/<name> (a new file if there is none)."""
    source = tmp_path / name
    original = CMETAL / name
    source.write_text((original.read_text() if original.exists() else '#include "internal.h"\n') + code)
    return dependency_graph({**c_objects, name: _compile(source, tmp_path)})


def test_an_upward_call_is_caught(c_objects, tmp_path):
    # residency.c is used by pool.c; make it call the pool back.
    graph = _graph_with(
        c_objects, tmp_path, "residency.c",
        "void cm__residency_upcall(cm_pool_t *pool);\n"
        "void cm__residency_upcall(cm_pool_t *pool) { cm_pool_release(pool); }\n",
    )
    problems = check(graph)
    assert any(p.startswith("circle:") and "pool.c" in p and "residency.c" in p for p in problems), problems
    assert any(p.startswith("residency.c") and "into pool.c" in p and "cm_pool_release" in p for p in problems)


def test_a_backend_named_outside_backend_c_is_caught(c_objects, tmp_path):
    # What device open once did: ask the host backend by name.
    graph = _graph_with(
        c_objects, tmp_path, "memory.c",
        "int cm__memory_host_kind(void);\n"
        "int cm__memory_host_kind(void) { return cm_host_backend.kind; }\n",
    )
    assert "memory.c names the backend host.c (cm_host_backend); only backend.c may" in check(graph)


def test_a_file_missing_from_the_layer_list_is_caught(c_objects, tmp_path):
    graph = _graph_with(
        c_objects, tmp_path, "newconcept.c",
        "void cm__newconcept(cm_device_t *d);\nvoid cm__newconcept(cm_device_t *d) { cm_device_release(d); }\n",
    )
    assert "newconcept.c is not in the layer list at the top of internal.h" in check(graph)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sources = sorted(CMETAL.glob("*.c")) + ([CMETAL / "metal.m"] if shutil.which(CLANG) else [])
        g = dependency_graph({src.name: _compile(src, Path(tmp)) for src in sources})
        print(format_graph(g))
        print("\n".join(check(g)) or "layered, no circles")
