"""Read back what an offline W&B run wrote (its ``run-<id>.wandb`` transaction log).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of chunks, each ``crc32c (4) | length (2, little-endian) | type (1) | payload``, with
type FULL=1, FIRST=2, MIDDLE=3, LAST=4. Each reassembled record is a ``wandb.proto`` Record.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < HEADER:  # block trailer padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            records.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            records.append(pending + payload)
            pending = b""
        elif kind == 0 and length == 0:
            offset += BLOCK_SIZE - offset % BLOCK_SIZE  # zero padding to the block end
    return records


#: How long to wait for W&B's service to finish writing a run's log.
FLUSH_TIMEOUT = 60.0


def _parsed(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The run's records, once its log holds the ``exit`` record: ``run.finish()`` returns
    before W&B's service process has flushed an offline run's log (seen: a 7-byte file right
    after ``finish``, the full log a second later), so reading at once was flaky."""
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + FLUSH_TIMEOUT
    while True:
        records = []
        try:
            for payload in _records(log_file.read_bytes()):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
        except DecodeError:  # the last record is still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{log_file} has no exit record after {FLUSH_TIMEOUT:.0f} s")
        time.sleep(0.1)


def logged_artifacts(run_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """Artifacts logged by the run: name -> (type, file paths in its manifest)."""
    return {
        r.artifact.name: (r.artifact.type, [entry.path for entry in r.artifact.manifest.contents])
        for r in _parsed(run_dir)
        if r.WhichOneof("record_type") == "artifact"
    }


def logged_values(run_dir: Path) -> dict[str, list[Any]]:
    """Every value logged under each key, from history and summary records, in order."""
    values: dict[str, list[Any]] = {}
    for record in _parsed(run_dir):
        kind = record.WhichOneof("record_type")
        items = (
            record.history.item
            if kind == "history"
            else record.summary.update
            if kind == "summary"
            else []
        )
        for item in items:
            key = item.key or "/".join(item.nested_key)
            values.setdefault(key, []).append(json.loads(item.value_json))
    return values
