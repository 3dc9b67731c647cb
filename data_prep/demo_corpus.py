"""`demo-corpus`: a jsonl corpus that needs no download, from the source of Python's own standard library.

Files are read in sorted path order until `max_mb` MB (10**6 bytes) of UTF-8 text are written, so the result is
deterministic for a given Python install. Installed packages (site-packages, dist-packages) are excluded so they
cannot change it; files that are not valid UTF-8 (a few encoding tests) or not valid Python are skipped.

Kinds (`--kind`):
- text: one document per stdlib `.py` file, `{"text": source}`.
- sft: one example per public top-level function or class with a docstring: `{"prompt": "Docstring: <its first
  paragraph>\nDefinition:", "response": " def name(args):"}` (or ` class Name:`).
- classification: the same docstrings, `{"text": <first paragraph>, "label": "function" | "class"}`.
- sentiment: short English movie reviews, `{"text": "A gripping thriller. The cast is great.", "label": "pos"}`
  (or `"neg"`), composed by a seeded generator from opinion phrases (Python ships no reviews), for fine-tuning
  a BERT-family encoder for sentiment without a download.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

from data_prep.errors import DataError
from data_prep.files import atomic_file
from data_prep.progress import log

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


KINDS = ("text", "sft", "classification", "sentiment")
OPINIONS = {"pos": ("A wonderful", "An excellent", "A moving", "A delightful", "A brilliant", "A charming",
                    "A superb", "A gripping", "A beautiful", "A clever"),
            "neg": ("A dull", "A terrible", "A boring", "An awful", "A clumsy", "A tedious", "A lifeless",
                    "A disappointing", "A messy", "A forgettable")}
SUBJECTS = ("film", "movie", "story", "thriller", "comedy", "drama", "sequel", "documentary", "western", "musical")
VERDICTS = {"pos": ("The cast is great.", "I loved every minute.", "Highly recommended.", "I would watch it again.",
                    "The ending is perfect.", "Worth every penny."),
            "neg": ("The cast is wasted.", "I nearly fell asleep.", "Skip it.", "I wanted my money back.",
                    "The ending makes no sense.", "Not worth the ticket.")}


def _reviews():
    """Every distinct review (2 x 10 x 10 x 6 = 1,200) once, in a fixed shuffled order: a test split never holds a
    review seen in training, only its phrases."""
    reviews = [{"text": f"{opinion} {subject}. {verdict}", "label": label} for label in ("pos", "neg")
               for opinion in OPINIONS[label] for subject in SUBJECTS for verdict in VERDICTS[label]]
    random.Random(0).shuffle(reviews)
    yield from reviews


def _sources():
    for path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():  # many empty __init__.py files; they would only be dropped later
            yield text


def _definitions(text: str):
    """(kind, name, signature source, docstring's first paragraph) of public top-level defs with a docstring."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
        if len(paragraph) < 20:
            continue
        if isinstance(node, ast.FunctionDef):
            yield "function", f"def {node.name}({ast.unparse(node.args)}):", paragraph
        else:
            yield "class", f"class {node.name}:", paragraph


def _records(kind: str):
    if kind == "sentiment":
        yield from _reviews()
        return
    seen = set()
    for text in _sources():
        if kind == "text":
            yield {"text": text}
            continue
        for label, definition, paragraph in _definitions(text):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            if kind == "sft":
                yield {"prompt": f"Docstring: {paragraph}\nDefinition:", "response": f" {definition}"}
            else:
                yield {"text": paragraph, "label": label}


def write_demo_corpus(output: str | Path, max_mb: float = 8.0, kind: str = "text") -> tuple[int, int]:
    """Write the corpus (atomically); returns (documents, bytes of text)."""
    if max_mb <= 0:
        raise DataError(f"--max-mb {max_mb} must be > 0")
    if kind not in KINDS:
        raise DataError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    limit = int(max_mb * 1e6)
    docs = written = 0
    with atomic_file(output, "w") as f:  # no partial corpus, e.g. when the disk fills up
        for record in _records(kind):
            if written >= limit:
                break
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs += 1
            written += sum(len(str(v).encode("utf-8")) for v in record.values())
        if docs == 0:
            raise DataError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
    log(f"demo-corpus ({kind}): {docs:,} documents, {written / 1e6:.1f} MB of text -> {output}")
    return docs, written
