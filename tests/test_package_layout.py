"""The package's shape: no import cycles (counting imports inside functions, which can hide one),
and modules small enough to read in one sitting."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jigsaw_jax"
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, name: str, modules: dict) -> set:
  """The package modules that `path` imports anywhere (module level or inside a function)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      # `from pkg import mod` imports the submodule when there is one, else pkg itself.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    for target in targets:
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if target.startswith("jigsaw_jax") and target != name:
        found.add(target)
  return found


def _cycle(graph: dict):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state = {}
  stack = []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def _graph() -> dict:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    # A submodule's import of its own parent package is the import system's, not a dependency.
    graph[name] = {m for m in _imports(path, name, modules)
                   if not name.startswith(m + ".")}
  return graph


def test_no_import_cycles():
  assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_checker_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_stay_small():
  long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"
