"""Imports only point down the layers (issue 12): shards <- model and losses <- training core <- evaluation
and metrics <- the pretrain and finetune entry points <- benchmarks.

Every .py under shards/, pretrain/, finetune/ and benchmarks/ is parsed with `ast`; every import at any
depth (module level, inside functions, under `if TYPE_CHECKING:`) of a project module is mapped to its
layer. A module may import from its own layer or a lower one. A module on disk that is not in LAYERS fails
the test: a new module must be placed in a layer when it is added.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("shards", "pretrain", "finetune", "benchmarks")
LAYER_NAMES = {0: "shards", 1: "model and losses", 2: "training core", 3: "evaluation and metrics",
               4: "entry points and recipes", 5: "benchmarks"}

# module -> layer; "pkg.*" places every module of a package. Modules listed here that do not exist
# (yet) are allowed; modules on disk that are not listed are not.
LAYERS: dict[str, int] = {
    "shards": 0, "shards.*": 0,
    "pretrain": 1,  # the package's __init__ (run by every `import pretrain.x`): as low as its lowest module
    **{f"pretrain.{m}": 1 for m in ("attention", "blocks", "htwa", "token_merging", "video_encoder",
                                    "text_encoder", "fusion", "losses", "model", "flops")},
    **{f"pretrain.{m}": 2 for m in ("distributed", "ops", "config", "checkpoint", "trainer", "backends",
                                    "weights", "prelaunch", "image_init")},
    **{f"pretrain.{m}": 3 for m in ("metrics", "evaluate")},
    **{f"pretrain.{m}": 4 for m in ("train", "run", "export", "embed")},
    "finetune": 4, "finetune.*": 4,
    "benchmarks.*": 5,
}


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = path.relative_to(repo).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(repo: Path = REPO) -> dict[str, Path]:
    """Every project module on disk, by dotted name (benchmarks/x.py -> benchmarks.x)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[module_name(path, repo)] = path
    return out


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The layer of a dotted module name: its own entry, else an enclosing package's "pkg.*" entry;
    None if it is in no layer."""
    if module in layers:
        return layers[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) + ".*" in layers:
            return layers[".".join(parts[:i]) + ".*"]
    return None


def imported_modules(source: str, module: str, known: set[str], layers: dict[str, int] = LAYERS,
                     is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted project module) for every import in `source`, at any depth (inside functions and
    classes too). `from pkg import name` is pkg.name when that is a module (on disk or placed in
    `layers`), else pkg. Relative imports are resolved against `module`. In benchmarks/, which put their
    folder on sys.path, a bare `import common` / `from common import x` is the sibling benchmarks.common."""
    siblings = {m.split(".", 1)[1].split(".")[0] for m in known if m.startswith("benchmarks.")}

    def absolute(name: str) -> str:
        if module.startswith("benchmarks.") and name.split(".", 1)[0] in siblings:
            return f"benchmarks.{name}"
        return name

    def is_module(name: str) -> bool:
        return name in known or name in layers

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, absolute(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = absolute(node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if is_module(sub) else target))
    return sorted({(line, name) for line, name in out if name and name.split(".", 1)[0] in PACKAGES})


def upward_imports(sources: dict[str, str], layers: dict[str, int] = LAYERS, known: set[str] | None = None,
                   packages: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """-> (imports that point up a layer, modules in no layer), each as one message line.

    `sources`: dotted module name -> its source; `known`: every project module name (defaults to the
    names in `sources`); `packages`: the names that are packages (their __init__.py)."""
    known = set(sources) if known is None else known
    bad, unplaced = [], []
    for module, source in sorted(sources.items()):
        own = layer_of(module, layers)
        if own is None:
            unplaced.append(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for line, name in imported_modules(source, module, known, layers, module in packages):
            target = layer_of(name, layers)
            if target is None:
                unplaced.append(f"{name} (imported by {module} line {line}) is in no layer")
            elif target > own:
                bad.append(f"{module} (layer {own}, {LAYER_NAMES[own]}) line {line} imports {name} "
                           f"(layer {target}, {LAYER_NAMES[target]})")
    return bad, sorted(set(unplaced))


def scan(repo: Path = REPO) -> tuple[list[str], list[str]]:
    modules = project_modules(repo)
    sources = {name: path.read_text(encoding="utf-8") for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    return upward_imports(sources, LAYERS, set(modules), packages)


def test_every_import_points_down_a_layer():
    bad, unplaced = scan()
    assert not unplaced, "modules without a layer:\n" + "\n".join(unplaced)
    assert not bad, f"{len(bad)} imports point up a layer:\n" + "\n".join(bad)


def test_the_scan_sees_the_whole_tree():
    modules = project_modules()
    assert {"shards.format", "pretrain.model", "pretrain.metrics", "finetune.run", "benchmarks.common"} <= set(modules)
    assert sum(m.startswith("benchmarks.") for m in modules) >= 5


def test_the_scanner_flags_an_upward_import_at_any_depth():
    sources = {
        "shards.fake": "import os\nfrom shards import format\n",
        "pretrain.model": "def f():\n    from pretrain.metrics import retrieval_metrics\n    return retrieval_metrics\n",
        "pretrain.metrics": "import finetune.tasks as t\n",
        "finetune.tasks": "from pretrain.metrics import words\nfrom shards.format import read_tar\n",
        "benchmarks.common": "import torch\n",
        "benchmarks.probes": "from common import x\n",
        "pretrain.losses": "class A:\n    def g(self):\n        if True:\n            from benchmarks import probes\n",
        "pretrain.flops": "from . import metrics\n",
    }
    bad, unplaced = upward_imports(sources)
    assert not unplaced
    assert any(b.startswith("pretrain.model (layer 1") and "line 2 imports pretrain.metrics " in b for b in bad), bad
    assert any(b.startswith("pretrain.metrics (layer 3") and "imports finetune.tasks" in b for b in bad), bad
    assert any(b.startswith("pretrain.losses") and "line 4 imports benchmarks.probes" in b for b in bad), bad
    assert any(b.startswith("pretrain.flops") and "imports pretrain.metrics" in b for b in bad), bad  # relative
    assert not any(b.startswith(("shards.fake", "finetune.tasks", "benchmarks.")) for b in bad), bad
    assert len(bad) == 4, bad


def test_a_module_without_a_layer_fails_and_planned_modules_need_not_exist():
    _, unplaced = upward_imports({"pretrain.newthing": "import os\n", "shards.format": ""})
    assert unplaced == ["pretrain.newthing is in no layer: add it to LAYERS in tests/test_layers.py"]
    assert layer_of("pretrain.trainer") == 2 and layer_of("pretrain.weights") == 2  # planned, may not exist yet
    assert layer_of("shards.anything.deep") == 0 and layer_of("benchmarks.ablation") == 5
    assert layer_of("pretrain") == 1 and layer_of("finetune.anything") == 4 and layer_of("pretrain.newthing") is None
