"""Every supported local format reads back the same documents; bad input gets an error naming file or field."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from data.config import SourceConfig, TxtSampleBy
from data.corpus import builtin_documents
from data.loader import build_loader
from data.sources import data_files, load_source
from tests.data.helpers import data_config, make_docs, write_jsonl

DOCS = make_docs(12)
REPO = Path(__file__).resolve().parents[2]


def texts(ds: datasets.Dataset, field: str = "text") -> list[str]:
    return list(ds[field])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    ds = datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    write_jsonl(root / "c.jsonl", DOCS)
    (root / "c.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    ds.to_parquet(root / "c.parquet")
    ds.to_csv(root / "c.csv")
    (root / "c.txt").write_text("\n".join(DOCS) + "\n")
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in DOCS)
    ds.save_to_disk(root / "saved")
    shutil.copy(next((root / "saved").glob("*.arrow")), root / "c.arrow")
    (root / "parts").mkdir()
    write_jsonl(root / "parts" / "a.jsonl", DOCS[:5])
    write_jsonl(root / "parts" / "b.jsonl", DOCS[5:])
    return root


@pytest.mark.parametrize(
    "name",
    [
        "c.jsonl",
        "c.json",
        "c.parquet",
        "c.csv",
        "c.txt",
        "c.jsonl.gz",
        "saved",
        "c.arrow",
        "parts",
        "parts/*.jsonl",
    ],
)
def test_every_format_reads_the_same_documents(files, cache_dir, name: str) -> None:
    ds = load_source(SourceConfig(path=str(files / name)), 0, cache_dir)
    assert texts(ds) == DOCS
    assert ds.column_names == ["text"]


def test_text_field_and_txt_units(tmp_path, cache_dir) -> None:
    write_jsonl(tmp_path / "body.jsonl", DOCS, field="body")
    assert (
        texts(
            load_source(SourceConfig(path=str(tmp_path / "body.jsonl"), text_field="body"), 0, cache_dir),
            "body",
        )
        == DOCS
    )
    (tmp_path / "p.txt").write_text("one\ntwo\n\nthree\n")
    by = lambda unit: texts(  # noqa: E731
        load_source(SourceConfig(path=str(tmp_path / "p.txt"), txt_sample_by=unit), 0, cache_dir)
    )
    assert by(TxtSampleBy.line) == ["one", "two", "", "three"]
    assert by(TxtSampleBy.paragraph) == ["one\ntwo", "three\n"]
    assert by(TxtSampleBy.document) == ["one\ntwo\n\nthree\n"]


def test_builtin_source_is_the_builtin_corpus(cache_dir) -> None:
    assert texts(load_source(SourceConfig(), 0, cache_dir)) == list(builtin_documents())


def test_hub_names_are_told_from_local_paths(tmp_path) -> None:
    assert data_files("someone/some_dataset", "w") is None
    assert data_files("wikitext", "w") is None
    for local in (str(tmp_path / "missing.jsonl"), "./missing", "a/b/c", "missing.parquet"):
        with pytest.raises(FileNotFoundError, match="missing|a/b/c"):
            data_files(local, "w")


# ---- bad input ---------------------------------------------------------------------------------------
def test_missing_file_names_the_path(tmp_path, cache_dir) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"data\.sources\[0\].*{path}"):
        load_source(SourceConfig(path=str(path)), 0, cache_dir)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_source(SourceConfig(path=str(tmp_path / "*.jsonl")), 0, cache_dir)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir holds no"):
        load_source(SourceConfig(path=str(tmp_path / "empty_dir")), 0, cache_dir)


def test_empty_dataset_names_the_file(tmp_path, cache_dir) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        load_source(SourceConfig(path=str(tmp_path / "empty.jsonl")), 0, cache_dir)
    datasets.Dataset.from_dict(
        {"text": []}, features=datasets.Features({"text": datasets.Value("string")})
    ).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"empty\.parquet is empty \(0 rows\)"):
        load_source(SourceConfig(path=str(tmp_path / "empty.parquet")), 0, cache_dir)


def test_all_empty_texts_is_an_empty_dataset(tmp_path, tokenizer, cache_dir) -> None:
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    cfg = data_config(cache_dir, [tmp_path / "blank.jsonl"])
    with pytest.raises(ValueError, match=r"data\.sources\[0\].*blank\.jsonl.*empty or null"):
        build_loader(cfg, tokenizer)


def test_missing_text_field_names_field_file_and_columns(tmp_path, cache_dir) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    with pytest.raises(
        ValueError, match=r"text_field='text' is not a column of .*c\.jsonl; its columns are \['body', 'id'\]"
    ):
        load_source(SourceConfig(path=str(path)), 3, cache_dir)
    with pytest.raises(
        ValueError, match=r"data\.sources\[0\]\.text_field='content' is not a column of the builtin corpus"
    ):
        load_source(SourceConfig(text_field="content"), 0, cache_dir)


def test_non_string_text_field_is_named(tmp_path, cache_dir) -> None:
    (tmp_path / "n.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(
        ValueError, match=r"text_field='text' of .*n\.jsonl holds Value\('int64'\), not strings"
    ):
        load_source(SourceConfig(path=str(tmp_path / "n.jsonl")), 0, cache_dir)


def test_unreadable_file_names_the_file(tmp_path, cache_dir) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"could not read .*bad\.parquet as parquet"):
        load_source(SourceConfig(path=str(tmp_path / "bad.parquet")), 0, cache_dir)


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [
        (
            "surrogate.jsonl",
            # row 50 holds a high surrogate followed by a plain character: not valid JSON text
            "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)).encode()
            + b'{"text": "bad \\ud800\\u0041 pair"}\n',
            r"ArrowInvalid: JSON parse error: The surrogate pair in string is invalid\. in row 50",
        ),
        (
            "bytes.txt",
            b"hello\n" * 100 + b"\xff\xfe not utf-8\n",
            r"UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 600",
        ),
    ],
)
def test_unparsable_file_error_names_the_file_and_the_parser_error(
    tmp_path, cache_dir, name: str, content: bytes, cause: str
) -> None:
    """`datasets` reports only "DatasetGenerationError: An error occurred while generating the dataset";
    what is wrong is in its cause, and the one error line a user sees must carry it."""
    path = tmp_path / name
    path.write_bytes(content)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.prepare",
            f"data.sources.0.path={path}",
            f"data.prepared_dir={tmp_path / 'out'}",
            f"data.cache_dir={cache_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finemoe-prepare: error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(
        rf"data\.sources\[0\] .*could not read {re.escape(str(path))} as \w+: {cause}", errors[0]
    ), errors[0]
    assert "DatasetGenerationError" not in errors[0]
