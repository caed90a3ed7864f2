"""predictor.atomic: outputs appear whole or not at all; and demo_report's prompt errors name file and line."""

import json
import os
import re
from pathlib import Path

import pytest

from integrate.demo_report import read_prompts
from predictor.atomic import atomic_path, swap_into_place, write_json_atomic, write_text_atomic


def test_writes_the_target(tmp_path):
    write_text_atomic(tmp_path / "a.md", "hello\n")
    write_json_atomic(tmp_path / "b.json", {"x": [1, 2]})
    write_json_atomic(str(tmp_path / "c.json"), {"y": 1.5}, indent=1, sort_keys=True)
    assert (tmp_path / "a.md").read_text() == "hello\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "c.json").read_text() == '{\n "y": 1.5\n}'
    with atomic_path(tmp_path / "a.md") as tmp:  # an existing file is replaced
        tmp.write_bytes(b"new")
    assert (tmp_path / "a.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.json", "c.json"]


def test_files_get_the_mode_a_plain_write_gives(tmp_path):
    """safetensors creates owner-only files; an atomic write gives the mode of an ordinary one."""
    import os

    import torch
    from safetensors.torch import save_file

    with atomic_path(tmp_path / "p.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))
    (tmp_path / "plain").write_text("x")
    assert os.stat(tmp_path / "p.safetensors").st_mode == os.stat(tmp_path / "plain").st_mode


def test_an_existing_file_keeps_its_mode_and_a_link_its_target(tmp_path):
    """A private (0600) file replaced became readable by others; a symlink was replaced by a plain file."""
    import os

    (tmp_path / "secret.json").write_text("{}")
    os.chmod(tmp_path / "secret.json", 0o600)
    write_json_atomic(tmp_path / "secret.json", {"k": 1})
    assert os.stat(tmp_path / "secret.json").st_mode & 0o777 == 0o600
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "out.md").write_text("old")
    (tmp_path / "link.md").symlink_to(tmp_path / "real" / "out.md")
    write_text_atomic(tmp_path / "link.md", "new")
    assert (tmp_path / "link.md").is_symlink() and (tmp_path / "real" / "out.md").read_text() == "new"


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the n")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]

    with pytest.raises(TypeError):  # not JSON-serialisable: fails before anything is renamed
        write_json_atomic(target, {"x": object()})
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.png"):
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # none created


def test_temporary_is_a_hidden_sibling_with_the_suffix(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.tmp-")
        tmp.write_bytes(b"png")
    with atomic_path(tmp_path / "plot.png") as again:
        assert again != tmp  # unique per write
        again.write_bytes(b"png2")
    assert (tmp_path / "plot.png").read_bytes() == b"png2"


def test_savefig_infers_the_format_from_the_temporary(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    with atomic_path(tmp_path / "fig.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_report_prompt_errors_name_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = [json.dumps({"prompt_id": i, "text": f"p{i}"}) for i in range(3)]
    path.write_text("\n".join([*good, ""]) + "\n")
    texts, pids = read_prompts(path, max_prompts=2)
    assert texts == ["p0", "p1"] and pids.tolist() == [0, 1]

    path.write_text("\n".join([good[0], "", "{not json"]) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":3: not a JSON line"):
        read_prompts(path)
    path.write_text("\n".join([good[0], json.dumps({"prompt_id": 1})]) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":2: 'text' must be a string"):
        read_prompts(path)
    path.write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":1: 'prompt_id' must be an integer"):
        read_prompts(path)


def test_swap_into_place_replaces_a_folder_and_keeps_the_old_one_for_the_caller(tmp_path):
    out, new, trash = tmp_path / "out", tmp_path / ".out.new", tmp_path / ".out.old"
    new.mkdir()
    (new / "f").write_text("new")
    assert swap_into_place(new, out, trash) is False  # nothing was there
    assert (out / "f").read_text() == "new" and not trash.exists()
    new.mkdir()
    (new / "f").write_text("newer")
    assert swap_into_place(new, out, trash) is True
    assert (out / "f").read_text() == "newer" and (trash / "f").read_text() == "new" and not new.exists()


@pytest.mark.parametrize("when", ["before_the_second_rename", "just_after_the_first_rename"])
def test_swap_into_place_puts_the_old_folder_back_when_interrupted(tmp_path, monkeypatch, when):
    """A Ctrl-C as the new folder goes in, or handled right after the first rename returned (before any
    line after it ran): the old folder is put back from where the file system says it is."""
    out, new, trash = tmp_path / "out", tmp_path / ".out.new", tmp_path / ".out.old"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    real = os.replace

    def interrupted(src, dst):
        if when == "before_the_second_rename" and Path(src) == new:  # `out` was just moved aside
            raise KeyboardInterrupt
        real(src, dst)
        if when == "just_after_the_first_rename" and Path(dst) == trash:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        swap_into_place(new, out, trash)
    monkeypatch.undo()
    assert (out / "f").read_text() == "old" and (new / "f").read_text() == "new" and not trash.exists()
