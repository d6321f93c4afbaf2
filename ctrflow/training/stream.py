"""Training rows too large for memory: encoded chunk by chunk from the training set's Parquet into memory-mapped
arrays on disk, and gathered batch by batch by the one training loop.

    rows = encode_to_disk(parquet, encoder, "train", out_dir)     # one .npy per field, [n, ...] like the tensors
    Trainer(model, cfg).fit(rows, valid)                          # the same batches as the in-memory tensors

`DiskRows` is a read-only mapping field -> tensor whose storage is the memory-mapped file. The trainer reads it in
one of two orders (`train.stream_order`):

- `blocks` (default): the rows are cut into blocks of `stream_block_rows` contiguous rows; each epoch visits the
  blocks in a seeded random order, `stream_window_blocks` at a time (`block_windows`); a window's blocks are read
  with sequential I/O into memory (`read_window`) and its rows permuted and cut into batches. Every row is seen once
  per epoch; a batch mixes the rows of its window's blocks only (the shuffle of a shuffle buffer over shuffled
  shards, as TFRecord/WebDataset pipelines do). Measured on 8M streamed rows (one epoch of DCNv2): 514 s and
  6.0 GB peak with `blocks`, 548 s and 10.5 GB with `rows` (a page per row and field faulted in between
  releases); benchmarks/results/scale.md.
- `rows`: `rows[k][idx]` gathers each batch of the in-memory permutation (the pages it touches are read from
  disk), so the batches and therefore the trained weights are exactly those of the in-memory tensors.

The trainer calls `release()` every few steps, which drops the mapped pages from this process's resident set
(madvise MADV_DONTNEED; they stay in the page cache), so resident memory stays near one window instead of growing
to the file size over an epoch.

When: `ctrflow.steps.split_data` streams when the encoded training rows (`encoded_row_bytes` x rows) exceed
`train.memory_budget_mb`; the valid and test splits stay in memory (evaluation reads them whole).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.data.spec import FeatureSpec, FieldKind
from ctrflow.meter import progress

log = logging.getLogger(__name__)

CHUNK_ROWS = 200_000  # rows encoded at once: bounds the pandas frame of one chunk


def encoded_row_bytes(spec: FeatureSpec) -> int:
    """Bytes one encoded row takes as tensors: int64 ids, int64 [max_len] sequences, float32 [dim] vectors, label."""
    total = 4  # float32 label
    for f in spec.fields:
        if f.kind is FieldKind.SEQUENCE:
            total += 8 * f.max_len
        elif f.kind is FieldKind.EMBEDDING:
            total += 4 * f.dim
        else:
            total += 8
    return total


def _shape(encoder: FeatureEncoder, name: str, n: int) -> tuple[tuple[int, ...], np.dtype]:
    if name == "label":
        return (n,), np.dtype(np.float32)
    f = encoder.spec[name]
    if f.kind is FieldKind.SEQUENCE:
        return (n, f.max_len), np.dtype(np.int64)
    if f.kind is FieldKind.EMBEDDING:
        return (n, f.dim), np.dtype(np.float32)
    return (n,), np.dtype(np.int64)


def iter_split(path: str | Path, split: str, columns: list[str] | None = None, split_column: str = "split",
               chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of one split of a Parquet training set, in file order, as pandas chunks of at most `chunk_rows`."""
    file = pq.ParquetFile(path)
    names = None if columns is None else list(dict.fromkeys([*columns, split_column]))
    for batch in file.iter_batches(batch_size=chunk_rows, columns=names):
        frame = batch.to_pandas()
        frame = frame[frame[split_column] == split]
        if len(frame):
            yield frame.reset_index(drop=True)


