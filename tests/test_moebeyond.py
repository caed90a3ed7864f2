"""MoE-Beyond CSV import: a few real Puffin prompts end to end, and errors that name member and line."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from synthetic import write_tar

from predictor.moebeyond import HEADER, build_vocab, deepseek_v2_lite_meta, import_moebeyond, read_archive
from predictor.traces import TraceFormatError, load_traces

L, K, E = 26, 6, 64


def csv_text(tokens: list[str], experts: np.ndarray) -> str:
    """A well-formed member: layer-major rows, experts (T, L, k)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for layer in range(L):
        for t, tok in enumerate(tokens):
            w.writerow([layer + 1, 0, tok, str(experts[t, layer].tolist())])
    return buf.getvalue()


def good_member(T: int = 3, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = ["<｜begin▁of▁sentence｜>", "Hello", "Ġ,world"][:T]  # a comma forces CSV quoting
    return tokens, np.argsort(rng.random((T, L, E)), axis=-1)[..., :K]


def test_synthetic_archive_round_trip(tmp_path):
    tok_a, ex_a = good_member(3, seed=1)
    tok_b, ex_b = good_member(2, seed=2)
    write_tar(tmp_path / "csv.tar.xz", {"csv/prompt_7_data.csv": csv_text(tok_a, ex_a),
                                        "csv/prompt_3_data.csv": csv_text(tok_b, ex_b)})
    ts = import_moebeyond(tmp_path, tmp_path / "out")  # a directory holding csv.tar.xz
    assert ts.prompt_ids.tolist() == [3, 7]  # written in prompt order, whatever the archive order
    vocab = ts.vocab()
    assert vocab == ["<｜begin▁of▁sentence｜>", "Hello", "Ġ,world", "<unk>"]  # first appearance over prompts 3, 7
    with pytest.raises(FileExistsError, match=r"out exists; pass --overwrite \(overwrite=True from Python\)"):
        import_moebeyond(tmp_path, tmp_path / "out")
    assert ts.meta.vocab_size == 4 and ts.meta.unk_token_id == 3 and ts.meta.num_tokens == 5
    for rec, (tokens, experts) in zip(ts, [(tok_b, ex_b), (tok_a, ex_a)]):
        assert [vocab[i] for i in rec.token_ids] == tokens
        np.testing.assert_array_equal(rec.experts, experts)
        assert rec.num_prefill == rec.num_tokens


def corrupt(text: str, line: int, fn) -> str:
    lines = text.split("\n")
    lines[line - 1] = fn(lines[line - 1])
    return "\n".join(lines)


T3 = 3  # tokens per layer in the malformed members below; line = 2 + layer_index * T3 + t


@pytest.mark.parametrize(
    "line, fn, why",
    [
        (2 + 5 * T3 + 1, lambda s: s.replace(", ", ", 1, ", 1), "is not a list of 6 ints"),  # 7 experts
        (2 + 0 * T3 + 2, lambda s: s.rsplit(",", 6)[0] + ',"[1, 2, 3, 4, 5, 64]"', "out of range"),
        (2 + 9 * T3 + 0, lambda s: s.split(",", 3)[0] + ",0,<s>,\"[1, 1, 2, 3, 4, 5]\"", "differs from layer 1"),
        (2 + 3 * T3 + 1, lambda s: s.rsplit(",", 6)[0] + ',"[1, 1, 2, 3, 4, 5]"', "repeated expert id"),
        (2 + 4 * T3 + 0, lambda s: "6" + s[1:], "Layer ID 6 where layer-major order"),
        (2 + 2 * T3 + 2, lambda s: s.replace(",0,", ",1,", 1), "Batch Number"),
        (2 + 7 * T3 + 0, lambda s: s + ",extra", "expected 4 fields"),
        (2 + 1 * T3 + 0, lambda s: "\u00b2" + s[s.index(","):], "Layer ID '\u00b2' is not a layer number"),
        (2 + 1 * T3 + 1, lambda s: "9" * 20 + "," + s.split(",", 1)[1], "Layer ID '9999.* is not a layer number"),
        (2 + 6 * T3 + 2, lambda s: s.replace("[", "[\u0663, ", 1).replace(", ", "", 1).rsplit(",", 1)[0] + "]\"",
         "is not a list of 6 ints"),  # an Arabic-Indic digit
        (2 + 8 * T3 + 1, lambda s: s.replace("[", "[\n", 1), "is not a list of 6 ints"),  # a newline inside the list
    ],
)
def test_malformed_csv_names_member_and_line(tmp_path, line, fn, why):
    tokens, experts = good_member(T3)
    text = corrupt(csv_text(tokens, experts), line, fn)
    tar = write_tar(tmp_path / "csv.tar.xz", {"csv/prompt_1_data.csv": csv_text(tokens, experts),
                                              "csv/prompt_2_data.csv": text})
    with pytest.raises(TraceFormatError, match=why) as err:
        import_moebeyond(tar, tmp_path / "out")
    assert f"csv.tar.xz:csv/prompt_2_data.csv: line {line}:" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_layer_and_bad_header(tmp_path):
    tokens, experts = good_member(2)
    short = "\n".join(csv_text(tokens, experts).split("\n")[: 1 + 25 * 2]) + "\n"  # layer 26 missing
    tar = write_tar(tmp_path / "a.tar.xz", {"csv/prompt_4_data.csv": short})
    with pytest.raises(TraceFormatError, match=r"prompt_4_data.csv: 50 rows is not a multiple of the 26"):
        import_moebeyond(tar, tmp_path / "out")
    tar = write_tar(tmp_path / "b.tar.xz", {"csv/prompt_5_data.csv": "Layer,Token\n1,a\n"})
    with pytest.raises(TraceFormatError, match=r"prompt_5_data.csv: line 1: header"):
        import_moebeyond(tar, tmp_path / "out")
    tar = write_tar(tmp_path / "c.tar.xz", {"csv/notes.txt": "hi"})
    with pytest.raises(TraceFormatError, match=r"csv/notes.txt: unexpected file"):
        import_moebeyond(tar, tmp_path / "out")


def test_an_unreadable_archive_is_named_as_one(tmp_path):
    """A file that is no archive, and one cut short inside its compressed stream: the import's error
    names the file, and nothing is written."""
    tokens, experts = good_member(3)
    whole = write_tar(tmp_path / "whole.tar.xz", {f"csv/prompt_{i}_data.csv": csv_text(tokens, good_member(3, i)[1])
                                                  for i in range(1, 40)}).read_bytes()
    (tmp_path / "cut.tar.xz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.tar.xz").write_text('{"prompt_id": 1, "text": "hi"}\n')
    for name in ("cut.tar.xz", "text.tar.xz"):
        with pytest.raises(TraceFormatError, match=rf"{name}: not a readable tar archive \(ReadError"):
            import_moebeyond(tmp_path / name, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_puffin_first_prompts(tmp_path, puffin_dir):
    ts = import_moebeyond(puffin_dir, tmp_path / "puffin", limit=4)
    m = ts.meta
    assert len(ts) == 4 and m.num_sequences == 4
    assert (m.num_layers, m.moe_layers, m.num_experts, m.top_k) == (27, list(range(1, 27)), 64, 6)
    assert m.source_model == "deepseek-ai/DeepSeek-V2-Lite-Chat" and m.recording["mode"] == "prefill"
    vocab = json.loads((tmp_path / "puffin" / "vocab.json").read_text())
    assert m.vocab_file == "vocab.json" and m.vocab_size == len(vocab) == len(set(vocab))
    assert vocab[0] == "<｜begin▁of▁sentence｜>"
    raw = read_archive(puffin_dir / "csv.tar.xz", deepseek_v2_lite_meta(), limit=4)
    assert list(build_vocab(raw)) + ["<unk>"] == vocab  # ids are stable across runs; <unk> comes last
    # round trip against the CSV rows read plainly with the csv module
    with tarfile.open(puffin_dir / "csv.tar.xz", "r|xz") as tar:
        members = {}
        for member in tar:
            if member.isfile():
                members[member.name] = list(csv.DictReader(io.StringIO(tar.extractfile(member).read().decode())))
            if len(members) == 4:
                break
    for rec in load_traces(tmp_path / "puffin"):
        rows = members[f"csv/prompt_{rec.prompt_id}_data.csv"]
        assert len(rows) == 26 * rec.num_tokens and rec.num_prefill == rec.num_tokens
        for i, row in enumerate(rows):
            layer, t = divmod(i, rec.num_tokens)
            assert int(row["Layer ID"]) == layer + 1 and vocab[rec.token_ids[t]] == row["Token"]
            assert rec.experts[t, layer].tolist() == json.loads(row["Activated Expert IDs"])


@pytest.mark.shared_data
@pytest.mark.slow
def test_puffin_archive_counts(puffin_dir):
    prompts = read_archive(puffin_dir / "csv.tar.xz", deepseek_v2_lite_meta())
    assert len(prompts) == 1999 and 317 not in prompts and sorted(prompts)[-1] == 2000
    assert sum(len(tokens) for tokens, _ in prompts.values()) == 192_023
    assert {experts.shape[1:] for _, experts in prompts.values()} == {(26, 6)}
