"""Thin LightningModule around ExpertPredictor: masked multi-label loss, optimizer, metrics."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, is_dataclass

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import Container, OmegaConf

from predictor.metrics import ExpertMetrics, scalars, targets_multi_hot
from predictor.model import ExpertPredictor, PredictorConfig
from predictor.windows import unpack

log = logging.getLogger(__name__)

LOSSES = ("softmax_bce", "bce", "focal")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.05, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` (fraction of steps, or steps if >= 1), then cosine to min_lr_ratio."""
    warm = int(warmup * total_steps) if warmup < 1 else int(warmup)
    warm = max(1, warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def masked_multilabel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    loss: str = "bce",
    pos_weight: float | None = None,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """logits (B, T, L, E), target (B, T, L, E) bool, mask (B, T) bool -> mean over scored (token, layer).

    `bce`: per-expert binary cross-entropy. `focal`: BCE down-weighting easy negatives.
    `softmax_bce`: listwise cross-entropy of each (token, layer)'s softmax over E against its k-hot
    target (divided by k), plus BCE. The listwise term ranks the k routed experts against the other
    E - k directly, which is what recall@k and top-k prefetch use (docs/RESULTS.md compares the losses).
    The BCE term keeps sigmoid(logit) a calibrated probability, for threshold decoding, PR-AUC and
    the runtime's confidence threshold.
    """
    x = logits[mask].float()  # (N, L, E)
    y = target[mask].float()
    if x.numel() == 0:
        return logits.sum() * 0.0
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=x.device)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=pw)
    if loss == "focal":
        bce = F.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none")
        p = torch.sigmoid(x)
        p_t = p * y + (1 - p) * (1 - y)
        return ((1 - p_t) ** focal_gamma * bce).mean()
    if loss == "softmax_bce":
        listwise = -(F.log_softmax(x, dim=-1) * y).sum(-1) / y.sum(-1).clamp_min(1)  # (N, L)
        return listwise.mean() + F.binary_cross_entropy_with_logits(x, y, pos_weight=pw)
    raise ValueError(f"model: key 'loss' must be one of {LOSSES}, got {loss!r}")


