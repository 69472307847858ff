"""The book's own training text, generated from seeded rules (no downloads).

- :func:`generate_stories` -- simple children's stories from a templated grammar (the base model's diet);
- :func:`generate_code` / :func:`generate_arithmetic` -- small Python functions and ``12 + 35 = 47`` lines,
  for the specialisation chapter;
- :func:`build_corpus` -- the mixture the base model is pre-trained on.
"""

from qwen_edu.corpus.stories import PLOTS, generate_stories, generate_story
from qwen_edu.corpus.synthetic import (
    arithmetic_line,
    build_corpus,
    code_function,
    generate_arithmetic,
    generate_code,
)

__all__ = [
    "PLOTS",
    "generate_story",
    "generate_stories",
    "generate_code",
    "generate_arithmetic",
    "code_function",
    "arithmetic_line",
    "build_corpus",
]
