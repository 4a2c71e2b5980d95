"""A griffe extension for the API reference: reads `Example:` sections as `Examples:`.

The docstrings of fedjax-sim title their doctest section `Example:` (singular). Griffe's
Google-style parser knows only `Examples:`, and would otherwise render the `>>>` lines as
Markdown (where `>` starts a quote). Loaded by mkdocs.yml; not part of the package.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
