"""`train(cfg)`: build data, model, loggers, callbacks and trainer from a Hydra config; fit; export.

Writes into the run directory (Hydra's runtime.output_dir, `paths.output_dir`):
    checkpoints/          Lightning checkpoints (best by val/recall@k, and last)
    predictor.safetensors the exported predictor (best checkpoint's weights), loads with plain torch
    metrics.json          final held-out metrics (scalars, per-layer and per-position lists), timing
    csv/ or wandb/        logger output; with a wandb logger the exported predictor (+ metrics.json) is also
                          a W&B "model" artifact (predictor/tracking.py), input to `evaluate.py ckpt_path=wandb-artifact://...`
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import time
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from predictor.atomic import write_text_atomic
from predictor.calibration import fit_calibration
from predictor.checkpoint import load_checkpoint
from predictor.config import PredictorConfigError
from predictor.config_schema import check_config
from predictor.export import export_predictor, read_predictor_meta
from predictor.metrics import to_jsonable
from predictor.resume import ResumeState, check_resume, warn_run_length
from predictor.tracking import log_predictor_artifact

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


def finish_wandb(exit_code: int = 0) -> None:
    """End the W&B run (Hydra multirun reuses the process: the next job must start a fresh run); a run
    that raised is marked failed, not finished."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def single_lightning_log() -> None:
    """`import lightning` gives its "lightning" logger a console handler of its own, and the logger also
    propagates to the root handlers Hydra sets up: every Lightning INFO line would print twice. When
    the root logger has handlers, they alone print it (and Hydra's log file gets it too)."""
    import lightning

    own = getattr(lightning, "_console", None)
    if logging.getLogger().handlers and own in logging.getLogger("lightning").handlers:
        logging.getLogger("lightning").removeHandler(own)


def job_overrides() -> tuple[str | None, str]:
    """(the command line of this job, Hydra's `hydra.job.override_dirname`), when Hydra composed the config."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, ""
    hc = HydraConfig.get()
    return " ".join(["python train.py", *map(shlex.quote, hc.overrides.task)]), hc.job.override_dirname or ""


def distinct_run_names(cfg: DictConfig) -> None:
    """Each job of a multirun sweep (and any run with overrides) gets its own W&B run name: the configured
    name plus the job's overrides, e.g. `train-token_ahead[model.net.d_model=64]`."""
    wb = (cfg.get("logger") or {}).get("wandb")
    _, overrides = job_overrides()
    if wb is not None and wb.get("name") and overrides:
        with open_dict(cfg):
            wb.name = f"{wb.name}[{overrides}]"


def train(cfg: DictConfig) -> dict:
    """Train per `cfg` (see conf/train.yaml); returns the final metrics dict (floats)."""
    start = time.perf_counter()
    single_lightning_log()
    exit_code = 1
    try:
        metrics = _train(cfg, start)
        exit_code = 0
        return metrics
    except SIGTERMException as e:  # a SystemExit whose code is None: `python train.py` would exit 0
        # 143, as for a process SIGTERM kills; 130 for a Ctrl-C (predictor/resume.py hands it over as SIGTERM)
        raise SIGTERMException(128 + (signal.SIGINT if getattr(e, "ctrl_c", False) else signal.SIGTERM)) from e
    finally:
        finish_wandb(exit_code)


def sweep_value(cfg: DictConfig, metrics: dict) -> float | None:
    """The value train.py returns to a sweeper: metrics[cfg.optimized_metric]. Under a sweeper that reads it
    (Optuna's, not Hydra's basic grid) a name the run did not log is an error naming it: the search would
    otherwise optimise something else, or abort on None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = cfg.get("optimized_metric")
    if name is None or name in metrics:
        return None if name is None else metrics[name]
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN and not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        logged = sorted(k for k, v in metrics.items() if isinstance(v, float))
        raise KeyError(f"optimized_metric={name}: this run logged no such metric; it logged {logged}")
    return None


def build(node: DictConfig, **kwargs):
    """instantiate(node), raising our own error (it names the key) rather than Hydra's wrapper of it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):  # PredictorConfigError, "data: key ...", TraceFormatError
            raise e.__cause__ from None
        raise


def check_train_settings(cfg: DictConfig) -> None:
    """The settings a run would otherwise refuse late or obey wrongly, named before any work."""
    artifact = cfg.get("artifact")
    if artifact is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", str(artifact)):  # W&B refused it after training
        raise ValueError(f"artifact={artifact!r}: a W&B artifact name holds letters, digits, '-', '_' and '.', "
                         "at most 128 of them")
    if not cfg.get("train", True) and not cfg.get("ckpt_path"):  # it would export untrained weights
        raise ValueError("train=false validates, tests and exports the weights of a checkpoint: give ckpt_path=<.ckpt>")
    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={cfg.trainer.accelerator} (trainer=gpu or ddp) but torch sees no CUDA "
                         "device: trainer.accelerator=cpu runs here")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
    if cfg.get("train", True) and int(steps or -1) <= 0 and int(epochs or 0) < 1:
        raise ValueError(f"trainer.max_epochs={epochs}: epochs to train, >= 1 (or trainer.max_steps > 0): the learning "
                         "rate's schedule needs a run of known length, and 0 would export untrained weights; "
                         "trainer.max_time caps the wall time")


