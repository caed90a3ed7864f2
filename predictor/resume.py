"""Resuming training exactly: the train loader's position and the RNG states go into every checkpoint,
and an interrupt (SIGTERM, Ctrl-C) leaves a resumable `last.ckpt` before the run exits non-zero.

    python train.py <the same overrides> ckpt_path=<run dir>/checkpoints/last.ckpt

continues where the run stopped and reproduces the uninterrupted run's metrics (CPU; tests/test_resume.py).
What makes it exact:
- TokenBudgetBatchSampler (batching.py) draws each epoch's batch order from (seed, epoch). Lightning passes
  the epoch through `set_epoch`, which it calls on `batch_sampler.sampler` (the sampler points that at
  itself), and the order is drawn at the first batch, after that call.
- ResumableDataLoader has `state_dict` / `load_state_dict`, so Lightning stores its position (epoch,
  batches served) in checkpoints and restores it before the first batch: a run stopped mid-epoch goes
  on with the batches it had not trained on, not with the epoch's first ones again.
- ResumeState stores the torch / Python / CUDA RNG states (dropout) and restores them on resume; on
  SIGTERM or KeyboardInterrupt during fit it saves `last.ckpt` in the checkpoint directory. A Ctrl-C
  during fit is SIGTERM to Lightning: it stops after the running batch (and the validation due after
  it), where the checkpoint resumes exactly; raised anywhere, a KeyboardInterrupt once landed inside
  the datasets library's decoding of a row and left it broken, so no checkpoint was written. A second
  Ctrl-C stops at once, mid-batch: its checkpoint resumes, but not exactly (the batch was drawn, not
  trained).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """The train DataLoader, with the `_Stateful` protocol Lightning's CombinedLoader looks for: its
    state is (epoch, batches served in it); loading it makes the batch sampler skip those batches."""

    _served = 0

    def __iter__(self):
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        sampler = self.batch_sampler
        epoch, skipped = sampler.started or (sampler.epoch, 0)
        return {"epoch": int(epoch), "batches": int(skipped + self._served)}

    def load_state_dict(self, state: dict) -> None:
        epoch, done = int(state["epoch"]), int(state["batches"])
        if done >= len(self.batch_sampler):  # saved after the epoch's last batch: the next epoch, whole
            epoch, done = epoch + 1, 0
        self.batch_sampler.resume(epoch, done)


class ResumeState(Callback):
    """RNG states in checkpoints; a resumable `last.ckpt` in `dirpath` (or the ModelCheckpoint's
    directory) when fit is interrupted by SIGTERM or Ctrl-C."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self._loader_state: dict | None = None
        self._sigint = None  # the SIGINT handler fit replaced (None: not replaced)
        self._signals = None  # Lightning's signal connector of the fit that installed it
        self.ctrl_c = False  # a Ctrl-C came during fit

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ctrl_c = False
        # where a Ctrl-C would interrupt (not in a run started with SIGINT ignored) and signals reach this thread
        if (callable(signal.getsignal(signal.SIGINT)) and threading.current_thread() is threading.main_thread()
                and hasattr(trainer, "_signal_connector")):  # fmt: skip
            self._signals = trainer._signal_connector
            self._sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        if self.ctrl_c or self._sigint is None:
            raise KeyboardInterrupt  # the second: now (or fit is over: Lightning may leave this installed)
        self.ctrl_c = True
        # Lightning's own SIGTERM flag: it stops after the running batch and the validation due after it, the
        # flag broadcast from rank 0 under DDP so every rank stops at the same batch
        self._signals.received_sigterm = True
        log.warning("Ctrl-C: stopping after the running batch, then saving last.ckpt (Ctrl-C again: stop now)")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._sigint is not None:  # validate, test and export after fit answer Ctrl-C as usual
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}
        checkpoint["run_length"] = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}  # its schedule's
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            checkpoint["train_loader"] = loader.state_dict()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning loads a _Stateful loader's state in FitLoop.setup_data, which configure_optimizers'
        # estimated_stepping_batches has already run before the checkpoint is restored: so we do it here,
        # before the first batch (the sampler draws its order lazily, at that batch)
        loader = trainer.train_dataloader
        if self._loader_state is not None and isinstance(loader, ResumableDataLoader):
            loader.load_state_dict(self._loader_state)
        self._loader_state = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._loader_state = checkpoint.get("train_loader")
        states = checkpoint.get("rng_states")
        if not states:  # a checkpoint from before: resumes, but dropout draws differ from the original run
            return
        torch.set_rng_state(states["torch"])
        random.setstate(_as_tuple(states["python"]))
        if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.ctrl_c = self.ctrl_c  # (train() exits 130 for it, 143 for SIGTERM)
        if self._sigint is not None and not isinstance(exception, KeyboardInterrupt):  # (after a KeyboardInterrupt
            signal.signal(signal.SIGINT, self._sigint)  # Lightning ignores SIGINT while it shuts down)
        self._sigint = None
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != "fit":
            return
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        ckpt = trainer.checkpoint_callback
        path = Path(ckpt.dirpath if ckpt is not None and ckpt.dirpath else self.dirpath) / "last.ckpt"
        trainer.save_checkpoint(path)
        what = "Ctrl-C" if self.ctrl_c else type(exception).__name__
        exact = "" if isinstance(exception, SIGTERMException) else " (mid-batch: it resumes, not exactly)"
        log.warning(
            "%s at epoch %d, step %d: saved %s%s; resume with the same overrides and ckpt_path=%s",
            what, trainer.current_epoch, trainer.global_step, path, exact, path,
        )


