#!/usr/bin/env python3
"""Make the tiny corpus fixtures that crates/scalpel-data/tests/corpus.rs reads.

Writes, under crates/scalpel-data/tests/fixtures/corpus/:

  docs.jsonl     four JSON documents (text in "text", two with a "source"), one blank line
  dir/a.txt      two plain-text documents, one per file
  dir/b.txt
  docs.parquet   five documents in three row groups (two rows each), so the reader crosses
                 batches; columns "text" (utf8), "body" (large_utf8, one null) and "n" (int64,
                 not text, for the wrong-type error)
  packing_saelens.json
                 with --saelens: random token-id documents packed by SAELens's own
                 `concat_and_batch_sequences` (as its ActivationsStore calls it: BOS as
                 `begin_batch_token_id` when prepend_bos, no `begin_sequence_token_id`) under
                 random configs, for the packing parity test

Usage (needs pyarrow, and torch for --saelens; no network):

  /root/.cache/scalpel/ref-venv/bin/python scripts/make_corpus_fixtures.py \
      [--saelens SAELENS_CHECKOUT/sae_lens/tokenization_and_batching.py]

The committed packing_saelens.json came from SAELens 6.18.0 (commit 91ca16cc).
"""

import argparse
import importlib.util
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "crates", "scalpel-data", "tests", "fixtures", "corpus",
)

JSONL = [
    {"text": "The capital of France is Paris.", "source": "wiki/france"},
    {"text": "Cats sleep for most of the day."},
    None,  # a blank line, which readers skip
    {"text": "Numbers: 12345 and 678.", "source": "synthetic"},
    {"text": "Unicode survives: café, naïve, 東京."},
]

TXT = {
    "a.txt": "Once upon a time there was a small model.\nIt read every line.\n",
    "b.txt": "A second file, a second document.\n",
}

PARQUET_TEXT = [
    "First parquet document.",
    "Second parquet document.",
    "Third one, in the second row group.",
    "Fourth.",
    "Fifth and last.",
]


BOS, EOS = 1, 2


def saelens_packing(module_path):
    spec = importlib.util.spec_from_file_location("tokenization_and_batching", module_path)
    tab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tab)
    import torch

    rng = random.Random(0)
    cases = []
    while len(cases) < 32:
        disable = rng.random() < 0.25
        prepend_bos = rng.random() < 0.7
        # SAELens loops forever on context 1 with BOS; we reject it instead.
        context_size = rng.randint(2 if prepend_bos else 1, 9)
        sep = rng.choice(["bos", "eos", None, 7])
        sep_id = {"bos": BOS, "eos": EOS, None: None}.get(sep, sep)
        docs = []
        for _ in range(rng.randint(1, 6)):
            # SAELens's disable_concat path indexes doc[0]: no empty documents there.
            n = rng.randint(1 if disable else 0, 8)
            doc = [rng.randint(10, 40) for _ in range(n)]
            if doc and rng.random() < 0.2:
                doc[0] = rng.choice([BOS, EOS, 7])
            docs.append(doc)
        contexts = [
            t.tolist()
            for t in tab.concat_and_batch_sequences(
                (torch.tensor(d, dtype=torch.long) for d in docs),
                context_size,
                begin_batch_token_id=BOS if prepend_bos else None,
                begin_sequence_token_id=None,
                sequence_separator_token_id=sep_id,
                disable_concat_sequences=disable,
            )
        ]
        config = {
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            "sequence_separator_token": sep,
            "disable_concat_sequences": disable,
        }
        cases.append({"config": config, "docs": docs, "contexts": contexts})
    with open(os.path.join(OUT, "packing_saelens.json"), "w") as f:
        f.write('{"bos": %d, "eos": %d, "cases": [\n' % (BOS, EOS))
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--saelens", help="path to SAELens's tokenization_and_batching.py")
    args = parser.parse_args()
    os.makedirs(os.path.join(OUT, "dir"), exist_ok=True)
    with open(os.path.join(OUT, "docs.jsonl"), "w", encoding="utf-8") as f:
        for row in JSONL:
            f.write("" if row is None else json.dumps(row, ensure_ascii=False))
            f.write("\n")
    for name, text in TXT.items():
        with open(os.path.join(OUT, "dir", name), "w", encoding="utf-8") as f:
            f.write(text)
    table = pa.table(
        {
            "text": pa.array(PARQUET_TEXT, type=pa.string()),
            "body": pa.array(
                [t.upper() if i != 1 else None for i, t in enumerate(PARQUET_TEXT)],
                type=pa.large_string(),
            ),
            "n": pa.array(range(len(PARQUET_TEXT)), type=pa.int64()),
        }
    )
    # Snappy is pyarrow's default and what most published datasets use.
    pq.write_table(
        table, os.path.join(OUT, "docs.parquet"), row_group_size=2, compression="snappy"
    )
    if args.saelens:
        saelens_packing(args.saelens)


if __name__ == "__main__":
    main()
