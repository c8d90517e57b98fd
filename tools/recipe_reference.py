"""Prints the recipe reference table (every key, type, default, meaning) as Markdown.

The "Recipe reference" section of docs/recipes.md is this script's output; a test
checks that the two agree, so the documentation cannot drift from the code.

    python tools/recipe_reference.py
"""

from kgreedy.config.recipe import Recipe
from kgreedy.config.schema import describe_keys


def reference_table():
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name, default, doc in describe_keys(Recipe):
        lines.append(f"| `{path}` | {type_name} | `{default}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
