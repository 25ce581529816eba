"""Read back what W&B wrote to an offline run's ``run-*.wandb`` file.

wandb has no Python reader for it. The file is a 7-byte header (``:W&B`` + version)
followed by LevelDB-log framing: 32 KiB blocks of chunks (crc32 u32, length u16, type
u8: 1 full, 2 first, 3 middle, 4 last) around protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def _payloads(data: bytes) -> Iterator[bytes]:
    pos, pending = HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        pos += CHUNK_HEADER
        body = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if kind == 1:
            yield body
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            yield pending + body
            pending = b""


def read_records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B run file")
    for payload in _payloads(data):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a torn last record of a killed run
            continue
        yield rec


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every `history` record as {key: value}."""
    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                row[key] = item.value_json
        rows.append(row)
    return rows


def history_keys(path: str | Path) -> set[str]:
    return {k for row in history_rows(path) for k in row}


def find_run_files(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("run-*.wandb"))
