"""The README's recipes, run as written: a recipe is the ```python block that follows a
``<!-- recipe: NAME -->`` line. The test supplies the names a recipe leaves to the user
(``model``, ``dataset``, ``loader``, ``Model``) and reads back what the recipe made."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe(name: str) -> str:
    """The source of the README's recipe ``name``."""
    pattern = rf"^<!-- recipe: {re.escape(name)} -->\n```python\n(.*?)^```$"
    found = re.findall(pattern, README.read_text(), flags=re.MULTILINE | re.DOTALL)
    if len(found) != 1:
        raise LookupError(f"README.md holds {len(found)} recipes named {name!r}, not one")
    return found[0]


def run_recipe(name: str, **supplied: Any) -> dict[str, Any]:
    """Run the recipe ``name`` with the user's names ``supplied``; returns its globals."""
    namespace: dict[str, Any] = {"__name__": f"readme_recipe_{name}", **supplied}
    exec(compile(recipe(name), f"README.md (recipe {name})", "exec"), namespace)
    return namespace
