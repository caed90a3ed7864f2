"""`train(cfg)`: build data, model, loggers, callbacks and trainer from a Hydra config; fit; export.

Writes into the run directory (Hydra's runtime.output_dir, `paths.output_dir`):
    checkpoints/          Lightning checkpoints (best by val/recall@k, and last)
    predictor.safetensors the exported predictor (best checkpoint's weights), loads with plain torch
    metrics.json          final held-out metrics (scalars, per-layer and per-position lists), timing
    csv/ or wandb/        logger output
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from predictor.checkpoint import load_checkpoint
from predictor.export import export_predictor
from predictor.metrics import to_jsonable

log = logging.getLogger(__name__)


class TokenThroughput(Callback):
    """Logs scored training tokens per second (`train/tokens_per_s`) and keeps totals for the report."""

    def __init__(self, log_every_n_steps: int = 50):
        self.log_every_n_steps = log_every_n_steps
        self.tokens = 0
        self.train_seconds = 0.0
        self._t0 = None
        self._window = (0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        n = int(batch[2].sum())
        self.tokens += n
        self.train_seconds += dt
        wn, wt = self._window
        self._window = (wn + n, wt + dt)
        if (batch_idx + 1) % self.log_every_n_steps == 0 and self._window[1] > 0:
            pl_module.log("train/tokens_per_s", self._window[0] / self._window[1])
            self._window = (0, 0.0)

    def state(self) -> dict:
        return {
            "train_tokens": self.tokens,
            "train_step_seconds": self.train_seconds,
            "train_tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else None,
        }


def instantiate_list(cfg: DictConfig | None, what: str) -> list:
    """Instantiate every `_target_` entry of a callbacks/logger group (None -> [])."""
    out = []
    if not cfg:
        return out
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("instantiating %s <%s>", what, conf._target_)
            out.append(instantiate(conf))
        elif conf is not None:
            raise ValueError(f"{what}.{name}: expected a mapping with _target_, got {conf!r}")
    return out


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def finish_wandb() -> None:
    """End the W&B run (Hydra multirun reuses the process: the next job must start a fresh run)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def train(cfg: DictConfig) -> dict:
    """Train per `cfg` (see conf/train.yaml); returns the final metrics dict (floats)."""
    start = time.perf_counter()
    try:
        return _train(cfg, start)
    finally:
        finish_wandb()


def _train(cfg: DictConfig, start: float) -> dict:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    dims = datamodule.model_dims()
    log.info("traces %s: %s", cfg.data.path, dims)
    model = instantiate(cfg.model, net=dims)
    log.info("predictor: %s, %.2f M parameters", model.config.mode, model.net.num_params() / 1e6)

    callbacks = instantiate_list(cfg.get("callbacks"), "callbacks")
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    loggers = instantiate_list(cfg.get("logger"), "logger")
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger; it has nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams({"cfg": resolved, "num_params": model.net.num_params()})

    metrics: dict = {}
    if cfg.get("train", True):
        if cfg.get("ckpt_path"):
            load_checkpoint(cfg.ckpt_path)  # a clear error for a file that is not a plain checkpoint
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    fit_seconds = time.perf_counter() - start

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        log.info("best checkpoint: %s", best)
        state = load_checkpoint(best)["state_dict"]
        model.load_state_dict(state)

    report = {}
    if cfg.get("validate", True):
        # final held-out numbers with the best weights (the split every report uses: data.val_split)
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        metrics.update({f"final/{k}": float(v) for k, v in (results[0] if results else {}).items()})
        report = to_jsonable(model.last_report.get("val", {}))

    timing = {"wall_seconds": time.perf_counter() - start, "fit_seconds": fit_seconds}
    if throughput is not None:
        timing.update(throughput.state())
    metrics.update({k: v for k, v in timing.items() if isinstance(v, (int, float))})

    if trainer.is_global_zero:
        meta = datamodule.describe()
        meta.update(
            {
                "metrics": {k: v for k, v in report.items() if not isinstance(v, list)},
                "checkpoint": best or None,
                "train_tokens_per_epoch": datamodule.num_scored_tokens(datamodule.train_split),
                "window": datamodule.window,
                "context": datamodule.context,
            }
        )
        if cfg.get("export", True):
            path = export_predictor(model.net, out / "predictor.safetensors", meta)
            log.info("exported predictor: %s", path)
            metrics["predictor_path"] = str(path)
        with open(out / "metrics.json", "w") as f:
            json.dump(
                {
                    "metrics": {k: v for k, v in metrics.items()},
                    "val_report": report,
                    "timing": timing,
                    "mode": model.config.mode,
                    "lookahead": model.config.lookahead,
                    "num_params": model.net.num_params(),
                },
                f,
                indent=2,
            )
    return metrics
