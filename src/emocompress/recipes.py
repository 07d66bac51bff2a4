"""The recipe table, ``configs/recipes.yaml``: recipe name -> its stack of configs, what it does, its report.

    python -m emocompress.recipes              # every recipe and what it does (make help)
    python -m emocompress.recipes teacher      # its emocompress arguments (make recipe NAME=teacher)
    python -m emocompress.recipes --markdown   # the README's recipe table

Paths are relative to the repository root, where the Makefile runs. Not imported by the package: the table is a
file of the checkout, not of an installed wheel.
"""

import sys
from pathlib import Path

import yaml

TABLE = "configs/recipes.yaml"
_KEYS = {"description", "report", "configs", "command", "args"}
_COMMANDS = ("fit", "test", "vocab")


def read_recipes(path: str = TABLE) -> dict[str, dict]:
    """The recipes of the table at ``path``, each with its ``command`` (default ``fit``) and ``args`` (default none).

    Raises:
        ValueError: a recipe lacks a key, has an unknown one, names an unknown command or a config file that does
            not exist (paths are relative to the folder above ``configs/``).
    """
    root = Path(path).resolve().parent.parent
    table = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    recipes = {}
    for name, recipe in table.items():
        where = f"{path}: recipe {name!r}"
        missing = {"description", "report", "configs"} - set(recipe)
        if missing or set(recipe) - _KEYS:
            raise ValueError(f"{where}: keys {sorted(recipe)}; give description, report and configs "
                             f"(and optionally command, args), not {sorted(set(recipe) - _KEYS) or sorted(missing)}")
        recipe = {"command": "fit", "args": [], **recipe}
        if recipe["command"] not in _COMMANDS:
            raise ValueError(f"{where}: command {recipe['command']!r}; give one of {', '.join(_COMMANDS)}")
        for file in (*recipe["configs"], recipe["report"]):
            if not (root / file).is_file():
                raise ValueError(f"{where}: {file} does not exist; fix the path (relative to the repository root)")
        recipes[name] = recipe
    return recipes


def recipe_args(name: str, path: str = TABLE) -> list[str]:
    """The ``emocompress`` arguments of recipe ``name``: its command, ``-c`` for each config in order, its args."""
    recipes = read_recipes(path)
    if name not in recipes:
        raise ValueError(f"{path}: no recipe {name!r}; give one of {', '.join(recipes)} (make help lists them)")
    recipe = recipes[name]
    return [recipe["command"], *(arg for file in recipe["configs"] for arg in ("-c", file)),
            *map(str, recipe["args"])]


def markdown_table(path: str = TABLE) -> str:
    """The README's recipe table: recipe, command, what it does, report."""
    rows = ["| recipe | command | what it does | measured result |", "|---|---|---|---|"]
    for name, recipe in read_recipes(path).items():
        command = "make teacher" if name == "teacher" else f"make recipe NAME={name}"
        report = recipe["report"]
        rows.append(f"| {name} | `{command}` | {recipe['description']} | [{Path(report).parent.name}]({report}) |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            recipes = read_recipes()
            width = max(map(len, recipes))
            print("\n".join(f"  {name:<{width}}  {recipe['description']}" for name, recipe in recipes.items()))
        elif argv == ["--markdown"]:
            print(markdown_table(), end="")
        else:
            # one word per argument: the Makefile splits this line on spaces
            print(" ".join(recipe_args(*argv)))
    except (ValueError, TypeError) as err:
        sys.stderr.write(f"emocompress.recipes: error: {err}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