def _train(cfg: DictConfig, start: float) -> dict:
    check_config(cfg, "train")  # `+trainer.max_epoch=3` and other typos: an error naming the key
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)

    check_train_settings(cfg)
    datamodule = build(cfg.data)
    if cfg.get("test") and not datamodule.test_split:  # before training, not after it
        raise ValueError("test=true needs data.test_split: a split of data.split kept from checkpoint selection "
                         "(e.g. data.split.train=0.7 data.split.val=0.1 +data.split.test=0.2 data.test_split=test)")
    dims = datamodule.model_dims()
    log.info("traces %s: %s", cfg.data.path, dims)
    try:
        model = build(cfg.model, net=dims)
    except PredictorConfigError as e:  # e.g. lookahead >= L: say where L comes from
        raise PredictorConfigError(f"model.net: {e} (the traces at {cfg.data.path} have L, E, k = "
                                   f"{dims['num_layers']}, {dims['num_experts']}, {dims['top_k']})") from None
    datamodule.gate_inputs = model.config.gate_inputs  # the batches carry the gate's picks it reads
    log.info("predictor: %s, %.2f M parameters", model.config.mode, model.net.num_params() / 1e6)

    if cfg.get("ckpt_path"):  # before a logger starts a run: a clear error for a file that is not a plain
        # checkpoint, or one of a run that read its data otherwise (train=false: that split its data otherwise,
        # which the exported file would record as its held-out prompts)
        source = load_checkpoint(cfg.ckpt_path)  # (train=false: the weights exported below, read once)
        check_resume(source.get("predictor_meta"), datamodule, cfg.ckpt_path, resuming=cfg.get("train", True))
        if cfg.get("train", True):
            warn_run_length(source.get("run_length"), cfg.trainer, cfg.ckpt_path)
            del source  # fit reads it itself
    callbacks = instantiate_list(cfg.get("callbacks"), "callbacks")
    throughput = next((c for c in callbacks if isinstance(c, TokenThroughput)), None)
    distinct_run_names(cfg)
    loggers = instantiate_list(cfg.get("logger"), "logger")
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger; it has nothing to write to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(ResumeState(out / "checkpoints"))  # RNG states in checkpoints; last.ckpt on SIGTERM
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams({"cfg": resolved, "num_params": model.net.num_params()})

    metrics: dict = {}
    if cfg.get("train", True):
        folder = Path(cfg.ckpt_path).resolve().parent if cfg.get("ckpt_path") else None
        if folder is not None and folder.name == "checkpoints":  # a run's own folder: the run goes on there, so
            for ckpt in trainer.checkpoint_callbacks:  # its best checkpoint stays the run's best (a checkpoint kept
                ckpt.dirpath = str(folder)  # elsewhere: this run's folder, not a last.ckpt beside it overwritten)
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    fit_seconds = time.perf_counter() - start

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not cfg.get("train", True):  # the weights to validate, test and export are ckpt_path's
        best = str(cfg.ckpt_path)
    if best:
        log.info("best checkpoint: %s", best)
        model.load_state_dict((source if not cfg.get("train", True) else load_checkpoint(best))["state_dict"])

    # final numbers with the best weights: on the held-out split every report uses (data.val_split) and,
    # with test=true, on data.test_split, prompts that took no part in choosing them
    for run, wanted in ((trainer.validate, cfg.get("validate", True)), (trainer.test, cfg.get("test"))):
        if wanted:
            results = run(model, datamodule=datamodule, verbose=False)
            if trainer.received_sigterm:  # fit finished (last.ckpt is whole); stop before exporting
                raise SIGTERMException
            metrics.update({f"final/{k}": float(v) for k, v in (results[0] if results else {}).items()})
    report = to_jsonable(model.last_report.get("val", {})) if cfg.get("validate", True) else {}

    calibration = None
    if datamodule.calib_split and not trainer.fast_dev_run and trainer.is_global_zero:
        # its ECE on the held-out split only where the best weights were just validated there (else the
        # histograms are the last epoch's, of other weights)
        val_histograms = model.last_histograms.get("val") if cfg.get("validate", True) else None
        calibration = fit_calibration(model.net, datamodule, val_histograms, metrics, trainer.strategy.root_device)

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
                "command": job_overrides()[0],  # the model card names the command behind the metrics
            }
        )
        model.net.predictor_meta = meta
        if trainer.fast_dev_run:  # a few batches to test the code path: not a predictor to use
            log.warning("fast_dev_run: no predictor.safetensors exported (the weights are not trained)")
        elif cfg.get("export", True):
            # what the runtime reads beside the weights (kept on the module too, for save_pretrained)
            model.net.reuse_hazard, model.net.calibration = datamodule.reuse_hazard(), calibration
            path = export_predictor(model.net, out / "predictor.safetensors", meta)
            log.info("exported predictor: %s", path)
            metrics["predictor_path"] = str(path)
        summary = {
            "metrics": {k: v for k, v in metrics.items()},
            "val_report": report,
            "timing": timing,
            "mode": model.config.mode,
            "lookahead": model.config.lookahead,
            "num_params": model.net.num_params(),
            "fast_dev_run": bool(trainer.fast_dev_run),
        }
        write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2))
        run = next((lg.experiment for lg in loggers if isinstance(lg, WandbLogger)), None)
        if run is not None and "predictor_path" in metrics:  # the exported predictor as a W&B model artifact
            art = log_predictor_artifact(run, path, read_predictor_meta(path)[1], cfg.get("artifact"),
                                         [out / "metrics.json"])  # fmt: skip
            metrics["predictor_artifact"] = art.name
    return metrics
