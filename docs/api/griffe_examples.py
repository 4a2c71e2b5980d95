"""A griffe extension for the API reference: reads `Example:` sections as `Examples:`.

The docstrings of fedjax-sim title their doctest section `Example:` (singular), sometimes
with a caption, `Example (FedAvg with server SGD):`. Griffe's Google-style parser knows
only `Examples:`, and would otherwise render the `>>>` lines as Markdown (where `>` starts
a quote). A caption becomes the section's first line of text. Loaded by mkdocs.yml; not
part of the package.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example(?: \((.+)\))?:[ \t]*$")


def examples_sections(text: str) -> str:
    """`text` with every `Example:` / `Example (caption):` header made `Examples:`.

    Example:
      >>> examples_sections("Example (L = 3):\\n  >>> f(3)\\n  9")
      'Examples:\\n  L = 3:\\n  >>> f(3)\\n  9'
    """
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        match = _EXAMPLE.match(line)
        if match is None:
            out.append(line)
            continue
        indent, caption = match.group(1), match.group(2)
        out.append(f"{indent}Examples:")
        if caption:
            following = next((ln for ln in lines[i + 1:] if ln.strip()), indent + "  ")
            body = following[:len(following) - len(following.lstrip())]
            out.append(f"{body}{caption}:")
    return "\n".join(out)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = examples_sections(obj.docstring.value)
