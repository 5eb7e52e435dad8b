#!/usr/bin/env python3
"""Make the tokenizer and chat-template reference fixtures from Hugging Face `transformers`.

Writes, under crates/scalpel-models/tests/fixtures/tokenizer/:

  smollm2.json     for the default model's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf):
                   ids of ~40 varied texts without special tokens ("ids") and as
                   `tokenizer(text)` gives them ("ids_default"), their decodes with and
                   without special tokens, the piece each id decodes to alone, the ids
                   the same vocabulary gives under other GGUF pre-tokenizer flavours
                   ("flavours"), and chat-template renderings.
  tiny_spm.gguf    a tiny sentencepiece-style ("llama") GGUF with byte fallback, no
  tiny_spm.json    merges (they are derived from the scores) and its reference ids.

The reference tokenizer is `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, with one
correction: for the "smollm" pre-tokenizer transformers' GGUF loader uses plain GPT-2
`ByteLevel`, while SmolLM2's own tokenizer.json (and llama.cpp) first isolate every
digit (`Digits(individual_digits=True)`). The two only disagree on a non-ASCII numeral
after a space (" ²"); the fixture follows the real tokenizer and lists the texts where
the transformers GGUF loader differs under "transformers_gguf_differs".

Usage (no network needed):

  /root/.cache/scalpel/ref-venv/bin/python scripts/make_tokenizer_fixtures.py [GGUF_PATH]
"""

import json
import os
import sys

import gguf
import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import set_split_regex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "crates", "scalpel-models", "tests", "fixtures", "tokenizer")
DEFAULT_GGUF = "/root/.cache/scalpel/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "The capital of France is",
    "is 12345  ok",
    " is 12345  ok",
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "two  spaces   three    four",
    "tab\tseparated\t\tvalues",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "  \t \n mixed whitespace \r\n",
    "3.14159265358979 and 1,000,000 and 2024-01-31",
    "9876543210",
    "I'm sure they'll say it's what we'd've done",
    "café naïve résumé Ångström",
    "東京は日本の首都です。",
    "你好，世界",
    "안녕하세요",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "x² + y² = z², ½ and ¾",
    " ² after a space",
    "def f(x):\n    if x > 0:\n        return [x, {'a': (1, 2)}]\n    return None\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<html><body class=\"x\">&amp;</body></html>",
    "https://example.com/path?q=1&r=two#frag",
    "email@example.org",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text",
    "<|im_start",
    "ALL CAPS SHOUTING and MiXeD cAsE",
    "a" * 50,
    "The quick brown fox jumps over the lazy dog.",
    "$100.00 (€90) — 50% off!!!",
    "---===***+++",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "Paris",
]

# The SmolLM2 tokenizer.json's pre-tokenizer (HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM_PRE = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr! Ahoy, matey."},
        {"role": "user", "content": "  Where is the <b>trésor</b> & 'gold'?  "},
    ],
]

# Exercises what HF's Jinja environment does beyond plain Jinja: trim_blocks and lstrip_blocks,
# Python string methods, loop controls, namespace, tojson without HTML escaping, the special tokens.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ ns.n }}] {{ message['role'].upper() }}: {{ message['content'].strip() }}
    {% if message.content.startswith('  ') %}
(indented) {{ message.content | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[{{ ns.n + 1 }}] ASSISTANT:{% else %}{{ eos_token }}{% endif %}"""


def load(gguf_path):
    directory, name = os.path.split(gguf_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def case(tok, text, pieces=True):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = {
        "text": text,
        "ids": ids,
        "ids_default": tok(text)["input_ids"],
        "decode": tok.decode(ids, skip_special_tokens=False),
        "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
    }
    if pieces:
        # How one id reads alone. Only for byte-level vocabularies: a sentencepiece decoder strips
        # the leading space of the first token, which is not what a per-token display wants.
        out["pieces"] = [tok.decode([i]) for i in ids]
    return out


def smollm2(gguf_path):
    tok = load(gguf_path)
    gguf_ids = {text: tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS}
    tok.backend_tokenizer.pre_tokenizer = SMOLLM_PRE
    cases = [case(tok, text) for text in TEXTS]
    by_text = {c["text"]: c["ids"] for c in cases}
    # The checks formats.md states; "Ġis" (314) needs the leading space, "is" alone is 271.
    assert by_text[" is 12345  ok"] == [314, 216, 33, 34, 35, 36, 37, 216, 10907]
    assert by_text["is 12345  ok"] == [271, 216, 33, 34, 35, 36, 37, 216, 10907]
    assert by_text["The capital of France is"][0] == 504
    differs = [{"text": c["text"], "ids": gguf_ids[c["text"]]} for c in cases if gguf_ids[c["text"]] != c["ids"]]
    for d in differs:
        print(f"transformers' GGUF loader differs from SmolLM2's tokenizer.json on {d['text']!r}")

    flavours = {}
    for flavour in ("llama-bpe", "qwen2", "gpt-2"):
        other = load(gguf_path)
        if flavour != "gpt-2":
            set_split_regex(other, {"pre_tokenizer_type": flavour})
        flavours[flavour] = [other(text, add_special_tokens=False)["input_ids"] for text in TEXTS]

    chats = []
    for template in (None, CUSTOM_TEMPLATE):
        for messages in CONVERSATIONS:
            for add_generation_prompt in (False, True):
                rendered = tok.apply_chat_template(
                    messages,
                    chat_template=template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
                chats.append(
                    {
                        "template": template,
                        "messages": messages,
                        "add_generation_prompt": add_generation_prompt,
                        "rendered": rendered,
                    }
                )
    return {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": os.path.basename(gguf_path),
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "chat_template": tok.chat_template,
        "cases": cases,
        "flavours": flavours,
        "transformers_gguf_differs": differs,
        "chats": chats,
    }


# A sentencepiece vocabulary: control and unknown tokens, 256 byte-fallback tokens, then pieces
# whose scores give the merge order (the file has no merges, as with llama.cpp's "llama" files).
SPM_PIECES = [
    "▁", "▁t", "he", "▁the", "▁a", "▁c", "at", "▁cat", "s", "▁is", "▁on", "▁mat", "ma", "in",
    "▁in", "▁h", "at", "ou", "se", "▁hou", "▁house", "▁▁", "i", "n", "o", "t", "h", "e", "a",
    "c", "m", "u", "r", "é", "▁caf", "▁café", "f", "1", "2",
]


def tiny_spm():
    pieces = list(dict.fromkeys(SPM_PIECES))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|eot|>", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    path = os.path.join(OUT, "tiny_spm.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load(path)
    texts = [
        "the cat is on the mat",
        " the  cat",
        "the café in the house",
        "héllo wörld\n",
        "12 cats",
        "<s>the</s>",
        "a<|eot|>b <think>c",
        "東京 😀",
        "",
    ]
    return {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "transformers": transformers.__version__,
        "gguf": "tiny_spm.gguf",
        "cases": [case(tok, text, pieces=False) for text in texts],
    }


def main():
    gguf_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
    os.makedirs(OUT, exist_ok=True)
    for name, data in (("smollm2.json", smollm2(gguf_path)), ("tiny_spm.json", tiny_spm())):
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
