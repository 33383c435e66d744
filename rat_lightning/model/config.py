"""Typed model configuration. LightningCLI reads these fields (and their docstrings) for YAML
validation and ``--help``; ``__post_init__`` rejects impossible shapes naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rat_lightning.errors import ConfigError
from rat_lightning.sparse.pattern import InferencePattern

MIXER_NAMES = ("attention", "local_attention", "rnn", "rat", "retention", "rat_plus", "gated_attention")
# Fields that change neither the weights' shapes nor their meaning: a run may change them
# when it loads a checkpoint (the pattern is what resolution adaptation changes).
RUNTIME_FIELDS = frozenset({"max_seq_len", "backend", "init_std", "pattern", "activation_checkpointing"})


@dataclass
class ModelConfig:
    """Shape and options of a RAT-family language model.

    Blocks are pre-norm: ``h += mixer(norm(h)); h += ffn(norm(h))``.
    """

    vocab_size: int = 4096
    """Vocabulary size; the CLI links it from the data's tokenizer."""
    d_model: int = 256
    """Model width."""
    n_layers: int = 4
    """Number of blocks (mixer + FFN each)."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by n_heads, head_dim = d_model / n_heads (even)."""
    mixer: str | list[str] = "rat"
    """One mixer for every layer, or a list: one name per layer, or a shorter pattern repeated
    (``[local_attention, rat]`` alternates). Names: attention, local_attention, rnn, rat, retention,
    rat_plus (RAT+), gated_attention (RAT+'s attention baseline: no recurrence, output gate)."""
    chunk_size: int = 16
    """RAT chunk size L."""
    n_groups: int = 2
    """RAT query/key groups G shared by n_heads / G heads."""
    window: int = 1024
    """Sliding window W of local_attention layers (keys in (t - W, t])."""
    ffn: Literal["gelu", "swiglu"] = "gelu"
    """FFN kind: the paper's GELU MLP, or SwiGLU."""
    ffn_mult: float = 4.0
    """FFN hidden width as a multiple of d_model (rounded to a multiple of 64 above 64)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output head."""
    max_seq_len: int = 4096
    """Training sequence length; sets the RNN gate-bias init. The CLI links it from data.seq_len."""
    rope_base: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix and the embedding."""
    backend: Literal["auto", "reference", "triton"] = "auto"
    """Backend of the hot ops: auto = Triton kernels on CUDA, the PyTorch reference elsewhere."""
    activation_checkpointing: bool = False
    """Recompute each block's forward during the backward (non-reentrant ``torch.utils.checkpoint``):
    training keeps only the blocks' inputs, for sequences or batches whose activations do not fit,
    at the cost of one more forward per step. Under FSDP use the strategy's
    ``activation_checkpointing_policy`` instead, not both."""
    pattern: InferencePattern = field(default_factory=InferencePattern)
    """Attention pattern of rat_plus / gated_attention / attention layers (dense by default);
    resolution adaptation sets a sparse one. Changing it keeps the weights' shapes."""

    def __post_init__(self) -> None:
        if isinstance(self.pattern, dict):
            self.pattern = InferencePattern(**self.pattern)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "chunk_size", "n_groups", "window", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}); "
                f"e.g. n_heads={_divisor_near(self.d_model, self.n_heads)}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head_dim = d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.n_heads % self.n_groups:
            raise ConfigError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_groups ({self.n_groups})")
        if self.ffn_mult <= 0:
            raise ConfigError(f"model.ffn_mult must be positive, got {self.ffn_mult}")
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be positive, got {self.init_std}")
        pattern = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        unknown = [m for m in pattern if m not in MIXER_NAMES]
        if unknown or not pattern:
            raise ConfigError(
                f"model.mixer has unknown names {unknown or pattern}; choose from {', '.join(MIXER_NAMES)}"
            )
        if self.n_layers % len(pattern):
            raise ConfigError(
                f"model.mixer lists {len(pattern)} names, which does not divide model.n_layers ({self.n_layers}); "
                "give one name per layer or a pattern whose length divides n_layers"
            )

        self.pattern.check(self.n_layers, self.n_heads)

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer name of every layer (the pattern repeated to n_layers)."""
        pattern = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        return pattern * (self.n_layers // len(pattern))

    @property
    def head_dim(self) -> int:
        """d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """FFN inner width: ffn_mult * d_model (2/3 of it for SwiGLU, which has two input matrices)."""
        hidden = self.ffn_mult * self.d_model * (2 / 3 if self.ffn == "swiglu" else 1)
        return int(round(hidden / 64) * 64) if hidden > 64 else int(hidden)


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))
