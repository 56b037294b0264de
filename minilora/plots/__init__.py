"""The figures lecture notebooks and benchmark scripts share (matplotlib, drawn from measured numbers).

One module per topic; each function takes numbers computed by the library and returns a Figure.
"""
import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline") else None
