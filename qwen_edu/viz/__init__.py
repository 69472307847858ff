"""Interactive visualizers that work in Jupyter, Colab and the static book."""

from qwen_edu.viz.mrope import MropeExplorer, mrope_explorer
from qwen_edu.viz.rope import SCALING_METHODS, RopeExplorer, rope_explorer

__all__ = ["SCALING_METHODS", "RopeExplorer", "rope_explorer", "MropeExplorer", "mrope_explorer"]
