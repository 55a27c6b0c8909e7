"""The package's layering: subpackages import only those below them, no module imports
itself in a circle, and importing a module does nothing but define things."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "spanet_jax"

# Each subpackage may import the ones listed (and itself); nothing else. `errors` (the
# user errors' base class) and `outputs` (atomic writes) are the bottom layer, which
# every other may import.
BASE = {"errors", "outputs"}
ALLOWED = {
    "errors": set(),
    "outputs": set(),
    "ops": BASE,
    "models": BASE | {"ops"},
    "convert": BASE | {"models"},
    "data": BASE,
    "reference": BASE | {"models", "data"},
    "train": BASE | {"models", "ops", "data"},
    "tools": BASE | {"models", "ops", "data", "train", "convert"},
}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    yield name, path, ast.parse(path.read_text())


def _imported_modules(tree, known):
  """The spanet_jax modules a module imports, anywhere in it."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spanet_jax"):
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.add(candidate if candidate in known else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("spanet_jax"))
  return found


def _graph():
  modules = {name: tree for name, _, tree in _modules()}
  return {name: _imported_modules(tree, modules) & set(modules) - {name}
          for name, tree in modules.items()}


def test_every_module_lives_in_a_known_subpackage():
  stray = [name for name in _graph() if name != "spanet_jax"
           and name.split(".")[1] not in ALLOWED]
  assert stray == []


def test_subpackages_import_only_lower_layers():
  wrong = []
  for name, targets in _graph().items():
    if name == "spanet_jax":
      continue
    own = name.split(".")[1]
    for target in targets:
      other = target.split(".")[1] if target.count(".") else None
      if other and other != own and other not in ALLOWED[own]:
        wrong.append(f"{name} -> {target}")
  assert wrong == []


def test_no_import_circles():
  graph = _graph()
  circles = []

  def visit(node, path):
    for nxt in graph.get(node, ()):
      if nxt in path:
        circles.append(path[path.index(nxt):] + [nxt])
      elif len(path) < len(graph):
        visit(nxt, path + [nxt])

  for start in graph:
    visit(start, [start])
  assert circles == []


def test_modules_only_define_at_import():
  """Module level holds imports, definitions, constants and docstrings: no calls that
  change the process (environment, devices, registries) when a module is imported."""
  allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign,
             ast.AnnAssign)
  offending = []
  for name, _, tree in _modules():
    for node in tree.body:
      is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
      is_defvjp = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                   and getattr(node.value.func, "attr", None) == "defvjp")
      if not (isinstance(node, allowed) or is_docstring or is_defvjp):
        offending.append(f"{name}:{node.lineno}")
  assert offending == []


def test_importing_the_package_loads_no_framework():
  code = ("import sys, spanet_jax; "
          "print(sorted(m for m in ('jax', 'tensorflow', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


def test_user_errors_share_one_base_class():
  """Every error class of the package and its scripts derives from errors.UserError, so
  one handler (tools.cli.run, train.py) turns each into one line without a traceback."""
  scripts = sorted(PACKAGE.parent.glob("*.py"))
  sources = [path for _, path, _ in _modules()] + scripts
  stray = []
  for path in sources:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
        bases = [ast.unparse(base) for base in node.bases]
        if bases not in (["errors.UserError"], ["Exception"]) or (
            bases == ["Exception"] and node.name != "UserError"):
          stray.append(f"{path.name}:{node.name}({', '.join(bases)})")
  assert stray == []