def _as_tuple(value):
    """random.setstate needs the nested tuples back (a checkpoint may hold lists)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# what a resumed run must read as the checkpoint's run did: its data, split and batching (data.py)
SPLIT_KEYS = ("traces_fingerprint", "split", "split_seed", "train_split", "val_split", "calib_fraction", "max_rows")
RESUME_KEYS = (*SPLIT_KEYS, "window", "context", "batch_tokens", "max_batch_size")


def warn_run_length(saved: dict | None, trainer_cfg, ckpt_path) -> None:
    """Warn where a resumed run is given another length than its checkpoint's run: the learning rate's
    schedule spans the whole run, so the resumed run is no longer the uninterrupted one (a longer run is
    a choice, so this is no error)."""
    for key, was in (saved or {}).items():
        now = trainer_cfg.get(key)
        if now is not None and was is not None and int(now) != int(was):
            log.warning("ckpt_path=%s: its run had trainer.%s=%s, this one %s: the learning rate's schedule "
                        "follows the new length, so this is not the run it interrupted", ckpt_path, key, was, now)


def check_resume(saved: dict | None, datamodule, ckpt_path, resuming: bool = True) -> None:
    """Refuse to resume a run from `ckpt_path` with data settings other than those it saved: the exported
    file would record a split its first epochs did not use (evaluation's held-out check would trust it),
    and the saved loader position would point at other batches. Without `resuming` (train=false: its
    weights validated and exported) only the split must be the run's. Checkpoints without them pass."""
    if not saved:
        return
    now = datamodule.checkpoint_meta()
    changed = [f"{key}: {saved[key]!r} -> {now.get(key)!r}" for key in (RESUME_KEYS if resuming else SPLIT_KEYS)
               if key in saved and _as_tuple(saved[key]) != _as_tuple(now.get(key))]  # lists and tuples alike
    if changed:
        how = ("resume with the overrides of its run, or start a new run without ckpt_path" if resuming else
               "export it with the data overrides of its run (its held-out prompts are those of its own split)")
        raise ValueError(f"ckpt_path={ckpt_path} was trained with other data settings ({'; '.join(changed)}); {how}")
