"""Resume: an interrupted run resumed from last.ckpt ends exactly like the uninterrupted one (CPU);
SIGTERM leaves a resumable checkpoint and a non-zero exit; the batch sampler follows the trainer's epoch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from synthetic import TINY_NET, random_traces, train_cfg

from predictor.batching import TokenBudgetBatchSampler
from predictor.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40
RUN = [*TINY_NET, "logger=none", "trainer.enable_progress_bar=false", "model.train_metrics_every=1",
       "model.net.dropout=0.1", "trainer.max_epochs=3"]  # dropout: the RNG state must resume too


class SigtermAt(Callback):
    """Sends this process SIGTERM after training batch `step` (global), or after epoch `epoch`'s validation."""

    def __init__(self, step: int | None = None, epoch: int | None = None):
        self.step, self.epoch = step, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module):
        if self.epoch is not None and trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


class SigintAt(Callback):
    """Sends this process Ctrl-C's SIGINT `times` times at the start of training batch `step` (global):
    inside the batch, where a KeyboardInterrupt could land anywhere (once in the datasets library)."""

    def __init__(self, step: int, times: int = 1):
        self.step, self.times = step, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t"
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=16).path


def _train(traces, out, *extra):
    from predictor.training import train

    return train(train_cfg([f"data.path={traces}", *RUN, *extra], out))


def _held_out(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(("final/", "val/"))}


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


LAYER_AHEAD = ["model=layer_ahead", "model.net.memory_heads=1", "model.net.memory_size=8", "model.net.bank_size=4",
               "model.net.bank_recent=4"]  # the bank memoises votes in memory: a resumed run recomputes them


@pytest.fixture(scope="module")
def straight(traces, tmp_path_factory):
    runs = {}

    def run(model: str):
        if model not in runs:
            out = tmp_path_factory.mktemp(f"straight_{model}")
            runs[model] = out, _train(traces, out, *(LAYER_AHEAD if model == "layer_ahead" else []))
        return runs[model]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("model, stop", [("token_ahead", "+callbacks.stop.epoch=0"), ("token_ahead", "+callbacks.stop.step=9"),
                                         ("layer_ahead", "+callbacks.stop.step=9"), ("token_ahead", "ctrl_c_step=4")],
                         ids=["epoch_end", "mid_epoch", "layer_ahead_mid_epoch", "ctrl_c_in_an_epochs_last_batch"])
def test_interrupted_run_resumes_exactly(traces, straight, tmp_path, model, stop):
    ref_dir, ref = straight(model)
    stopper = ["+callbacks.stop._target_=test_resume.SigtermAt", stop, *(LAYER_AHEAD if model == "layer_ahead" else [])]
    if stop.startswith("ctrl_c"):  # Ctrl-C in the batch before a validation: that validation still runs
        stopper = ["+callbacks.stop._target_=test_resume.SigintAt", "+callbacks.stop.step=4"]
    with pytest.raises(SIGTERMException) as stopped:
        _train(traces, tmp_path / "a", *stopper)
    assert stopped.value.code == (130 if stop.startswith("ctrl_c") else 143)  # non-zero, like a process the signal kills
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and "rng_states" in state  # epoch 0 done (5 batches), or 4 batches into epoch 1
    assert state["global_step"] == (9 if "step=9" in stop else 5)  # saved after the batch that got the signal
    assert not (tmp_path / "a" / "predictor.safetensors").exists()
    resumed = _train(traces, tmp_path / "b", f"ckpt_path={ckpt}", *stopper[2:])
    assert _held_out(resumed) == _held_out(ref) and _held_out(ref)
    a, b = _weights(ref_dir), _weights(tmp_path / "a")  # the resumed run checkpoints in the run it resumes
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((ref_dir / "metrics.json").read_text())["val_report"]
    rb = json.loads((tmp_path / "b" / "metrics.json").read_text())["val_report"]
    assert ra == rb


