"""Checkpoints load with weights_only: a crafted .ckpt runs no code, and our own training's files still load."""

import pickle
import re
from pathlib import Path

import pytest
import torch
from synthetic import TINY_NET, random_traces, train_cfg

from predictor.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40
TINY = [*TINY_NET, "trainer.enable_progress_bar=false", "logger=none"]


class _Payload:
    """Unpickling this creates `marker`: what a crafted checkpoint could do instead of `open`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_malicious(path: Path, marker: Path, how: str) -> None:
    payload = {"hyper_parameters": {"net": _Payload(marker)}, "state_dict": {}}
    if how == "torch.save":  # the zip format Lightning writes
        torch.save(payload, path)
    else:  # a bare pickle, which torch.load also reads
        with open(path, "wb") as f:
            pickle.dump(payload, f)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_runs_no_code(tmp_path, how):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    _write_malicious(path, marker, how)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
        load_checkpoint(path)
    assert "refused to load" in str(err.value)
    if how == "torch.save":
        assert "io.open" in str(err.value)  # names what the file tried to call
    from predictor.evaluation import load_model  # evaluate.py ckpt_path=... goes through load_checkpoint

    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_model(path)
    assert not marker.exists()


def test_unreadable_checkpoints_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape(str(garbage))):
        load_checkpoint(garbage)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, full)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(full.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(truncated)
    big = tmp_path / "big.ckpt"  # cut inside its data, a zip reader fails with OSError rather than RuntimeError
    torch.save({"state_dict": {"w": torch.ones(2**16)}}, big)
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated)) + ": not a readable torch checkpoint"):
        load_checkpoint(truncated)
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2], listed)
    with pytest.raises(CheckpointError, match="must hold a dict"):
        load_checkpoint(listed)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.ckpt")


_train_cfg = train_cfg


@pytest.mark.slow
def test_trained_checkpoints_load_safely_and_resume(tmp_path):
    """A real run's .ckpt files need no allow-listed class; evaluate loads them and training resumes."""
    from predictor.evaluation import load_model
    from predictor.export import load_predictor
    from predictor.training import train

    traces = random_traces(tmp_path / "t", num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=12).path
    common = [f"data.path={traces}", *TINY]
    train(_train_cfg([*common, "trainer.max_epochs=1"], tmp_path / "run"))
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for ckpt in ckpts:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
        assert type(load_checkpoint(ckpt)["hyper_parameters"]["net"]) is dict  # plain containers only
    exported, meta = load_predictor(tmp_path / "run" / "predictor.safetensors", with_meta=True)
    best = meta["checkpoint"]  # the exported weights are the best checkpoint's
    assert best in map(str, ckpts)
    ids, ex = torch.randint(0, V, (1, 6)), torch.randint(0, E, (1, 6, L, K))
    with torch.no_grad():
        torch.testing.assert_close(load_model(best)(ids, ex), exported(ids, ex))

    # resuming goes through Lightning's loader with weights_only=True
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(_train_cfg([*common, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed"))
    assert load_checkpoint(last)["epoch"] == 1  # a resumed run checkpoints in the folder it resumed from

    # and a crafted resume file is refused before any training
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    _write_malicious(evil, marker, "torch.save")
    with pytest.raises(CheckpointError, match=re.escape(str(evil))):
        train(_train_cfg([*common, f"ckpt_path={evil}"], tmp_path / "evil_run"))
    assert not marker.exists()
