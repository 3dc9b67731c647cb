"""data_prep.blend: blend specs (text and JSON) parsed and validated (every part a finished shard directory made with
the same tokenizer), the deterministic index-addressed sampler and its proportions, and `python -m data_prep blend`
(its main, in this process) reporting the realised shares. Training on a blend: tests/unit/test_data.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.blend import BlendSampler, load_blend, parse_blend
from data_prep.errors import DataError
from data_prep.pipeline import tokenize_corpus


@pytest.fixture(scope="module")
def parts(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("blend")
    out = {}
    for name, n in (("small", 40), ("large", 400)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} alpha beta gamma {i} " * 8}) + "\n"
                                                    for i in range(n)))
        tokenize_corpus([str(root / f"{name}.jsonl")], tiny["tokenizer"], root / name, shard_tokens=3_000)
        out[name] = root / name
    return {"root": root, **out}


def test_blend_spec_parse_and_validate(tiny, parts, tmp_path):
    spec = parts["root"] / "blend.txt"
    spec.write_text("# web + code\nsmall: 1\n\nlarge: 3  # most\n")
    assert parse_blend(spec) == [(str(parts["root"] / "small"), 1.0), (str(parts["root"] / "large"), 3.0)]
    sets, weights = load_blend(spec)
    assert [s.directory for s in sets] == [parts["small"], parts["large"]] and weights.tolist() == [0.25, 0.75]
    (tmp_path / "j.json").write_text(json.dumps({str(parts["small"]): 2, str(parts["large"]): 2}))
    assert load_blend(tmp_path / "j.json")[1].tolist() == [0.5, 0.5]
    for text, message in [("small 1\n", ":1: expected `<shard directory>: <weight>`, got 'small 1'"),
                          ("small: -1\n", ":1: weight '-1' must be a finite number > 0"),
                          ("small: x\n", ":1: weight 'x' is not a number"),
                          ("small: 1\nsmall: 2\n", ":2: small is listed twice")]:
        spec.write_text(text)
        with pytest.raises(DataError) as info:
            parse_blend(spec)
        assert str(info.value) == f"{spec}{message}"


def test_blend_refuses_parts_made_with_another_tokenizer(tiny, parts, tmp_path):
    other_tok = tmp_path / "tok"
    shutil.copytree(tiny["tokenizer"], other_tok)
    config = json.loads((other_tok / "tokenizer_config.json").read_text())
    (other_tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 99}))
    tokenize_corpus([str(parts["root"] / "small.jsonl")], other_tok, tmp_path / "other")
    spec = tmp_path / "blend.txt"
    spec.write_text(f"{parts['large']}: 1\n{tmp_path / 'other'}: 1\n")
    with pytest.raises(DataError) as info:
        load_blend(spec)
    assert str(info.value).startswith(f"{spec}: {tmp_path / 'other'} was made with another tokenizer than "
                                      f"{parts['large']} (tokenizer fingerprint ")


def test_blend_sampler_proportions_determinism_and_ranges(parts):
    spec = parts["root"] / "b.txt"
    spec.write_text("small: 1\nlarge: 3\n")
    sets, weights = load_blend(spec)
    sampler = BlendSampler(sets, weights, seq_len=16, seed=5)
    n = 200_000
    part, shard, item = sampler.sample(np.arange(n))
    shares = np.bincount(part, minlength=2) / n
    assert np.abs(shares - [0.25, 0.75]).max() < 0.005  # ~5 standard deviations
    assert np.array_equal(sampler.realised(n), shares)
    p2, s2, i2 = BlendSampler(sets, weights, seq_len=16, seed=5).sample(np.arange(1000, 1100))
    assert np.array_equal(p2, part[1000:1100]) and np.array_equal(s2, shard[1000:1100])
    assert np.array_equal(i2, item[1000:1100])  # index-addressed: any slice, any process, same samples
    assert not np.array_equal(BlendSampler(sets, weights, 16, seed=6).sample(np.arange(100))[0], part[:100])
    for p, shards in enumerate(sets):
        sel = part == p
        windows = np.asarray(shards.shard_num_tokens)[shard[sel]] // 16
        assert (item[sel] >= 0).all() and (item[sel] < windows).all()
        assert len(np.unique(shard[sel])) == shards.num_shards  # every shard is reached
    docs = BlendSampler(sets, weights, seq_len=None, seed=0)
    assert docs.items.tolist() == [40, 400]


def test_cli_blend_reports_realised_proportions(parts, capsys):
    spec = parts["root"] / "cli.txt"
    spec.write_text("small: 1\nlarge: 1\n")
    assert main(["blend", str(spec), "--seq-len", "32", "--samples", "100000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"blend {spec}: 2 parts, split train, tokenizer ")
    shares = [float(line.split("realised ")[1].split(",")[0]) for line in lines[1:]]
    assert abs(shares[0] - 0.5) < 0.01 and abs(sum(shares) - 1) < 1e-3
