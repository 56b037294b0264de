"""The figures lecture notebooks and benchmark scripts share (matplotlib, drawn from measured numbers).

One module per topic, each function taking numbers the library computed and returning a matplotlib Figure:

    lora.py           W ≈ B·A, rank reconstruction, the trainable-parameter table, output drift (notebook 01)
    quant.py          the int8 absmax example, the outlier effect, 4-bit codebooks (notebook 02)
    memory_savers.py  gradient checkpointing (depth, segments) and the paged optimizer (notebook 04)
    memory.py         training memory as stacked bars, estimated or measured (notebook 06)
    training.py       loss curves (notebook 05)

Every figure's name is re-exported here (minilora.plots.plot_codebooks, ...), and save_figure(fig, path)
writes one atomically (common.py).
"""
from .common import save_figure
from .lora import plot_factorization, plot_lora_table, plot_output_drift, plot_rank_reconstruction
from .quant import plot_codebooks, plot_int8_example, plot_outlier_effect
from .memory_savers import plot_checkpointing, plot_paged_step, plot_paging_demo, plot_segment_sweep
from .memory import plot_memory_breakdown
from .training import plot_loss_curves
