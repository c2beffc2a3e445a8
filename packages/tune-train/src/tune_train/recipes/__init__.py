"""The recipes: each a script with its whole training loop (see tune-train's README).

Nothing imports them; they are run as scripts, by ``tune run`` / torchrun or by
:func:`recipe_main_of`, which executes a recipe file the way ``python recipe.py`` would, less
its command line, and hands back its ``main(cfg)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).parent


def builtin_recipes() -> dict[str, Path]:
    """Name -> file of every built-in recipe."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.py")) if not p.name.startswith("_")}


def recipe_main_of(recipe: str | Path) -> Any:
    """The ``main(cfg)`` of a built-in recipe (by name) or of a recipe file (by path).

    Raises:
        KeyError: For a name that is neither a file nor a built-in recipe.
    """
    import runpy

    path = Path(recipe)
    if not path.is_file():
        path = builtin_recipes()[str(recipe)]
    return runpy.run_path(str(path), run_name=f"tune_recipe_{path.stem}")["main"]
