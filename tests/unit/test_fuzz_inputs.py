"""Property-based fuzzing of the input readers and the run config loader: whatever the bytes, the result is either
complete (every record accounted for) or one DataError/ConfigError that names the file (and line); never another
exception and never a silent partial read."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_prep.errors import DataError
from data_prep.pieces import ReadStats
from data_prep.records import iter_documents
from train import config as config_lib
from train.errors import ConfigError

# FUZZ_EXAMPLES=5000 for a longer hunt; 200 keeps the unit suite fast.
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3)), max_leaves=8)
records = st.dictionaries(st.sampled_from(["text", "id", "other"]), json_values, max_size=3)
json_lines = st.one_of(
    records.map(lambda r: json.dumps(r).encode()),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
              st.text(max_size=30)),
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"   ", b"\xef\xbb\xbf{\"text\": \"bom\"}", b"[" * 5000 + b"]" * 5000,
                     b'{"text": "a", "text": 1}', b"NaN", b'{"text": "x", "n": 1e400}']),
).map(lambda b: b.replace(b"\n", b" "))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _blank(line: bytes, first: bool) -> bool:
    if first and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@SETTINGS
@given(lines=st.lists(json_lines, max_size=8), trailing_newline=st.booleans())
@example(lines=[b'{"text": "ok"}', b"[" * 100_000], trailing_newline=True)
def test_jsonl_reader_reads_everything_or_names_file_and_line(scratch, lines, trailing_newline):
    path = scratch / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline and lines else b""))
    stats = ReadStats()
    try:
        docs = list(iter_documents([str(path)], stats=stats))
    except DataError as exc:
        match = re.match(rf"{re.escape(str(path))}:(\d+): ", str(exc))
        assert match and 1 <= int(match.group(1)) <= len(lines), str(exc)
        return
    expected = sum(not _blank(line, i == 0) for i, line in enumerate(lines))
    assert stats.docs_read == expected  # nothing silently dropped
    assert len(docs) == stats.docs_read - stats.docs_empty_dropped
    assert all(d.line >= 1 and d.source == str(path) for d in docs)


csv_cells = st.one_of(st.text(max_size=15), st.sampled_from(['"', '""', ",", "\n", "\r\n", "\x00", "a\"b", "\ufeff"]))


@SETTINGS
@given(rows=st.lists(st.lists(csv_cells, max_size=3), max_size=6), raw=st.booleans(), junk=st.binary(max_size=20))
def test_csv_reader_reads_everything_or_names_file_and_row(scratch, rows, raw, junk):
    path = scratch / "fuzz.csv"
    if raw:  # arbitrary text joined without quoting, plus arbitrary bytes
        data = "\n".join(",".join(r) for r in [["text", "id"]] + rows).encode("utf-8", "surrogatepass") + junk
    else:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["text", "id"]] + rows)
        data = buffer.getvalue().encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    stats = ReadStats()
    try:
        docs = list(iter_documents([str(path)], stats=stats))
    except DataError as exc:
        assert re.match(rf"{re.escape(str(path))}(:row \d+|: header row)?: ", str(exc)), str(exc)
        return
    # Oracle: the csv module over the same text; every data row that is not blank is a record.
    text = data.decode("utf-8-sig", "surrogateescape")
    expected = sum(1 for row in list(csv.reader(io.StringIO(text, newline="")))[1:] if row)
    assert stats.docs_read == expected
    assert len(docs) == stats.docs_read - stats.docs_empty_dropped


KEYS = config_lib._all_keys()
yaml_values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.floats(),
                        st.text(max_size=10), st.lists(st.one_of(st.floats(), st.text(max_size=3)), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
override_text = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["train", "x.y", "train.max_step", "run.name.x"]),
              st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                        st.text(alphabet=string.printable, max_size=10))),
    st.text(max_size=20))


@SETTINGS
@given(sections=st.dictionaries(st.sampled_from(KEYS + ["train", "bogus.key"]), yaml_values, max_size=6),
       raw_text=st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=40)),
       overrides=st.lists(override_text, max_size=3))
@example(sections={}, raw_text="train: {max_steps: 1}\ntrain: {max_steps: 2}\n", overrides=[])
@example(sections={}, raw_text="a: &a [*a]\n", overrides=[])
@example(sections={}, raw_text=None, overrides=["optim.betas=[a, b]", "train.max_steps=["])
def test_config_loader_gives_a_config_or_one_line_config_error(scratch, sections, raw_text, overrides):
    path = scratch / "fuzz.yaml"
    if raw_text is None:
        nested: dict = {"data": {"path": "shards"}}
        for dotted, value in sections.items():
            section, _, key = dotted.partition(".")
            node = nested.setdefault(section, {})
            if key and isinstance(node, dict):
                node[key] = value
        path.write_text(yaml.safe_dump(nested))
    elif isinstance(raw_text, bytes):
        path.write_bytes(raw_text)
    else:
        path.write_text(raw_text, encoding="utf-8", errors="surrogatepass")
    try:
        cfg = config_lib.load(path, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), repr(str(exc))
        return
    assert isinstance(cfg, config_lib.Config)
    cfg.fingerprint()  # the resolved config serialises
