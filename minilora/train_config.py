"""TrainConfig: every setting of a fine-tuning run (minilora.train), each checked when the config is made.

`trajectory()` is the part a resumed run must share with the run that wrote its checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import InitVar, asdict, dataclass

MODES = ("full", "lora", "qlora")                       # what trains: every weight, adapters, adapters on NF4
OPTIMIZERS = ("adamw", "paged", "adamw8bit", "paged8bit")  # minilora.optim: how AdamW's m and v are stored
DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")           # LoRA on every linear layer inside the blocks
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama's (PEFT's)
INITS = ("kaiming", "gaussian", "pissa", "loftq")       # how A and B start (pissa, loftq: variants/lora_init.py)

# Settings that do not change the trajectory of a run; every other TrainConfig field must match on resume.
NOT_TRAJECTORY = ("eval_every", "eval_batch_size", "eval_max_batches", "save_every", "out_dir", "overwrite",
                  "progress", "label", "fsdp")


@dataclass
class TrainConfig:
    mode: str = "lora"                    # "full" | "lora" | "qlora"
    r: int = 8                            # LoRA rank
    alpha: float = 16.0                   # LoRA scaling = alpha / r
    dropout: float = 0.0                  # dropout on the adapter input
    use_dora: bool = False                # DoRA: magnitude and direction (minilora.variants.dora)
    init: str = "kaiming"                 # one of INITS; "loftq" with mode "qlora" only
    loftq_iter: int = 1                   # init "loftq": rounds of NF4 + rank-r SVD
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-3
    min_lr_ratio: float = 0.1             # cosine decays lr to lr · min_lr_ratio at the last step
    warmup_steps: int = 0                 # linear warmup from lr / warmup_steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0                # max global gradient norm (0: no clipping)
    steps: int = 100                      # optimizer steps
    batch_size: int = 16                  # examples per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute block activations in backward (minilora.checkpointing)
    optimizer: str = "adamw"              # one of OPTIMIZERS
    paged: InitVar[bool] = False          # a spelling of optimizer="paged" (with a paged optimizer: allowed); not stored
    page_size: int = 2**16                # paged AdamW: bytes per page
    device_budget: int | None = None      # paged AdamW: bytes of pages kept on the device (None: all)
    compute_dtype: str = "float32"        # qlora: dtype of the dequantized matmul and adapters
    blocksize: int = 64                   # qlora: NF4 block size
    bits: int = 4                         # qlora: bits per base weight, 4 (NF4) or 2 (NF2, minilora.quant.nf2)
    seed: int = 0
    device: str = "cpu"
    fsdp: bool = False                    # under torchrun: shard the model across the ranks (minilora.parallel.fsdp), not DDP
    eval_every: int = 0                   # evaluate every n steps (0: only at the end)
    eval_batch_size: int = 64
    eval_max_batches: int | None = None
    save_every: int = 0                   # checkpoint every n steps (0: only at the end); needs out_dir
    out_dir: str | None = None
    overwrite: bool = False               # out_dir may be a non-empty directory that is not a finetune run
    progress: bool = True                 # tqdm bar with loss and tokens/s
    label: str | None = None              # the progress bar's name (default: mode)

    def __post_init__(self, paged: bool):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if paged and self.optimizer == "adamw":
            self.optimizer = "paged"
        if self.optimizer not in OPTIMIZERS or (paged and not self.optimizer.startswith("paged")):
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS} (a paged one with paged=True), "
                             f"got {self.optimizer!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets, self.betas = tuple(self.targets), tuple(self.betas)
        if self.init not in INITS or (self.init == "loftq" and self.mode != "qlora"):
            raise ValueError(f"TrainConfig.init must be one of {INITS} ('loftq' with mode 'qlora'), "
                             f"got {self.init!r} for mode {self.mode!r}")
        if not isinstance(self.use_dora, bool) or (self.mode == "full" and (self.use_dora or self.init != "kaiming")):
            raise ValueError(f"TrainConfig.use_dora / init are adapter settings: use_dora must be true or false and "
                             f"mode 'full' takes neither, got use_dora={self.use_dora!r}, init={self.init!r}")
        ints = {"r": 1, "loftq_iter": 1, "steps": 1, "batch_size": 1, "grad_accum": 1, "page_size": 1, "blocksize": 1,
                "eval_batch_size": 1, "eval_max_batches": 1, "warmup_steps": 0, "eval_every": 0, "save_every": 0,
                "seed": 0, "device_budget": 0}  # name: least value (the last two may also be None)
        for name, least in ints.items():
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, int) or v < least) and not (v is None and name in (
                    "eval_max_batches", "device_budget")):
                raise ValueError(f"TrainConfig.{name} must be an int >= {least}, got {v!r}")
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        positive, unit = (lambda v: v > 0, "> 0"), (lambda v: 0 <= v < 1, "in [0, 1)")
        for name, v, (ok, expected) in [("lr", self.lr, positive), ("alpha", self.alpha, positive),
                                        ("eps", self.eps, positive), ("dropout", self.dropout, unit),
                                        ("min_lr_ratio", self.min_lr_ratio, (lambda v: 0 <= v <= 1, "in [0, 1]")),
                                        ("grad_clip", self.grad_clip, (lambda v: v >= 0, ">= 0 (0: no clipping)")),
                                        ("weight_decay", self.weight_decay, (lambda v: v >= 0, ">= 0")),
                                        *[("betas", b, unit) for b in self.betas]]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number {expected}, got {v!r}")
        if isinstance(self.bits, bool) or self.bits not in (4, 2) or (self.bits == 2 and self.mode != "qlora"):
            raise ValueError(f"TrainConfig.bits must be 4 or 2 (2 with mode 'qlora'), got {self.bits!r} for mode "
                             f"{self.mode!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TrainConfig.compute_dtype must be float32, bfloat16 or float16, "
                             f"got {self.compute_dtype!r}")
        if self.fsdp and self.optimizer != "adamw":
            raise ValueError(f"TrainConfig.fsdp shards the optimizer state of optimizer 'adamw' only, "
                             f"got optimizer={self.optimizer!r}")
        if self.save_every and not self.out_dir:
            raise ValueError("TrainConfig.save_every needs out_dir")

    def trajectory(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        d = asdict(self)
        for k in NOT_TRAJECTORY:
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON
