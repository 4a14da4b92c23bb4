"""Modules depend on each other in the direction the data flows: no import cycle in engine/,
counting imports inside functions too (a deferred import is still a dependency)."""
import ast
import pathlib

ENGINE = pathlib.Path(__file__).resolve().parent.parent / "engine"


def imports() -> dict[str, set[str]]:
    out = {}
    for path in ENGINE.glob("*.py"):
        name, deps = path.stem, set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "engine":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("engine."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
        out[name] = deps - {name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_engine_has_no_import_cycles():
    assert cycles(imports()) == []


def test_the_store_modules_depend_in_the_direction_of_the_data():
    graph = imports()
    order = ["storage", "features", "manifest", "compact", "index", "validate", "publish", "pipeline"]
    for i, module in enumerate(order):
        later = set(order[i + 1:])
        assert not graph[module] & later, f"{module} imports {sorted(graph[module] & later)}, later in the flow"
    assert "catalog" not in graph["bigquery"] and "publish" not in graph["plan"]
