"""Token-space identities: recorded by every writer, refused when two differ (evaluation, statistics,
training on several trace sets, the runtime), a warning for files written before them; the MoE-Beyond
import into an existing id space with an unknown-token id."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from synthetic import random_traces, tiny_predictor
from test_moebeyond import csv_text, good_member, write_tar

from integrate.runtime.drivers import load_driver_predictor
from predictor.data import TraceDataModule
from predictor.evaluation import evaluate
from predictor.export import export_predictor, load_predictor
from predictor.moebeyond import import_moebeyond
from predictor.moebeyond import main as moebeyond_main
from predictor.stats import compute_stats
from predictor.token_space import (
    UNK,
    TokenSpaceError,
    TokenSpaceWarning,
    check_token_space,
    tokenizer_space,
    vocab_space,
)
from predictor.traces import TraceFormatError, load_traces

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40
SPACE_A, SPACE_B = tokenizer_space("org/model-a"), tokenizer_space("org/model-b")


def traces(path, space, seed=0, **kw):
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, lengths=(5, 12), seed=seed,
                         token_space=space, expert_shape={"hidden": 64, "intermediate": 32, "num_matrices": 3,
                                                          "dtype_bytes": 2}, **kw)


def predictor_file(path, space):
    meta = {} if space is None else {"token_space": space}
    return export_predictor(tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K), path, meta)


def test_identities_and_the_check():
    assert tokenizer_space("./org/model-a/") == SPACE_A == "tokenizer:org/model-a"  # not readable here: the name
    assert vocab_space(["a", "b"]) != vocab_space(["b", "a"])  # ids, not the set of strings
    assert vocab_space(["a", "b"]).startswith("vocab:sha256:")
    check_token_space(SPACE_A, "x", SPACE_A, "y")
    with pytest.raises(TokenSpaceError, match="org/model-a.*org/model-b"):
        check_token_space(SPACE_A, "the traces", SPACE_B, "the predictor")
    with pytest.warns(TokenSpaceWarning, match="the predictor records no token space"):
        check_token_space(SPACE_A, "the traces", None, "the predictor")


def test_a_readable_tokenizer_is_known_by_its_vocabulary_wherever_it_is_loaded_from(tmp_path, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    demo = ROOT / "data/demo/model"
    space = tokenizer_space(AutoTokenizer.from_pretrained(demo))
    assert space.startswith("tokenizer:sha256:")
    moved = shutil.copytree(demo, tmp_path / "elsewhere", ignore=shutil.ignore_patterns("*.safetensors"))
    monkeypatch.chdir(ROOT)
    assert tokenizer_space("data/demo/model") == tokenizer_space("./data/demo/model/") == space
    assert tokenizer_space(str(demo)) == tokenizer_space(moved) == space  # absolute path; a moved copy
    # identities written by name before the hash (the bundled traces once said this) read as the hash
    check_token_space("tokenizer:data/demo/model", "old traces", f"tokenizer:{demo}", "a predictor")
    check_token_space("tokenizer:data/demo/model", "old traces", space, "the served model's tokenizer")
    with pytest.warns(TokenSpaceWarning, match="'org/model-a' cannot be read here"):  # a name it cannot read
        check_token_space(SPACE_A, "the traces", space, "the served model's tokenizer")
    with pytest.raises(TokenSpaceError, match="tokenizer:data/demo/model.*vocab:sha256:"):  # not a tokenizer's ids
        check_token_space("tokenizer:data/demo/model", "the traces", vocab_space(["a", "b"]), "an import")
    broken = tmp_path / "broken"  # there, but no tokenizer in it: known by its absolute path, with a warning
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(TokenSpaceWarning, match=f"tokenizer directory {broken} cannot be read"):
        assert tokenizer_space("broken") == f"tokenizer:{broken}"
    monkeypatch.chdir(ROOT)
    later = tmp_path / "saved-later"  # a directory that does not exist yet is a name, until it is written
    assert tokenizer_space(later) == f"tokenizer:{later}"
    AutoTokenizer.from_pretrained(demo).save_pretrained(later)
    assert tokenizer_space(later) == space
    other = AutoTokenizer.from_pretrained(demo)
    other.add_tokens(["<an added token>"])
    with pytest.raises(TokenSpaceError, match="mean different tokens"):
        check_token_space(space, "the traces", tokenizer_space(other), "the predictor")


def test_writers_record_the_space_and_bad_values_are_refused(tmp_path):
    assert traces(tmp_path / "a", None, tokenizer="org/model-a").meta.token_space == SPACE_A  # derived
    assert load_traces("data/demo/traces").meta.token_space == tokenizer_space(ROOT / "data/demo/model")
    with pytest.raises(TraceFormatError, match="key 'token_space'"):
        traces(tmp_path / "b", "gpt2")
    with pytest.raises(TraceFormatError, match="key 'unk_token_id' = 40 outside"):
        traces(tmp_path / "c", SPACE_A, unk_token_id=V)


def _eval_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_evaluate_refuses_a_predictor_or_train_data_of_another_space(tmp_path):
    a, b = traces(tmp_path / "a", SPACE_A).path, traces(tmp_path / "b", SPACE_B, seed=1).path
    base = [f"data.path={a}", f"paths.output_dir={tmp_path / 'out'}", "baselines=[token_table]",
            "simulate.enabled=false", "plots=false", "wandb.enabled=false"]
    other = predictor_file(tmp_path / "b.safetensors", SPACE_B)
    with pytest.raises(TokenSpaceError, match="org/model-a.*b.safetensors.*org/model-b"):
        evaluate(_eval_cfg([*base, f"ckpt_path={other}"]))
    with pytest.raises(TokenSpaceError, match=f"train_data {b}"):
        evaluate(_eval_cfg([*base, f"train_data={b}"]))
    same = predictor_file(tmp_path / "a.safetensors", SPACE_A)
    assert 0 <= evaluate(_eval_cfg([*base, f"ckpt_path={same}"]))[f"predictor/recall@{K}"] <= 1
    old = predictor_file(tmp_path / "old.safetensors", None)  # exported before token spaces: a warning
    with pytest.warns(TokenSpaceWarning, match="old.safetensors records no token space"):
        evaluate(_eval_cfg([*base, f"ckpt_path={old}"]))


def test_stats_refuses_train_data_of_another_space(tmp_path):
    a, b = traces(tmp_path / "a", SPACE_A), traces(tmp_path / "b", SPACE_B, seed=1)
    with pytest.raises(TokenSpaceError, match="--train-data"):
        compute_stats(a, names=["token_table"], train_ts=b)
    c = traces(tmp_path / "c", SPACE_A, seed=2)
    out = compute_stats(a, names=["token_table"], train_ts=c)  # fitted on c's train prompts, every row of a
    assert out["split"]["val_prompts"] == 10 and out["split"]["train_data"] == str(c.path)
    assert out["split"]["val_tokens"] == int(a.lengths.sum()) and out["split"]["val_prompts_in_train"] == 0
    with pytest.warns(UserWarning, match=f"of the prompts scored in {a.path} are train prompts of {a.path}"):
        out = compute_stats(a, names=["token_table"], train_ts=a)  # nothing else keeps them apart: it says so
    assert 0 < out["split"]["val_prompts_in_train"] <= out["split"]["train_prompts"]


def test_runtime_loader_refuses_a_predictor_of_another_space(tmp_path):
    path = predictor_file(tmp_path / "p.safetensors", SPACE_B)
    with pytest.raises(TokenSpaceError, match="served model's tokenizer.*org/model-a.*p.safetensors"):
        load_driver_predictor(path, L, E, "cpu", SPACE_A)
    assert load_driver_predictor(path, L, E, "cpu", SPACE_B).config.num_layers == L
    old = predictor_file(tmp_path / "old.safetensors", None)
    with pytest.warns(TokenSpaceWarning):
        load_driver_predictor(old, L, E, "cpu", SPACE_A)


def test_checkpoints_carry_the_trace_meta(tmp_path):
    model = tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"net": model.config.to_dict()}, "predictor_meta": {"token_space": SPACE_A},
                "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    loaded, meta = load_predictor(ckpt, with_meta=True)
    assert meta["token_space"] == SPACE_A and loaded.predictor_meta["token_space"] == SPACE_A


def test_training_on_several_sets(tmp_path):
    a, b = traces(tmp_path / "a", SPACE_A, n_prompts=6), traces(tmp_path / "b", SPACE_A, seed=1, n_prompts=4)
    dm = TraceDataModule([str(a.path), str(b.path)], window=8, context=2, batch_tokens=64)
    dm.setup()
    ts = dm.traces
    assert len(ts) == 10 and sorted(ts.prompt_ids) == list(range(10))  # b's prompts 0..3 became 6..9
    np.testing.assert_array_equal(ts.record(7).experts, b.record(1).experts)
    assert dm.meta.num_tokens == a.meta.num_tokens + b.meta.num_tokens
    assert dm.describe()["token_space"] == SPACE_A and dm.describe()["traces"] == [str(a.path), str(b.path)]
    c = traces(tmp_path / "c", SPACE_B, seed=2)
    with pytest.raises(TokenSpaceError, match=f"data.path {c.path}"):
        TraceDataModule([str(a.path), str(c.path)]).meta  # noqa: B018
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        TraceDataModule([str(a.path), str(traces(tmp_path / "d", None, seed=3).path)]).meta  # noqa: B018
    assert any(issubclass(w.category, TokenSpaceWarning) for w in seen)


def _archive(tmp_path, name, members):
    tar = tmp_path / name
    tar.mkdir()
    return write_tar(tar / "csv.tar.xz", {f"csv/prompt_{pid}_data.csv": csv_text(*m) for pid, m in members.items()})


def test_moebeyond_vocab_import_maps_known_strings_and_unknown_ones_to_unk(tmp_path):
    tok, ex = good_member(3, seed=1)  # strings: BOS, "Hello", "Ġ,world"
    first = import_moebeyond(_archive(tmp_path, "a", {0: (tok, ex)}), tmp_path / "first")
    vocab = first.vocab()
    assert vocab == [*tok, UNK] and first.meta.unk_token_id == 3 and first.meta.vocab_size == 4
    assert first.meta.token_space == vocab_space(vocab)
    foreign = ["Hello", "never-seen", tok[0], "also-new"]
    rng = np.random.default_rng(5)
    ex2 = np.argsort(rng.random((4, 26, 64)), axis=-1)[..., :6]
    second = import_moebeyond(_archive(tmp_path, "b", {4: (foreign, ex2)}), tmp_path / "second",
                              vocab=first.path / "vocab.json")
    assert second.vocab() == vocab and second.meta.token_space == first.meta.token_space
    assert second.record(0).token_ids.tolist() == [1, 3, 0, 3]  # known -> same ids, unknown -> <unk>
    np.testing.assert_array_equal(second.record(0).experts, ex2)
    assert second.meta.recording["unknown_tokens"] == 2 and second.meta.recording["unknown_strings"] == 2
    # a vocabulary without <unk> (an import from before): kept ids, <unk> appended
    (tmp_path / "old.json").write_text(json.dumps(tok))
    moebeyond_main(["--src", str(_archive(tmp_path, "c", {1: (foreign, ex2)})), "--out", str(tmp_path / "third"),
                    "--vocab", str(tmp_path / "old.json")])
    third = load_traces(tmp_path / "third")
    assert third.vocab() == vocab and third.record(0).token_ids.tolist() == [1, 3, 0, 3]


@pytest.mark.parametrize("text, why", [("{", "not a JSON vocabulary"), ('{"a": 1}', "expected a JSON list"),
                                       ('["a", 3]', "entry 1 is 3"), ('["a", "b", "a"]', "entry 2 'a' repeats entry 0")])
def test_moebeyond_bad_vocab_is_named(tmp_path, text, why):
    tok, ex = good_member(2)
    (tmp_path / "v.json").write_text(text)
    with pytest.raises(TraceFormatError, match=f"v.json: {why}"):
        import_moebeyond(_archive(tmp_path, "a", {0: (tok, ex)}), tmp_path / "out", vocab=tmp_path / "v.json")


def test_unk_rate_trains_the_unknown_embedding(tmp_path):
    tok, ex = good_member(3, seed=1)
    # 57-69 tokens per prompt: five different prompts (copies of one would all stay on the train side)
    members = {p: (tok * (19 + p), np.concatenate([ex] * (19 + p))) for p in range(5)}
    ts = import_moebeyond(_archive(tmp_path, "a", members), tmp_path / "t")
    unk = ts.meta.unk_token_id
    dm = TraceDataModule(str(ts.path), window=64, context=8, batch_tokens=256, split={"train": 0.6, "val": 0.4},
                         unk_rate=0.25)
    dm.setup()
    ids = torch.cat([b[0][b[2]] for b in dm.train_dataloader()])
    share = (ids == unk).float().mean().item()
    assert 0.1 < share < 0.4  # about unk_rate of the train tokens
    again = torch.cat([b[0][b[2]] for b in dm.train_dataloader()])
    assert sorted(again.tolist()) == sorted(ids.tolist())  # the same tokens replaced in every epoch
    assert all((b[0] != unk).all() for b in dm.val_dataloader())  # never in validation
    with pytest.raises(ValueError, match="unk_rate"):
        TraceDataModule(str(traces(tmp_path / "n", SPACE_A).path), unk_rate=0.1).train_dataloader()


def test_runtime_install_takes_the_served_models_tokenizer(tmp_path):
    from tiny_models import tiny_moe_model

    from integrate.runtime import install

    model = tiny_moe_model("olmoe")
    model.config.name_or_path = "org/model-a"  # as from_pretrained("org/model-a") sets it
    n = len([m for m, _ in model.named_modules() if m.endswith("mlp.experts")])
    net = tiny_predictor(vocab_size=model.config.vocab_size, num_layers=n, num_experts=8, mode="token_ahead")
    path = export_predictor(net, tmp_path / "p.safetensors", {"token_space": SPACE_B})
    with pytest.raises(TokenSpaceError, match="org/model-a.*p.safetensors.*org/model-b"):
        install(model, predictor=path, device="cpu")
    rt = install(model, predictor=path, device="cpu", token_space=SPACE_B)  # named explicitly: it loads
    rt.uninstall()


def test_training_on_two_sets_records_the_space_in_export_and_checkpoint(tmp_path):
    from synthetic import TINY_NET, train_cfg

    from predictor.checkpoint import load_checkpoint
    from predictor.export import read_predictor_meta
    from predictor.training import train

    a, b = traces(tmp_path / "a", SPACE_A, n_prompts=6), traces(tmp_path / "b", SPACE_A, seed=1, n_prompts=6)
    cfg = train_cfg([*TINY_NET, f"data.path=[{a.path},{b.path}]", "trainer.max_epochs=1", "logger=none",
                     "trainer.enable_progress_bar=false"], tmp_path / "run")
    out = train(cfg)
    _, meta = read_predictor_meta(out["predictor_path"])
    assert meta["token_space"] == SPACE_A and meta["traces"] == [str(a.path), str(b.path)]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["predictor_meta"]["token_space"] == SPACE_A
