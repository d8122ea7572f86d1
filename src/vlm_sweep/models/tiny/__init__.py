"""Tiny, randomly initialised stand-ins for hub vision-language models, one builder module per family.

``build_tiny_model(recipe, output_dir)`` imports ``vlm_sweep.models.tiny.<recipe>`` by name and calls its
``build(output_dir)``; the shared machinery is in ``common``. Adding a family means adding its module here, nothing
else in this package.
"""

from vlm_sweep.models.tiny.common import MARKER, RECIPE_VERSION, build_tiny_model, known_recipes

__all__ = ["MARKER", "RECIPE_VERSION", "build_tiny_model", "known_recipes"]
