"""The project's modules depend one way: the CLI and generate.py on top, then the caches and the planner,
the model at the bottom. No import circles, none hidden inside a function, and no module imports
generate.py: run as a script it is __main__, so an import would load it a second time, with module
state of its own."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def imports(path: Path) -> set[str]:
    """The project modules a file imports, at its top or anywhere inside it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & MODULES.keys()


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that comes back to where it started ([a, b, a]: a imports b, b imports a),
    or None when there is none (a depth-first search that meets a module still on its path)."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for dep in sorted(graph[name]):
            if circle := visit(dep):
                return circle
        path.pop()
        done.add(name)
        return None

    return next((circle for name in sorted(graph) if (circle := visit(name))), None)


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_no_module_imports_another_that_imports_it_back():
    assert find_circle(GRAPH) is None


def test_the_check_would_see_chat_importing_generate_again():
    assert find_circle(GRAPH | {"chat": GRAPH["chat"] | {"generate"}}) in (["chat", "generate", "chat"],
                                                                          ["generate", "chat", "generate"])


def test_nothing_imports_generate_and_the_model_imports_nothing_of_ours():
    assert [name for name, deps in GRAPH.items() if "generate" in deps] == []
    assert GRAPH["model"] == set()  # the model knows nothing of caches or offloading
    assert "generate" in GRAPH and {"offload", "planner", "attention"} <= MODULES.keys()