@pytest.mark.slow
def test_sigterm_from_outside_leaves_a_resumable_checkpoint(traces, tmp_path):
    """`kill -TERM` on a running `python train.py`: non-zero exit, a last.ckpt that resumes."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), f"data.path={traces}", *RUN[:-1], "trainer.max_epochs=1000",
           f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), proc.stdout.read()[-3000:] if proc.poll() is not None else "no checkpoint in 300 s"
        first = load_checkpoint(last)["global_step"]
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, output[-3000:]
    assert "SIGTERM" in output and "resume with the same overrides" in output
    state = load_checkpoint(last)
    assert state["global_step"] >= first and "rng_states" in state and state["loops"]["fit_loop"]
    assert not (run / "predictor.safetensors").exists()
    # it resumes: one more epoch from where it stopped
    metrics = _train(traces, tmp_path / "resumed", f"ckpt_path={last}", f"trainer.max_epochs={state['epoch'] + 2}")
    assert "final/val/recall@k" in metrics
    assert load_checkpoint(last)["epoch"] == state["epoch"] + 1  # it checkpoints where it resumed from


def test_sampler_follows_set_epoch_and_resumes_mid_epoch():
    lengths = np.arange(1, 41)
    s = TokenBudgetBatchSampler(lengths, batch_tokens=40, max_batch_size=4, shuffle=True, seed=3)
    assert s.sampler is s  # where Lightning's _set_sampler_epoch looks for set_epoch
    epoch0, epoch1 = list(s), list(s)
    assert epoch0 != epoch1 and sorted(map(sorted, epoch0)) == sorted(map(sorted, epoch1))
    s.set_epoch(1)
    assert list(s) == epoch1  # the order depends on the epoch alone
    fresh = TokenBudgetBatchSampler(lengths, batch_tokens=40, max_batch_size=4, shuffle=True, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == epoch1  # a resumed run (new sampler, epoch from the trainer) replays epoch 1's order
    fresh.resume(1, 3)
    assert list(fresh) == epoch1[3:] and fresh.started == (1, 3)
    epoch2 = list(fresh)  # then whole epochs again
    s.set_epoch(2)
    assert epoch2 == list(s) and fresh.started == (2, 0)


def test_loader_state_round_trip(tmp_path):
    from predictor.data import TraceDataModule

    path = random_traces(tmp_path / "t", num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=16).path
    dm = TraceDataModule(str(path), window=8, context=2, batch_tokens=16, max_batch_size=2)
    loader = dm.train_dataloader()
    n = len(loader)
    it = iter(loader)
    seen = [next(it)[0] for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    rest = [b[0] for b in it]
    assert loader.state_dict() == {"epoch": 0, "batches": n}
    again = dm.train_dataloader()  # a fresh loader, as on resume
    again.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip([b[0] for b in again], rest))
    assert len(seen) + len(rest) == n
    after_epoch = dm.train_dataloader()
    after_epoch.load_state_dict({"epoch": 0, "batches": n})  # saved at the end of epoch 0: epoch 1 next
    epoch1 = [b[0] for b in after_epoch]
    assert len(epoch1) == n and after_epoch.state_dict() == {"epoch": 1, "batches": n}


def test_a_checkpoint_is_resumed_only_as_its_run_read_its_data_and_train_false_exports_it(traces, tmp_path, caplog):
    from predictor.export import load_predictor

    _train(traces, tmp_path / "a", "trainer.max_epochs=1")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"other data settings \(split_seed: 0 -> 1\)"):
        _train(traces, tmp_path / "b", f"ckpt_path={ckpt}", "data.seed=1", "trainer.max_epochs=2")
    with pytest.raises(ValueError, match=r"window: .* -> 12"):
        _train(traces, tmp_path / "b", f"ckpt_path={ckpt}", "data.window=12", "trainer.max_epochs=2")
    with pytest.raises(ValueError, match="train=false .* give ckpt_path"):
        _train(traces, tmp_path / "c", "train=false")
    with pytest.raises(ValueError, match="artifact='my model': a W&B artifact name"):  # W&B refused it after training
        _train(traces, tmp_path / "c", "artifact='my model'")
    for epochs in (0, -1):  # untrained weights exported; an endless run Lightning's schedule overflows on
        with pytest.raises(ValueError, match=rf"trainer.max_epochs={epochs}: epochs to train, >= 1"):
            _train(traces, tmp_path / "c", f"trainer.max_epochs={epochs}")
    assert not (tmp_path / "c" / "predictor.safetensors").exists()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="trainer.accelerator=gpu .* torch sees no CUDA device"):
            _train(traces, tmp_path / "c", "trainer=gpu")
    # a checkpoint kept in a folder of another name: resumed into the new run's own checkpoints/, not beside it
    import shutil

    (tmp_path / "keep").mkdir()
    shutil.copy(ckpt, tmp_path / "keep" / "epoch.ckpt")
    (tmp_path / "keep" / "last.ckpt").write_text("someone else's")
    with caplog.at_level("WARNING", logger="predictor.resume"):
        _train(traces, tmp_path / "k", f"ckpt_path={tmp_path / 'keep' / 'epoch.ckpt'}", "trainer.max_epochs=2")
    # a run of another length: its learning rate follows the new one, so it is said (a choice, not an error)
    assert load_checkpoint(ckpt)["run_length"] == {"max_epochs": 1, "max_steps": -1}
    assert "its run had trainer.max_epochs=1, this one 2: the learning rate's schedule" in caplog.text
    assert (tmp_path / "keep" / "last.ckpt").read_text() == "someone else's"
    assert (tmp_path / "k" / "checkpoints" / "last.ckpt").is_file()
    # exported under another split, its file would name prompts it trained on as held out
    with pytest.raises(ValueError, match=r"other data settings \(split_seed: 0 -> 1\); export it with the data"):
        _train(traces, tmp_path / "c", "train=false", f"ckpt_path={ckpt}", "data.seed=1")
    _train(traces, tmp_path / "w", "train=false", f"ckpt_path={ckpt}", "data.window=12")  # the split is the run's
    _train(traces, tmp_path / "c", "train=false", f"ckpt_path={ckpt}")  # validates and exports its weights
    saved = load_checkpoint(ckpt)["state_dict"]
    exported = load_predictor(tmp_path / "c" / "predictor.safetensors").state_dict()
    assert all(torch.equal(exported[k], saved[f"net.{k}"]) for k in exported)


def test_ctrl_c_stops_after_the_running_batch_and_twice_at_once(traces, tmp_path):
    """One Ctrl-C during fit: Lightning's SIGTERM path (the running batch completes, then last.ckpt, exit 130);
    a second one stops at once, in the handler (Lightning's KeyboardInterrupt exit, 1). A run started with
    SIGINT ignored keeps ignoring it. Ctrl-C after fit is Python's own again."""
    stop = ["+callbacks.stop._target_=test_resume.SigintAt", "+callbacks.stop.step=7"]
    with pytest.raises(SIGTERMException) as stopped:
        _train(traces, tmp_path / "a", *stop)
    assert stopped.value.code == 130
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 8 and "rng_states" in state  # batch 7 was trained before it stopped
    with pytest.raises(KeyboardInterrupt):  # after fit, a Ctrl-C interrupts at once (whichever handler is left)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    with pytest.raises(SystemExit) as stopped:
        _train(traces, tmp_path / "b", *stop, "+callbacks.stop.times=2")
    assert stopped.value.code == 1 and not isinstance(stopped.value, SIGTERMException)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == 7  # before batch 7 ran
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `python train.py &` from a script, `trap '' INT`
    try:
        _train(traces, tmp_path / "c", *stop, "trainer.max_epochs=2")
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert load_checkpoint(tmp_path / "c" / "checkpoints" / "last.ckpt")["global_step"] == 10  # ran to its end
    _train(traces, tmp_path / "d", "trainer.max_epochs=1")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