class PredictorLitModule(L.LightningModule):
    def __init__(
        self,
        net: PredictorConfig | dict,
        optimizer,  # functools.partial(torch.optim.X, lr=...) from `_partial_: true`
        scheduler=None,  # partial(callable(optimizer, total_steps) -> LRScheduler) or None
        loss: str = "bce",
        pos_weight: float | None = None,
        focal_gamma: float = 2.0,
        train_metrics_every: int = 10,
        compile: bool = False,
        bank_memo_mb: int | None = None,  # cap of the routing bank's vote memo (predictor/bank.py); None: its default
    ):
        super().__init__()
        if is_dataclass(net):
            net = asdict(net)
        # plain containers only: a DictConfig value in the hyper-parameters
        # would make the checkpoint unloadable with torch.load(weights_only=True)
        net = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, Container) else v
               for k, v in net.items()}
        net.pop("_target_", None)
        self.save_hyperparameters(
            {
                "net": net,
                "loss": loss,
                "pos_weight": pos_weight,
                "focal_gamma": focal_gamma,
                "train_metrics_every": train_metrics_every,
            },
            logger=False,
        )
        if loss not in LOSSES:
            raise ValueError(f"model: key 'loss' must be one of {LOSSES}, got {loss!r}")
        num = (int, float)
        for key, value, ok, want in (  # a negative pos_weight makes the loss unbounded below
            ("pos_weight", pos_weight, pos_weight is None or isinstance(pos_weight, num) and pos_weight > 0,
             "null or a number > 0"),
            ("focal_gamma", focal_gamma, isinstance(focal_gamma, num) and focal_gamma >= 0, "a number >= 0"),
            ("train_metrics_every", train_metrics_every, type(train_metrics_every) is int and train_metrics_every >= 1,
             "an int >= 1"),
        ):
            if isinstance(value, bool) or not ok:
                raise ValueError(f"model: key '{key}' = {value!r}: must be {want}")
        self.config = PredictorConfig.from_dict(net)
        self.net = ExpertPredictor(self.config)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss_name, self.pos_weight, self.focal_gamma = loss, pos_weight, focal_gamma
        self.train_metrics_every = train_metrics_every
        if bank_memo_mb is not None and (isinstance(bank_memo_mb, bool) or not isinstance(bank_memo_mb, int)
                                         or bank_memo_mb < 0):
            raise ValueError(f"model: key 'bank_memo_mb' must be an int >= 0 (MB; 0 = no memo), got {bank_memo_mb!r}")
        if bank_memo_mb is not None and self.net.bank is not None:
            self.net.bank.memo_bytes = bank_memo_mb << 20
        c = self.config
        self.train_metrics = ExpertMetrics(c.num_layers, c.num_experts, c.top_k)
        self.val_metrics = ExpertMetrics(c.num_layers, c.num_experts, c.top_k)
        self.test_metrics = ExpertMetrics(c.num_layers, c.num_experts, c.top_k)
        self.last_report: dict[str, dict] = {}
        self.last_histograms: dict[str, tuple] = {}  # stage -> (routed, unrouted) sigmoid histograms (calibration)
        if compile:
            self.net = torch.compile(self.net)

    def forward(self, token_ids: torch.Tensor, experts: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(token_ids, experts, gate=gate)

    def setup(self, stage: str) -> None:
        """A routing bank holds the train split's routing: built here from the DataModule's rows (a
        checkpoint restored afterwards replaces it, and its buffers take the stored size)."""
        bank = getattr(self.net, "_orig_mod", self.net).bank
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if bank is None or bank.rows or datamodule is None:
            return
        t0 = time.perf_counter()
        rows = datamodule.routing_rows(datamodule.train_split)
        bank.fill_from_rows(*rows)
        log.info("routing bank: %d rows of %d train tokens (%.1f s)", bank.rows, len(rows[0]), time.perf_counter() - t0)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A routing bank saved before a prompt's copies shared one label (session 23) is relabelled as the
        loader labels them now (`TraceDataModule.groups`), so that a resumed run keeps every copy of a
        row's prompt out of its vote; later checkpoints are unchanged by it."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        groups = getattr(datamodule, "groups", None)
        state = checkpoint.get("state_dict", {})
        for name in [n for n in state if n.endswith("bank.sequences")] if groups else []:
            labels = state[name]
            state[name] = torch.tensor([groups.get(s, s) for s in labels.tolist()], dtype=labels.dtype)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The trace meta (its token space included) travels with every checkpoint, so that a `.ckpt`
        given to evaluation or the runtime can be checked against their traces (export.load_predictor)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "checkpoint_meta"):
            checkpoint["predictor_meta"] = datamodule.checkpoint_meta()

    def _step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        # (B, T), (B, T, L, k), (B, T), (B,), (B, T) positions in the row; (B, T, L, G) gate picks or None
        token_ids, experts, mask, sequences, positions, gate = unpack(batch)
        # the routing bank (if any) must not read the batch's own prompts: they may be in it (train split);
        # with positions it memoises its votes (they have no learned parameter), so later epochs are faster
        logits = self.net(token_ids, experts, exclude=sequences, sample_positions=positions, gate=gate)  # (B, T, L, E)
        target = targets_multi_hot(experts, self.config.num_experts)  # (B, T, L, E)
        loss = masked_multilabel_loss(logits, target, mask, self.loss_name, self.pos_weight, self.focal_gamma)
        n_tokens = int(mask.sum())
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=max(1, n_tokens),
            sync_dist=stage != "train",
        )
        if stage != "train" or batch_idx % self.train_metrics_every == 0:
            getattr(self, f"{stage}_metrics").update(logits[mask].detach(), experts[mask], positions[mask])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", batch_idx)

    def _epoch_end(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_metrics")
        if metric.update_count == 0:
            return
        report = metric.compute()
        self.last_histograms[stage] = (metric.pos_hist.cpu().numpy().copy(), metric.neg_hist.cpu().numpy().copy())
        metric.reset()
        self.last_report[stage] = report
        flat = scalars(report)
        logged = {
            f"{stage}/{k}": v
            for k, v in flat.items()
            if k
            in (
                f"recall@{self.config.top_k}",
                "f1_micro",
                "f1_macro_layers",
                "pr_auc",
                "ece",
                "precision",
                "recall",
                "moebeyond/accuracy",
                "moebeyond/f1_macro01",
            )
        }
        self.log_dict(logged, sync_dist=True)  # equal on every rank (the metric syncs); quiets DDP warnings
        # a name that does not depend on k, for checkpoint monitors and sweeps
        self.log(f"{stage}/recall@k", flat[f"recall@{self.config.top_k}"], prog_bar=True, sync_dist=True)
        if stage != "train" and not self.trainer.sanity_checking:
            self._log_per_layer(stage, report)
            if self.trainer.is_global_zero:
                log.info(
                    "epoch %d step %d %s: recall@%d %.4f  f1 %.4f  pr_auc %.4f",
                    self.current_epoch,
                    self.global_step,
                    stage,
                    self.config.top_k,
                    flat[f"recall@{self.config.top_k}"],
                    flat["f1_micro"],
                    flat["pr_auc"],
                )

    def on_train_epoch_end(self):
        self._epoch_end("train")

    def on_validation_epoch_end(self):
        self._epoch_end("val")

    def on_test_epoch_end(self):
        self._epoch_end("test")

    def _log_per_layer(self, stage: str, report: dict) -> None:
        """Per-layer recall@k and F1: a W&B table + line plot when logging to W&B (global rank 0)."""
        if self.trainer is None or not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import WandbLogger

        k = self.config.top_k
        rec, f1 = report[f"recall@{k}/layer"], report["f1/layer"]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                rows = [[i, float(r), float(f)] for i, (r, f) in enumerate(zip(rec, f1))]
                table = wandb.Table(columns=["layer", f"recall@{k}", "f1"], data=rows)
                logger.experiment.log(
                    {
                        f"{stage}/per_layer": table,
                        f"{stage}/per_layer_recall": wandb.plot.line(
                            table, "layer", f"recall@{k}", title=f"{stage} recall@{k} per MoE layer"
                        ),
                        "trainer/global_step": self.global_step,
                    }
                )

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
        optimizer = self.optimizer_factory(
            params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        )
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=max(1, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
