import os
import tempfile
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning (libgomp spins by default). On a machine whose cores other
# work keeps busy, spinning made 10 training steps of a small GPT take 25.9 s instead of 2.0 s (two busy loops
# on 2 cores); sleeping costs about 10 % on an idle machine. Set before torch loads its OpenMP runtime; the
# torchrun ranks and notebook kernels the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# In CI the property tests draw the same examples every run (a red CI always reproduces); locally they explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

from minilora import GPT, GPTConfig


def pytest_configure(config):
    """One cache for the demo's pretrained base (minilora.demos.get_base) for the whole session: every test and
    every notebook kernel (which inherits the environment) finds the base there, so it is pretrained at most
    once. It lives in pytest's cache directory, so later sessions of this clone reuse it (a fresh clone builds
    it once); a MINILORA_CACHE the caller set is kept."""
    if os.environ.get("MINILORA_CACHE"):
        return
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    root = cache.mkdir("minilora") if cache is not None else Path(tempfile.gettempdir()) / f"minilora-tests-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MINILORA_CACHE"] = str(root)


@pytest.fixture(scope="session")
def demo_base() -> Path:
    """The demo's small pretrained base (GPT + BPE tokenizer directory), built once into the session cache."""
    from minilora.demos import DemoConfig, get_base

    path, _ = get_base(DemoConfig(progress=False), log=lambda *a: None)
    return path


@pytest.fixture
def tiny_config():
    return GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_gpt(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config)


@pytest.fixture
def hf_gpt2_dir(tmp_path):
    """A random tiny transformers GPT-2, saved as config.json + model.safetensors."""
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) compares GPT-2 logits")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a mix-up between them would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path, model
