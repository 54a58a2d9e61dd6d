"""The import layers in pyproject.toml hold (import-linter): no module imports one above it."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_contracts_are_kept():
    r = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_root_holds_packages_only():
    """cachedet/ holds its __init__, the front door (api.py) and one package per stage or role."""
    pkg = os.path.join(ROOT, "cachedet")
    modules = sorted(n for n in os.listdir(pkg) if n.endswith(".py"))
    assert modules == ["__init__.py", "api.py"]
    for name in os.listdir(pkg):
        path = os.path.join(pkg, name)
        if os.path.isdir(path) and name != "__pycache__":
            assert os.path.exists(os.path.join(path, "__init__.py")), name


def test_every_package_is_installed():
    """A non-editable install ships exactly the packages pyproject.toml lists: every folder of
    cachedet/ (and the CLI) must be among them, or ``pip install cachedet`` leaves it out."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    pkg = os.path.join(ROOT, "cachedet")
    found = {"cachedet", "cachedet_cli"} | {
        f"cachedet.{name}"
        for name in os.listdir(pkg)
        if os.path.exists(os.path.join(pkg, name, "__init__.py"))
    }
    assert sorted(found - listed) == [] and sorted(listed - found) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
    """No module imports itself through others, not even inside a function (grimp reads every
    import statement, as import-linter does)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("cachedet", "cachedet_cli", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    packages = {m for m in graph.modules if any(o.startswith(m + ".") for o in graph.modules)}
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    edges = {m: {t for t in e if t not in packages} for m, e in edges.items()}
    assert _cycles(edges) == []
