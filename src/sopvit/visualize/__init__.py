"""Visual diagnostics of a pre-training run: attention maps, prototype galleries and an HTML report.

Everything draws with matplotlib's Agg backend, so it works on headless machines; matplotlib is imported
only when a figure is drawn.
"""

from sopvit.visualize.attention import attention_maps, save_attention_figure
from sopvit.visualize.prototypes import prototype_gallery
from sopvit.visualize.report import write_report

__all__ = ["attention_maps", "prototype_gallery", "save_attention_figure", "write_report"]
