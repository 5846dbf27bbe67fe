"""Real English sentences that ship offline (the Zen of Python, `this` module) and a real tokenizer.json."""

from __future__ import annotations

import codecs
import json
from pathlib import Path


def sentences() -> list[str]:
    """The 19 aphorisms of PEP 20, as the `this` module holds them (ROT13), decoded."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # prints the Zen on first import

    text = codecs.decode(this.s, "rot13")
    return [line.strip() for line in text.splitlines()[2:] if line.strip()]


def write_tokenizer_json(path: Path, texts: list[str]) -> Path:
    """A BERT-style WordLevel tokenizer ([CLS] words [SEP]) built by the `tokenizers` library, saved as JSON."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w.lower() for t in texts for w in t.replace(".", " . ").replace(",", " , ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    from tokenizers import normalizers

    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
