"""Read the records of an offline W&B run (`run-<id>.wandb`), to check what a run logged without a server.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-style
32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: FULL, FIRST, MIDDLE, LAST), whose payloads
are `wandb_internal_pb2.Record` protobufs."""

import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7


def records(path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run log"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero padding to the end of the block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def run_log(run_dir):
    """The .wandb file of the single offline run under `run_dir` (a `wandb/` directory's parent), whole:
    wandb-core writes a finished run's last records (its exit) out when its service stops, so stop it."""
    import wandb

    wandb.teardown()
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]
