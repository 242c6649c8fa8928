"""The package's rooms import only rooms below them: every import statement (lazy ones inside
functions too) of lorafusion/, kernels/ and scheduler/ is read with ast, mapped to its room, and
the room graph must follow the declared order."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A room may import rooms listed before it (and itself), never one after it.
ROOM_ORDER = [
    "kernels",
    "scheduler",
    "safe_yaml",
    "file_modes",
    "modules",
    "config",
    "lora_state",
    "qlora",
    "models",
    "adapters",
    "apply",
    "adapter_loading",
    "peft_fusion",
    "lorafusion",  # the package root re-exports the public API lazily
    "runtime",
    "engines",
    "loram",
    "service",
    "commands",
    "cli",
    "train",
]

SOURCE_PACKAGES = {"lorafusion": "lorafusion", "kernels": "lorafusion.kernels", "scheduler": "lorafusion.scheduler"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in ("kernels", "scheduler"):
        return parts[0]
    if parts[0] != "lorafusion":
        return None
    return parts[1] if len(parts) > 1 else "lorafusion"


def _module_name(path: Path, directory: str) -> str:
    relative = path.relative_to(ROOT / directory).with_suffix("")
    return ".".join([SOURCE_PACKAGES[directory], *(part for part in relative.parts if part != "__init__")])


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if not node.level:
        # `from lorafusion import qlora` imports the room of qlora, not the package root.
        if node.module == "lorafusion":
            return [f"lorafusion.{alias.name}" for alias in node.names]
        return [node.module]
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    if node.module:
        return [".".join([*package, node.module])]
    return [".".join([*package, alias.name]) for alias in node.names]


def room_imports() -> set[tuple[str, str, str]]:
    """(importing room, imported room, file) for every import that crosses rooms."""
    found = set()
    for directory in SOURCE_PACKAGES:
        for path in sorted((ROOT / directory).rglob("*.py")):
            module = _module_name(path, directory)
            source_room = _room(module)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                for target in _imported(node, module, path.name == "__init__.py"):
                    target_room = _room(target)
                    if target_room is not None and target_room != source_room:
                        found.add((source_room, target_room, str(path.relative_to(ROOT))))
    return found


def test_every_room_is_declared():
    rooms = {room for pair in room_imports() for room in pair[:2]}
    assert rooms <= set(ROOM_ORDER), f"rooms missing from ROOM_ORDER: {sorted(rooms - set(ROOM_ORDER))}"


def test_rooms_import_only_rooms_below_them():
    rank = {room: index for index, room in enumerate(ROOM_ORDER)}
    upward = sorted(
        (source, target, path)
        for source, target, path in room_imports()
        if rank[target] > rank[source]
    )
    assert not upward, "imports reaching up: " + "; ".join(f"{path}: {source} -> {target}" for source, target, path in upward)

