"""The figures lecture notebooks and benchmark scripts share (matplotlib, drawn from measured numbers).

One module per topic (plots.quant, plots.memory, plots.training, ...); each function takes numbers the
library computed and returns a matplotlib Figure. Names are re-exported here.
"""
from .slides import *  # noqa: F401,F403  (the names in slides.__all__)
from .memory_savers import plot_checkpointing, plot_paged_step, plot_paging_demo
from .memory import plot_memory_breakdown
from .training import plot_loss_curves
