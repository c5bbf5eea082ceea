"""Sources: a `SourceConfig` -> a Hugging Face `datasets.Dataset` whose one column is the document text.

A source's path is resolved in this order: "builtin"; an existing file, directory or glob (the format
from the file extensions: jsonl/json, parquet, csv, txt, arrow, optionally compressed; or a folder
written by `Dataset.save_to_disk`); otherwise a Hub dataset name. Every error names the
`data.sources[i]` entry and the file or field at fault.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets

from data.config import BUILTIN, SourceConfig, TxtSampleBy
from data.corpus import builtin_documents

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes


def load_source(src: SourceConfig, index: int, cache_dir: str, num_proc: int = 0) -> datasets.Dataset:
    """Load one source's rows, keeping only its text column.

    Args:
        src: the source.
        index: its position in `data.sources`, for error messages.
        cache_dir: Hugging Face datasets' cache (`DataConfig.datasets_cache`): its Arrow copy of
            local files and Hub downloads.
        num_proc: processes that convert local files to Arrow, one file each at a time (0 or 1: this
            process); the rows keep the files' order.

    Raises:
        FileNotFoundError: a local path, directory or glob with no data files.
        ValueError: an unreadable or empty dataset, or a missing text column.
    """
    where = f"data.sources[{index}] (path={src.path!r})"
    if src.path == BUILTIN:
        if src.split != "train":
            raise ValueError(
                f"data.sources[{index}].split={src.split!r}: the builtin corpus has only 'train' "
                "(its held-out part is data.eval_fraction)"
            )
        ds = datasets.Dataset.from_dict({"text": list(builtin_documents())})
        origin = "the builtin corpus"
    else:
        ds, origin = _load(src, where, str(Path(cache_dir).expanduser()), num_proc)
    if src.text_field not in ds.column_names:
        raise ValueError(
            f"data.sources[{index}].text_field={src.text_field!r} is not a column of {origin}; "
            f"its columns are {ds.column_names}"
        )
    feature = ds.features[src.text_field]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string"):
        what = "only nulls" if dtype == "null" else f"{feature}, not strings"
        raise ValueError(f"data.sources[{index}].text_field={src.text_field!r} of {origin} holds {what}")
    if len(ds) == 0:
        raise ValueError(f"{where}: {origin} is empty (0 rows)")
    return ds.select_columns([src.text_field])


def _load(src: SourceConfig, where: str, cache_dir: str, num_proc: int = 0) -> tuple[datasets.Dataset, str]:
    path = os.path.expanduser(src.path)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _SAVED_MARKERS):
        return _load_saved(path, src, where), path
    files = data_files(path, where)
    if files is None:
        try:
            ds = datasets.load_dataset(src.path, name=src.subset, split=src.split, cache_dir=cache_dir)
        except Exception as e:  # datasets raises many types for "not found" / "no network"
            raise ValueError(
                f"{where}: not a local file, directory or glob, and loading it as a Hugging Face Hub "
                f"dataset failed: {type(e).__name__}: {e}"
            ) from e
        return _as_dataset(ds, where), f"Hub dataset {src.path!r}"
    kinds = {str(_builder(f)) for f in files}
    if len(kinds) != 1:
        raise ValueError(f"{where}: files of several formats ({sorted(kinds)}); use one source per format")
    builder = kinds.pop()
    kwargs = {"sample_by": TxtSampleBy(src.txt_sample_by).value} if builder == "text" else {}
    origin = files[0] if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    if all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"{where}: {origin} is empty (0 bytes)")
    try:
        procs = min(num_proc, len(files))
        ds = datasets.load_dataset(
            builder,
            data_files=files,
            split=src.split,
            cache_dir=cache_dir,
            num_proc=procs if procs > 1 else None,
            **kwargs,
        )
    except Exception as e:
        if "corresponds to no data" in str(e):  # datasets' way of saying "0 rows"
            raise ValueError(f"{where}: {origin} is empty (0 rows)") from e
        root = _root_cause(e)
        raise ValueError(
            f"{where}: could not read {origin} as {builder}: {type(root).__name__}: {root}"
        ) from e
    return _as_dataset(ds, where), origin


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of `e`'s `raise ... from` chain: the one that says what is wrong.

    `datasets` wraps every reader's error in `DatasetGenerationError("An error occurred while
    generating the dataset")`, whose cause is the parser's (`ArrowInvalid: JSON parse error: ... in
    row 50`, `UnicodeDecodeError: ... in position 604`). Only `__cause__` is followed: an implicit
    `__context__` is an error that was being handled, e.g. the json builder re-raises pyarrow's error
    from inside its pandas fallback, whose own failure ("Trailing data") says nothing about the file.
    """
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _load_saved(path: str, src: SourceConfig, where: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise ValueError(f"{where}: could not read the saved dataset {path}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise ValueError(f"{where}: split {src.split!r} is not in {path}; it has {list(ds)}")
        ds = ds[src.split]
    return ds


def data_files(path: str, where: str) -> list[str] | None:
    """Data files of a local file, directory or glob; None for a name that can only be a Hub dataset."""
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"{where}: no file matches the glob {path}")
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if _builder(name) is not None and not name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(f"{where}: directory {path} holds no {'/'.join(_BUILDERS)} files")
    elif os.path.isfile(path):
        files = [path]
    elif _builder(path) is not None or path.startswith(("/", ".")) or path.count("/") > 1:
        raise FileNotFoundError(f"{where}: no such file or directory: {path}")
    else:
        return None
    unknown = [f for f in files if _builder(f) is None]
    if unknown:
        raise ValueError(f"{where}: {unknown[0]} has an unknown format; known: {', '.join(_BUILDERS)}")
    return files


def _builder(name: str) -> str | None:
    """The `datasets` builder of a data file name, from its extension (compression suffix ignored)."""
    stem = name
    for suffix in _COMPRESSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return _BUILDERS.get(os.path.splitext(stem)[1].lower())


def _as_dataset(ds: object, where: str) -> datasets.Dataset:
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{where}: expected one split, got {type(ds).__name__} (set its split)")
    return ds
