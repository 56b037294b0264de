"""The figures lecture notebooks and benchmark scripts share (matplotlib, drawn from measured numbers).

One module per topic (plots.quant, plots.memory, plots.training, ...); each function takes numbers the
library computed and returns a matplotlib Figure. Names are re-exported here.
"""
from .lecture import plot_factorization, plot_lora_table, plot_output_drift, plot_rank_reconstruction, plot_segment_sweep
from .memory_savers import plot_checkpointing, plot_paging_demo
from .memory import plot_memory_breakdown
