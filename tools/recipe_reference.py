"""Prints the recipe reference table (every key, type, default, meaning) as Markdown.

The README's "Recipe reference" section is this script's output; a test checks that
the two agree, so the documentation cannot drift from the code.

    python tools/recipe_reference.py
"""

from kgreedy.config.recipe import describe_keys


def reference_table():
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, type_name, default, doc in describe_keys():
        lines.append(f"| `{path}` | {type_name} | `{default}` | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
