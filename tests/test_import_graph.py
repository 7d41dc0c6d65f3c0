"""The package's import graph, read with ``ast``: no cycles, and no module imports a
layer above its own (``LAYERS``: kernels and data, model, interop and parallel plans,
adapters, the model registry, generation / training, fine-tuning data, estimates and
evaluation, preference tuning, entry points).

Every ``import`` counts, at module level or inside a function (a lazy import is
still a dependency). Parent packages that Python imports implicitly are not
edges; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module,
else to ``pkg`` itself.
"""

import ast
from pathlib import Path

import torchtitan_nemotron3

ROOT = Path(torchtitan_nemotron3.__file__).parent
PACKAGE = "torchtitan_nemotron3"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                    for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.model.mamba2" in graph and graph[f"{PACKAGE}.model.mamba2"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_ops_never_reach_the_model():
    graph = import_graph()
    ops = [m for m in graph if m == f"{PACKAGE}.ops" or m.startswith(f"{PACKAGE}.ops.")]
    assert len(ops) > 5
    for module in ops:
        above = {m for m in reachable(graph, module) if not m.startswith(f"{PACKAGE}.ops")}
        assert not above, f"{module} imports {sorted(above)}"


def test_model_imports_nothing_that_imports_the_model():
    graph = import_graph()
    model = {m for m in graph if m.startswith(f"{PACKAGE}.model")}
    for module in sorted(model):
        for dep in graph[module] - model:
            assert not (reachable(graph, dep) & model), f"{module} -> {dep} -> model"


# Lowest first; "" is the package's own ``__init__`` (``model_registry``). Siblings in
# one layer may import each other (no cycles, above); a new top-level module or
# folder must be placed here.
LAYERS = [
    # kernels and their torch references; data files and loaders; checkpoint commit,
    # RNG and preemption machinery (none of them knows the model)
    {"ops", "data", "resilience"},
    {"model"},
    # interop; per-layer parallel plans; FP8/MXFP8 swaps of the model's GEMMs
    {"hf", "pipeline", "tensor_parallel", "low_precision"},
    # layout checks over the plans; LoRA adapters and the NF4 base (applied by parallelize)
    {"sharding", "lora", "qlora"},
    {"parallelize"},
    {""},  # model_registry: model + hf adapter + parallelize + pipeline
    {"generate", "train"},  # inference, the trainer
    {"sft", "estimate", "evaluate"},  # chat data (train's assets, job parser); sizing; lm-eval
    {"dpo"},  # preference tuning: sft's rendering and the trainer
    {"config_registry", "job", "dry_run"},  # configs and entry points
]


def _area(module: str) -> str:
    return module.removeprefix(PACKAGE).lstrip(".").split(".")[0]


def upward_imports(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    level = {area: i for i, areas in enumerate(layers) for area in areas}
    unplaced = sorted({_area(m) for m in graph} - set(level))
    if unplaced:
        return [f"not in LAYERS: {unplaced}"]
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if level[_area(d)] > level[_area(m)]
    )


def test_the_layer_check_finds_an_upward_import():
    layers = [{"ops"}, {"hf"}, {"lora"}]
    graph = {f"{PACKAGE}.hf.x": {f"{PACKAGE}.lora.y"}, f"{PACKAGE}.lora.y": set()}
    assert upward_imports(graph, layers) == [f"{PACKAGE}.hf.x -> {PACKAGE}.lora.y"]
    graph[f"{PACKAGE}.new.z"] = set()
    assert upward_imports(graph, layers) == ["not in LAYERS: ['new']"]


def test_no_import_from_a_higher_layer():
    graph = import_graph()
    assert {f"{PACKAGE}.lora", f"{PACKAGE}.hf.state_dict_adapter"} <= set(graph)
    assert upward_imports(graph, LAYERS) == []
