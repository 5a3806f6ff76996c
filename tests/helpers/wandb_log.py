"""Read an offline W&B run (``run-*.wandb``) back: a LevelDB-style log of protobuf Records.

wandb >= 0.2x writes only this binary log offline (no wandb-summary.json), so tests read it
the way ``wandb sync`` does: 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type FULL/FIRST/MIDDLE/LAST).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def summarize(path: Path) -> dict:
    """run id, config (last value per key), summary (last value per key), history rows."""
    result = {"run_ids": set(), "config": {}, "summary": {}, "history": [], "artifacts": []}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            result["run_ids"].add(r.run.run_id)
            for item in r.run.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                result["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                key = item.key or "/".join(item.nested_key)
                result["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            result["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                      for i in r.history.item})
        elif kind == "artifact":
            result["artifacts"].append({"name": r.artifact.name, "aliases": list(r.artifact.aliases),
                                        "type": r.artifact.type})
    return result
