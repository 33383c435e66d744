"""LightningModule for next-token language modelling with any RAT-family model."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torchmetrics.text import Perplexity

from rat_lightning.errors import ConfigError
from rat_lightning.model import ModelConfig, RATLanguageModel
from rat_lightning.model.config import RUNTIME_FIELDS
from rat_lightning.model.generation import generate
from rat_lightning.model.loss import IGNORE_INDEX, cross_entropy_sum
from rat_lightning.sparse.pattern import InferencePattern
from rat_lightning.training.optim import build_scheduler, parameter_groups


class LanguageModelModule(L.LightningModule):
    """Next-token training, validation and generation.

    The loss is the sum of token losses over the targets that are not ``-100``, divided by
    their count (so masked targets neither count nor dilute the mean).

    Args:
        config: :class:`ModelConfig` of the network.
        lr: peak learning rate (paper 1.3B: 8e-4).
        betas: AdamW betas.
        weight_decay: AdamW decay of weight matrices.
        decay_all: also decay norms, biases and embeddings (the RAT authors' code does).
        warmup: warmup length; a float in (0, 1) is a fraction of the total steps, an int a
            step count.
        min_lr: learning rate at the end of the cosine.
        eps: AdamW epsilon.
        fused_adam: use the fused AdamW kernel (CUDA and CPU); not with fp16-mixed loss scaling.
        compile: compile the model and the loss with ``torch.compile`` at fit start (the loss
            compiled alone fuses its fp32 softmax into two passes over the bf16 logits).
        generate_tokens: tokens ``predict`` generates after each prompt.
        temperature, top_k, top_p: sampling of ``predict``.
        joint_pattern: active recurrence learning (RAT+): every batch is also trained under
            this sparse pattern (the paper: dilation 64) and the two losses are summed. None: off.
        init_from: a checkpoint whose weights start this run (resolution adaptation, fine-tuning):
            weights only, with a fresh optimizer and schedule; ignored when resuming with ckpt_path.
    """

    def __init__(
        self,
        config: ModelConfig,
        lr: float = 8e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        decay_all: bool = False,
        warmup: float = 0.05,
        min_lr: float = 1e-6,
        eps: float = 1e-8,
        fused_adam: bool = True,
        compile: bool = False,
        generate_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        joint_pattern: InferencePattern | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig(**config)
        if isinstance(joint_pattern, dict):
            joint_pattern = InferencePattern(**joint_pattern)
        if lr <= 0 or min_lr < 0 or min_lr > lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={lr}, min_lr={min_lr}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 (a fraction < 1 or a step count), got {warmup}")
        self.save_hyperparameters(ignore=["config", "joint_pattern"])
        # Plain dicts keep checkpoints loadable with torch.load(weights_only=True).
        self.hparams["config"] = asdict(config)
        self.hparams["joint_pattern"] = None if joint_pattern is None else asdict(joint_pattern)
        self.config = config
        self.joint_pattern = joint_pattern
        self.model = RATLanguageModel(config)
        if joint_pattern is not None:
            self.model.check_pattern(joint_pattern, config.max_seq_len)
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._step_started: float | None = None
        self._cross_entropy_sum = cross_entropy_sum

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, V)`` logits."""
        return self.model(input_ids)

    def configure_model(self) -> None:
        if self.hparams.compile:
            # In place: parameter names stay free of a compile-wrapper prefix in checkpoints.
            self.model.compile()
            self._cross_entropy_sum = torch.compile(cross_entropy_sum)

    def setup(self, stage: str) -> None:
        # Both would wrap each block in a recompute: every block's forward would run three times.
        strategy = getattr(self._trainer, "strategy", None)
        if self.model.config.activation_checkpointing and getattr(strategy, "_activation_checkpointing_kwargs", None):
            raise ConfigError(
                "model.config.activation_checkpointing and the strategy's activation_checkpointing_policy both "
                "recompute the blocks; set one (under FSDP, the strategy's)"
            )
        # Before Lightning restores a ckpt_path (which then replaces these weights on a resume)
        # and before a sharding strategy wraps the model.
        if stage == "fit" and self.hparams.init_from:
            self.load_weights(self.hparams.init_from)

    def load_weights(self, path: str) -> None:
        """Load the model weights of a Lightning checkpoint (shapes checked, nothing else taken)."""
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"model.init_from: no checkpoint at {path!r}; give the path of a .ckpt file") from None
        self._check_same_shape(checkpoint, f"model.init_from ({path})")
        self.load_state_dict(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_same_shape(checkpoint, "the checkpoint")

    def _check_same_shape(self, checkpoint: dict[str, Any], source: str) -> None:
        saved = checkpoint.get("hyper_parameters", {}).get("config")
        if saved is None:
            return
        current = asdict(self.config)
        differ = {k: (saved.get(k), v) for k, v in current.items() if k not in RUNTIME_FIELDS and saved.get(k) != v}
        if differ:
            details = ", ".join(f"config.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise ConfigError(
                f"{source} was trained with another model shape ({details}); use its model config "
                "(and the tokenizer it was trained with) or start a new run"
            )

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over kept targets and their count.

        Args:
            logits: ``(B, T, V)``; targets: ``(B, T)`` with ``-100`` where no loss is taken.
        """
        total = self._cross_entropy_sum(logits, targets)
        count = (targets != IGNORE_INDEX).sum()
        return total / count.clamp(min=1), count

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, targets = batch
        loss, count = self.loss(self(input_ids), targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()))
        self._log_throughput(input_ids.numel())
        if self.joint_pattern is None:
            return loss
        # Active recurrence learning: under a sparse pattern attention alone cannot do the job, so
        # the recurrence must learn to carry what the skipped keys held.
        with self.model.using_pattern(self.joint_pattern):
            joint_loss, _ = self.loss(self(input_ids), targets)
        self.log("train/loss_joint", joint_loss, prog_bar=True)
        return loss + joint_loss

    def _log_throughput(self, tokens: int) -> None:
        now = time.perf_counter()
        if self._step_started is not None:
            elapsed = now - self._step_started
            tokens_per_s = tokens * self.trainer.world_size / elapsed
            self.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
            self.log("train/tokens_seen", float(self.trainer.global_step * tokens * self.trainer.world_size))
        self._step_started = now

    def on_train_epoch_start(self) -> None:
        # Time between consecutive steps; the first step of an epoch waits for the loader.
        self._step_started = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_perplexity)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_perplexity)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, perplexity: Perplexity) -> None:
        input_ids, targets = batch
        logits = self(input_ids)
        loss, count = self.loss(logits, targets)
        perplexity.update(logits.float(), targets)
        # Token-weighted mean over the whole split, not a mean of batch means.
        self.log(f"{stage}/loss", loss, batch_size=int(count), sync_dist=True, prog_bar=True)
        self.log(f"{stage}/ppl", perplexity, prog_bar=stage == "val")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Continue each row's input ids; returns prompt and generated ids."""
        prompt = batch[0]
        out = generate(
            self.model,
            prompt,
            self.hparams.generate_tokens,
            self.hparams.temperature,
            self.hparams.top_k,
            self.hparams.top_p,
        )
        return {"prompt": prompt, "generated": out[:, prompt.shape[1] :]}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that could unscale
        # gradients itself (fused AdamW). Under bf16 or fp32 there is no loss scale, so the
        # gradients are the true ones and clipping them directly is exact.
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(self.model, self.hparams.weight_decay, self.hparams.decay_all)
        # fp16 loss scaling needs the unscale step a fused optimizer hides from Lightning.
        fused = self.hparams.fused_adam and self.trainer.precision != "16-mixed"
        optimizer = torch.optim.AdamW(
            groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps, fused=fused or None
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup
        warmup_steps = int(warmup * total) if warmup < 1 else int(warmup)
        scheduler = build_scheduler(optimizer, max(1, warmup_steps), total, self.hparams.min_lr / self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
