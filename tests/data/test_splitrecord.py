"""The split record at 100k files: a digest and compressed chunks, never one multi-MB study attr.

Generated paths, no images: what is measured is the record, not decoding. The user's report behind
it: the whole split went into one study user attr and `splits.json`; at 100k files that is several
MB in one attr, read by every worker and passed through the gRPC storage proxy.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import optuna
import pytest

from pipeline.core import DataError
from pipeline.data import SPLITS_ATTR, Splits, adopt, load_record, store_record, to_record
from pipeline.data import _splitrecord as R
from pipeline.distributed import open_storage

from conftest import free_port, start_proxy, stop

FILES = 100_000


def generated(n: int = FILES, classes: int = 1000, root: str = "/data/photos") -> Splits:
    names = [f"c{c:04d}" for c in range(classes)]
    samples = [(f"{names[i % classes]}/IMG_{i:07d}.jpg", i % classes) for i in range(n)]
    train = [("train/" + p, c) for p, c in samples[: n * 8 // 10]]
    val = [("val/" + p, c) for p, c in samples[n * 8 // 10 : n * 9 // 10]]
    test = [("test/" + p, c) for p, c in samples[n * 9 // 10 :]]
    return Splits(Path(root), {name: i for i, name in enumerate(names)}, train, val, test, "folder 'test'")


def test_100k_files_are_a_small_header_and_a_few_compressed_chunks():
    splits, attrs = generated(), {}
    header = store_record(to_record(splits), attrs.__setitem__)
    whole = len(json.dumps(to_record(splits)))
    assert whole > 3_500_000  # what one attr held before (3.8 MB)
    assert header["counts"] == {"train": 80_000, "val": 10_000, "test": 10_000}
    assert len(json.dumps(attrs[SPLITS_ATTR])) < 300
    chunks = [k for k in attrs if k.startswith(R.CHUNK_PREFIX)]
    assert len(chunks) == header["chunks"] and all(len(attrs[k]) <= R.CHUNK_CHARS for k in chunks)
    assert header["stored_bytes"] == sum(len(attrs[k]) for k in chunks) < whole / 20
    assert list(attrs)[-1] == SPLITS_ATTR  # the header last: a reader seeing it sees every chunk
    assert load_record(attrs) == to_record(splits)
    here = generated(root="/mnt/other")  # another machine, same files
    assert adopt(load_record(attrs), here, "big") == here


def test_a_missing_or_altered_chunk_is_one_clear_error():
    splits, attrs = generated(2_000, 20), {}
    header = store_record(to_record(splits), attrs.__setitem__)
    key = R.chunk_key(header["digest"], 0)
    altered = dict(attrs) | {key: R.base64.b64encode(lzma.compress(b'{"train": []}')).decode()}
    with pytest.raises(DataError) as err:
        load_record(altered)
    assert str(err.value) == (
        f"study user attr '{SPLITS_ATTR}': the recorded split (digest {header['digest'][:16]}) is corrupt; "
        "record it again with `sweep run --accept-changes`"
    )
    del attrs[key]
    with pytest.raises(DataError, match=f"missing chunk\\(s\\) {key};"):
        load_record(attrs)


def test_a_record_stored_whole_by_an_earlier_version_still_reads():
    record = to_record(generated(100, 10))
    assert load_record({SPLITS_ATTR: record}) == record
    assert load_record({}) is None


def test_100k_file_record_through_the_grpc_storage_proxy(tmp_path):
    port = free_port()
    proxy = start_proxy(f"sqlite:///{tmp_path / 'optuna.db'}", port)
    try:
        writer = optuna.create_study(storage=open_storage(f"grpc://127.0.0.1:{port}", connect_timeout=60))
        splits = generated()
        store_record(to_record(splits), writer.set_user_attr)
        reader = optuna.load_study(
            study_name=writer.study_name, storage=open_storage(f"grpc://127.0.0.1:{port}", connect_timeout=60)
        )
        assert load_record(reader.user_attrs) == to_record(splits)
    finally:
        stop(proxy)
