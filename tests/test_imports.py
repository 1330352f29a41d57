"""Optional packages are imported lazily: never at module level inside lightning_reweight."""

import ast
import pathlib
import subprocess
import sys

import lightning_reweight

OPTIONAL = {"torchvision", "wandb", "matplotlib", "sklearn", "scipy", "jsonargparse"}
PACKAGE = pathlib.Path(lightning_reweight.__file__).parent


def _module_level_imports(tree):
    """Import statements that run at import time (not inside a function body)."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            is_fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not in_function and isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], child.lineno) for a in child.names)
            elif not in_function and isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], child.lineno))
            visit(child, in_function or is_fn)

    visit(tree, False)
    return found


def test_no_optional_package_imported_at_module_level():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in _module_level_imports(tree):
            if name in OPTIONAL:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_detector_sees_module_level_imports():
    # the check above must be able to fail: it finds a top-level import and ignores one inside a function
    tree = ast.parse("import torchvision\nimport os\ndef f():\n    import wandb\nif True:\n    from sklearn import x\n")
    names = [n for n, _ in _module_level_imports(tree)]
    assert names == ["torchvision", "os", "sklearn"]


def test_importing_the_package_adds_no_optional_package():
    # lightning/torchmetrics may import some of these themselves when installed; our package adds none
    code = (
        "import sys, lightning, torchmetrics\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import lightning_reweight, lightning_reweight.data, lightning_reweight.losses, lightning_reweight.callbacks\n"
        "import lightning_reweight.functional, lightning_reweight.metrics, lightning_reweight.meta\n"
        "import lightning_reweight.bench, lightning_reweight.cli\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        f"print(sorted((after - before) & set({sorted(OPTIONAL)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