def encode_to_disk(path: str | Path, encoder: FeatureEncoder, split: str, out_dir: str | Path,
                   split_column: str = "split", chunk_rows: int = CHUNK_ROWS) -> DiskRows:
    """Encode one split of the Parquet training set at `path` chunk by chunk into `out_dir/<field>.npy`.

    Rows keep the file's order, so row i is the split's i-th row, as in `frame[frame.split == split]`. Raises
    ValueError when the split has no rows.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int((pq.read_table(path, columns=[split_column]).column(split_column).to_numpy(zero_copy_only=False) == split).sum())
    if n == 0:
        raise ValueError(f"training set {path}: the '{split}' split has 0 rows")
    names = [f.name for f in encoder.spec.fields] + ["label"]
    # written with plain file writes, in row order: pages written through a memory map stay in this process's resident
    # set until written back (the 10M run's RSS grew by the file size, 5.6 GB); written pages are only page cache
    files, dtypes = {}, {}
    try:
        for name in names:
            shape, dtype = _shape(encoder, name, n)
            files[name] = open(out_dir / f"{name}.npy", "wb")  # noqa: SIM115 - closed below, all together
            np.lib.format.write_array_header_2_0(files[name], {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
            dtypes[name] = dtype
        done = 0
        for chunk in iter_split(path, split, split_column=split_column, chunk_rows=chunk_rows):
            arrays = encoder.transform(chunk)
            for name in names:
                files[name].write(np.ascontiguousarray(arrays[name], dtype=dtypes[name]).tobytes())
            done += len(chunk)
            progress(done, n, f"encoding the {split} split to disk")
    finally:
        for fh in files.values():
            fh.close()
    if done != n:
        raise RuntimeError(f"training set {path}: encoded {done} '{split}' rows, expected {n}")
    log.info("encoded %d %s rows to %s (%.0f MB)", n, split, out_dir, sum(p.stat().st_size for p in out_dir.glob("*.npy")) / 2**20)
    return DiskRows(out_dir, names)


def block_windows(n: int, block_rows: int, window_blocks: int, generator: torch.Generator) -> Iterator[list[tuple[int, int]]]:
    """Rows [0, n) as blocks [start, end) of `block_rows` contiguous rows (the last one shorter), in a random order
    drawn from `generator`, grouped `window_blocks` at a time (the last window may hold fewer); each window's blocks
    sorted by start, so reading them is one forward pass over the files. Every row is in exactly one block.

        list(block_windows(10, 3, 2, g))  # e.g. [[(3, 6), (9, 10)], [(0, 3), (6, 9)]]
    """
    if block_rows < 1 or window_blocks < 1:
        raise ValueError(f"block_rows and window_blocks must be >= 1, got {block_rows}, {window_blocks}")
    starts = torch.arange(0, n, block_rows)
    order = starts[torch.randperm(len(starts), generator=generator)].tolist()
    for a in range(0, len(order), window_blocks):
        yield [(s, min(s + block_rows, n)) for s in sorted(order[a : a + window_blocks])]


class DiskRows(Mapping[str, torch.Tensor]):
    """Encoded rows on disk, one memory-mapped .npy per field: a mapping field -> tensor [n, ...] (see module doc).

    The mapping is copy-on-write (writes never reach the files). `release()` drops the mapped pages from the
    resident set.
    """

    def __init__(self, directory: str | Path, names: list[str]):
        self.directory = Path(directory)
        self._maps: list[mmap.mmap] = []
        self._tensors: dict[str, torch.Tensor] = {}
        for name in names:
            path = self.directory / f"{name}.npy"
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            if fortran:
                raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
            count = int(np.prod(shape))
            arr = np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)
            self._maps.append(mm)
            self._tensors[name] = torch.from_numpy(arr)
        if "label" not in self._tensors:
            raise KeyError(f"{self.directory}: no label.npy")
        self._tensors["label"] = self._tensors["label"].clone()  # small, read by every step: kept in memory

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def read_window(self, blocks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The rows of `blocks` ([start, end) row ranges) of every field, concatenated in that order, as in-memory
        tensors (copies: each block is one sequential read per field). The mapped pages are released after."""
        if not blocks:
            raise ValueError(f"{self.directory}: read_window needs at least one block")
        out = {k: torch.cat([v[a:b] for a, b in blocks]) for k, v in self._tensors.items()}  # cat copies, one block too
        self.release()
        return out

    def release(self) -> None:
        """Drop the mapped pages from this process's resident set (they stay cached by the kernel)."""
        for mm in self._maps:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError):  # no madvise on this platform: the kernel reclaims pages itself
                return
