"""The optimizers: AdamW's update written once (adamw.py), with m and v stored three ways.

adamw8bit.py: blockwise 8-bit m and v; paged.py: fp32 m and v in the pager's pages (pager.py, machinery);
paged8bit.py: 8-bit m and v in pages."""
from .pager import Pager, PagerStats
from .paged import PagedAdamW
from .adamw8bit import AdamW8bit
from .paged8bit import PagedAdamW8bit
