"""Prompts from a .txt or .jsonl file, a saved `datasets` directory, or a `datasets` name: what collect.py
records and tools/vllm_client.py sends, read one way (no torch here)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from predictor.trace_checks import decode_utf8

TEXT_FIELDS = ("text", "question", "prompt")  # tried in order when no field is configured


def _pick_field(row: Mapping, field: str | None, where: str) -> str:
    if field is not None:
        if field not in row:
            raise KeyError(f"{where}: no field {field!r}; fields are {sorted(row)}")
        return field
    for name in TEXT_FIELDS:
        if name in row:
            return name
    raise KeyError(f"{where}: none of the fields {TEXT_FIELDS}; set prompt_field to one of {sorted(row)}")


def _rows_to_prompts(rows, field: str | None, id_field: str | None, where: str) -> list[tuple[int, str]]:
    """(prompt_id, text) per row; `rows` yields (label, row), e.g. ("line 3", {...}), for errors. Ids are unique:
    a row without `id_field` takes its index, which must not be another row's explicit id."""
    out, seen = [], {}
    for i, (label, row) in enumerate(rows):
        at = f"{where}: {label}"
        if not isinstance(row, Mapping):
            raise TypeError(f"{at}: expected an object with the prompt text, got {type(row).__name__}")
        text = row[_pick_field(row, field, at)]
        if not isinstance(text, str):
            raise TypeError(f"{at}: prompt field holds {type(text).__name__}, not text")
        own = bool(id_field) and id_field in row
        pid = row[id_field] if own else i
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"{at}: {id_field!r} = {pid!r} is not an integer prompt id")
        how = "" if own else f" (its row index: it has no {id_field!r})"
        if pid in seen:
            raise ValueError(f"{at}: prompt id {pid}{how} is also the id of {seen[pid]}; prompt ids must be unique")
        seen[pid] = label + how
        out.append((pid, text))
    return out


def load_prompts(
    source: str,
    *,
    field: str | None = None,
    id_field: str | None = "prompt_id",
    split: str = "train",
    dataset_config: str | None = None,
    txt_split: str = "auto",
) -> list[tuple[int, str]]:
    """(prompt_id, text) pairs from a .txt/.jsonl file, a saved dataset dir, or a `datasets` name.

    .txt: `txt_split` = "line" (one prompt per line), "blank_line" (paragraphs), or "auto"
    (paragraphs when the file has a blank line, else lines). .jsonl / datasets: the text is
    `field` (default: the first of text, question, prompt); ids come from `id_field` when the
    rows have it, else the row index.
    """
    path = Path(source)
    if path.suffix in (".txt", ".jsonl") and not path.is_file():
        raise FileNotFoundError(f"prompts: no file at {path}")
    if path.suffix == ".txt":
        # CRLF, or CR alone (old Mac files), end a line as LF does; a UTF-8 byte-order mark is no text
        text = decode_utf8(path.read_bytes(), str(path)).removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if txt_split not in ("auto", "line", "blank_line"):
            raise ValueError(f"txt_split must be auto, line or blank_line, got {txt_split!r}")
        paragraphs = txt_split == "blank_line" or (txt_split == "auto" and "\n\n" in text.strip())
        parts = text.split("\n\n") if paragraphs else text.split("\n")
        prompts = [p.strip() for p in parts if p.strip()]
        return list(enumerate(prompts))
    if path.suffix == ".jsonl":
        rows = []
        # lines end at \n alone: JSON strings may hold U+2028, U+0085 and other breaks `splitlines` cuts at
        for i, line in enumerate(decode_utf8(path.read_bytes(), str(path)).removeprefix("\ufeff").split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i}: not JSON ({e})") from None
        return _rows_to_prompts(rows, field, id_field, str(path))
    if path.suffix in (".json", ".csv", ".parquet", ".tsv"):
        raise ValueError(f"{path}: prompts must be .txt, .jsonl, or a datasets name/directory")
    import datasets

    if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, dataset_config, split=split)
    return _rows_to_prompts(((f"row {i}", row) for i, row in enumerate(ds)), field, id_field,
                            f"dataset {source} [{split}]")
