"""build_batch on text and token data (real local Ray): JSONL, Parquet, .txt; a real tokenizer.json
(the `tokenizers` library) and a tokenizer by import path; batches compared as bytes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.unit.workers.text_data import sentences, write_jsonl, write_tokenizer_json
from trtcal.batch import open_batch
from trtcal.config import BatchConfig
from trtcal.errors import ConfigError, DataError
from trtcal.orchestrator.keys import batch_key_inputs
from trtcal.workers.build import build_batch

pytestmark = pytest.mark.integration

BERT_INPUTS = {
    "input_ids": {"length": 16},
    "attention_mask": {"mask": True, "length": 16},
    "token_type_ids": {"length": 16},
}


def test_text_with_tokenizer_json_same_bytes_for_1_and_3_workers(ray_local, tmp_path):
    texts = sentences()
    data = write_jsonl(tmp_path / "zen.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    tokenizer = write_tokenizer_json(tmp_path / "tokenizer.json", texts)
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.arrow"
        report = build_batch(str(data), str(out), num_samples=12, seed=5, workers=workers, chunk_size=2,
                             inputs=BERT_INPUTS, tokenizer=str(tokenizer))
        assert report.num_rows == 12
        outputs[workers] = out.read_bytes()
    assert outputs[1] == outputs[3]
    with open_batch(str(tmp_path / "w1.arrow")) as batch:
        assert {n: (list(i.shape), i.dtype) for n, i in batch.inputs.items()} == {
            "attention_mask": ([16], "int64"), "input_ids": ([16], "int64"), "token_type_ids": ([16], "int64"),
        }
        ids, mask = batch.array("input_ids"), batch.array("attention_mask")
        assert np.all(ids[:, 0] == 2)  # [CLS]
        lengths = mask.sum(axis=1)
        short = lengths < 16  # truncation keeps the first 16 tokens; shorter rows end with [SEP]
        assert short.any() and (~short).any()
        assert np.all(ids[np.arange(12)[short], lengths[short] - 1] == 3)
        assert np.all(ids[mask == 0] == 0)
        assert batch.sample_ids[0].startswith("zen.jsonl#")
        assert batch.spec["inputs"]["attention_mask"] == {"length": 16, "mask": True}
        assert len(batch.spec["text"]["tokenizer_sha256"]) == 64
    # another seed draws other rows
    other = build_batch(str(data), str(tmp_path / "s6.arrow"), num_samples=12, seed=6, inputs=BERT_INPUTS,
                        tokenizer=str(tokenizer))
    assert other.fingerprint != report.fingerprint


def test_token_id_columns_in_jsonl_and_parquet_give_the_same_arrays(ray_local, tmp_path):
    from tests.unit.workers.funcs import word_ids

    records = [word_ids(t) for t in sentences()]
    write_jsonl(tmp_path / "tokens.jsonl", records)
    table = pa.table({"input_ids": [r["input_ids"] for r in records], "token_type_ids": [r["token_type_ids"] for r in records]})
    pq.write_table(table, tmp_path / "tokens.parquet", row_group_size=5)
    inputs = {"input_ids": {"length": 12, "dtype": "int32"}, "attention_mask": {"mask": True, "length": 12, "dtype": "int32"}}
    arrays = {}
    for name in ("tokens.jsonl", "tokens.parquet"):
        build_batch(str(tmp_path / name), str(tmp_path / f"{name}.arrow"), num_samples="all", inputs=inputs)
        with open_batch(str(tmp_path / f"{name}.arrow")) as batch:
            arrays[name] = {n: batch.array(n).copy() for n in batch.input_names}
            assert batch.num_rows == len(records)
    for n in ("input_ids", "attention_mask"):
        assert arrays["tokens.jsonl"][n].dtype == np.int32
        assert np.array_equal(arrays["tokens.jsonl"][n], arrays["tokens.parquet"][n])
    # truncated to 12, mask of the unpadded length
    first = records[0]["input_ids"]
    assert arrays["tokens.jsonl"]["attention_mask"][0].sum() == min(12, len(first))


def test_txt_lines_with_a_tokenizer_function(ray_local, tmp_path):
    (tmp_path / "zen.txt").write_text("\n".join(sentences()) + "\n\n", encoding="utf-8")
    report = build_batch(str(tmp_path / "zen.txt"), str(tmp_path / "b.arrow"), num_samples=5, seed=1,
                         tokenizer="tests.unit.workers.funcs:word_ids",
                         inputs={"input_ids": {"length": 10}, "attention_mask": {"mask": True, "length": 10}})
    assert report.num_rows == 5 and report.spec["text"]["tokenizer"] == "tests.unit.workers.funcs:word_ids"


def test_text_errors_name_the_column_and_the_fix(ray_local, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a b"}, {"body": "no text field"}])
    tokenizer = "tests.unit.workers.funcs:word_ids"
    with pytest.raises(ConfigError, match="declare the model inputs"):
        build_batch(str(data), str(tmp_path / "x.arrow"), tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"d.jsonl.*field 'text' is missing"):
        build_batch(str(data), str(tmp_path / "x.arrow"), num_samples="all", tokenizer=tokenizer,
                    inputs={"input_ids": {"length": 4}})
    report = build_batch(str(data), str(tmp_path / "x.arrow"), num_samples="all", tokenizer=tokenizer,
                         inputs={"input_ids": {"length": 4}}, on_bad_input="skip")
    assert report.num_rows == 1 and report.spec["skipped_inputs"] == 1
    assert not (tmp_path / "x.arrow.tmp").exists()


def test_batch_keys_of_image_requests_do_not_change_and_text_requests_carry_their_inputs(tmp_path):
    listing = {"listing_sha256": "0" * 64, "listing_files": 3, "model_input": {"name": "input_ids"}}
    image = batch_key_inputs("s3://b/imagenet/", BatchConfig(), **listing)
    assert set(image) == {
        "kind", "data", "listing_sha256", "listing_files", "model_input", "num_samples", "seed", "stratify",
        "preprocess", "on_bad_input", "format_version",
    }
    text = batch_key_inputs(
        "d.jsonl", BatchConfig(inputs=BERT_INPUTS, tokenizer="tests.unit.workers.funcs:word_ids"), **listing
    )
    assert text["inputs"]["attention_mask"] == {"length": 16, "mask": True}
    assert json.dumps(text, sort_keys=True)
