"""User datasets: readers per schema and file type, per-reason drop counts, strict mode, chat templates.

The fixtures (tests/fixtures/data/*.jsonl) hold valid rows and one malformed row of every kind; the
expected counts below are written from the fixtures' comments by hand, not computed by the code.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from nemo_rlsr.config import ConfigError, DataConfig
from nemo_rlsr.data.chat import HFTokenizer
from nemo_rlsr.data.dataset import load_training_data
from nemo_rlsr.data.instructions import DatasetError
from hf_tokenizers import build_hf_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# The fixtures' huge rows are ~6 kB; the long prompt is ~50 words, the long reference ~45.
LIMITS = {"max_row_bytes": 4096, "max_prompt_tokens": 32, "max_reference_tokens": 20}

CHAT_DROPS = {"missing_field": 2, "wrong_type": 2, "empty_reference": 1, "no_assistant_turn": 1, "invalid_utf8": 1,
              "invalid_json": 1, "row_too_large": 1, "duplicate_prompt": 1, "unknown_role": 1, "empty_prompt": 1,
              "not_an_object": 1, "prompt_too_long": 1, "reference_too_long": 1}
# Bad rows of each fixture in file order, with their reason (rows 1-8 are valid in every fixture).
CHAT_BAD_ROWS = ["missing_field", "wrong_type", "wrong_type", "missing_field", "empty_reference", "no_assistant_turn",
                 "invalid_utf8", "invalid_json", "row_too_large", "duplicate_prompt", "unknown_role", "empty_prompt",
                 "not_an_object", "prompt_too_long", "reference_too_long"]
PR_BAD_ROWS = ["missing_field", "wrong_type", "wrong_type", "empty_reference", "empty_prompt", "invalid_utf8",
               "invalid_json", "invalid_json", "row_too_large", "duplicate_prompt", "not_an_object", "prompt_too_long",
               "reference_too_long", "missing_field"]


def data_cfg(path, fmt: str, **kw) -> DataConfig:
    return DataConfig(path=str(path), format=fmt, **{**LIMITS, **kw})


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("name, fmt, bad_rows", [
    ("tulu.jsonl", "tulu", CHAT_BAD_ROWS),
    ("tulu.jsonl", "auto", CHAT_BAD_ROWS),
    ("infinity.jsonl", "infinity", CHAT_BAD_ROWS),
    ("infinity.jsonl", "auto", CHAT_BAD_ROWS),
    ("prompt_response.jsonl", "prompt_response", PR_BAD_ROWS),
])
def test_fixture_counts_every_row(name, fmt, bad_rows):
    path = FIXTURES / name
    logged: list[str] = []
    data = load_training_data(data_cfg(path, fmt), logged.append)
    report = data.report
    lines_in_file = len(path.read_bytes().splitlines())
    assert report.rows_in == lines_in_file == 8 + len(bad_rows)
    assert report.rows_kept == len(data.train) == 8
    assert dict(report.dropped) == dict(Counter(bad_rows))
    assert report.rows_in == report.rows_kept + sum(report.dropped.values())
    assert logged[0] == f"data {path}: {report.rows_in} rows read, 8 kept, {len(bad_rows)} dropped"
    assert sorted(logged[1:]) == sorted(f"  dropped {n} rows: {r}" for r, n in Counter(bad_rows).items())
    references = [t.example.reference for t in data.train]
    assert references[0] == "a dog is an animal that barks and likes to play ."  # the first dog row, not its duplicate
    if fmt != "prompt_response":
        assert references[2] == "a lemon is yellow ."  # multi-turn: the LAST assistant turn is the reference
        assert data.train[2].example.prompt == ("user : what is a lemon ? assistant : a lemon is a sour yellow fruit . "
                                                "user : and what colour is it ?")


@pytest.mark.parametrize("name, fmt, bad_rows", [
    ("tulu.jsonl", "tulu", CHAT_BAD_ROWS),
    ("infinity.jsonl", "infinity", CHAT_BAD_ROWS),
    ("prompt_response.jsonl", "prompt_response", PR_BAD_ROWS),
])
def test_strict_mode_names_file_row_and_reason_of_each_bad_row(tmp_path, name, fmt, bad_rows):
    lines = (FIXTURES / name).read_bytes().splitlines(keepends=True)
    good, bad = lines[:8], lines[8:]
    assert load_training_data(data_cfg(FIXTURES / name, fmt, strict=False), quiet).report.rows_kept == 8
    with pytest.raises(DatasetError, match=rf"^{FIXTURES / name}:9: {bad_rows[0]}: "):
        load_training_data(data_cfg(FIXTURES / name, fmt, strict=True), quiet)
    for line, reason in zip(bad, bad_rows):  # each bad row alone after the good ones: reported at row 9
        path = tmp_path / f"one_{reason}.jsonl"
        path.write_bytes(b"".join(good) + line)
        with pytest.raises(DatasetError, match=rf"^{path}:9: {reason}: .*data\.strict=true"):
            load_training_data(data_cfg(path, fmt, strict=True), quiet)


def test_strict_mode_accepts_a_clean_file(tmp_path):
    path = tmp_path / "clean.jsonl"
    path.write_bytes(b"".join((FIXTURES / "tulu.jsonl").read_bytes().splitlines(keepends=True)[:8]))
    data = load_training_data(data_cfg(path, "tulu", strict=True), quiet)
    assert data.report.rows_kept == 8 and not data.report.dropped


def test_field_names_and_role_names_are_configurable(tmp_path):
    path = tmp_path / "custom.jsonl"
    rows = [{"dialog": [{"speaker": "person", "text": "what is a dog ?"}, {"speaker": "bot", "text": "a pet ."}]},
            {"dialog": [{"speaker": "human", "text": "what is a cat ?"}, {"speaker": "bot", "text": "a pet too ."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data_cfg(path, "infinity", conversations_field="dialog", from_field="speaker", value_field="text",
                   infinity_user_roles=["person"], infinity_assistant_roles=["bot"])
    data = load_training_data(cfg, quiet)
    assert [t.example.reference for t in data.train] == ["a pet ."]
    assert dict(data.report.dropped) == {"unknown_role": 1}  # "human" is no longer a user role

    pr = tmp_path / "pr.jsonl"
    pr.write_text(json.dumps({"question": "what is rain ?", "answer": "water ."}) + "\n")
    data = load_training_data(data_cfg(pr, "prompt_response", prompt_field="question", response_field="answer"), quiet)
    assert [(t.example.prompt, t.example.reference) for t in data.train] == [("what is rain ?", "water .")]


def test_duplicates_are_kept_when_asked(tmp_path):
    data = load_training_data(data_cfg(FIXTURES / "tulu.jsonl", "tulu", drop_duplicate_prompts=False), quiet)
    assert data.report.rows_kept == 9 and "duplicate_prompt" not in data.report.dropped


def test_parquet_rows_are_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chat(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    rows = [
        {"messages": chat(("user", "what is a dog ?"), ("assistant", "a pet ."))},
        {"messages": chat(("system", "be brief ."), ("user", "what is a cat ?"), ("assistant", "a pet too ."))},
        {"messages": None},                                                        # missing_field
        {"messages": chat(("user", "what is a cup ?"))},                           # no_assistant_turn
        {"messages": chat(("user", "what is a cup ?"), ("assistant", ""))},        # empty_reference
        {"messages": chat(("user", "what is a dog ?"), ("assistant", "a dog ."))}, # duplicate_prompt
        {"messages": chat(("user", "what is sand ?"), ("assistant", "y " * 3000))},  # row_too_large
        {"messages": chat(("user", None), ("assistant", "who knows ."))},          # missing_field (null content)
    ]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # rows span row groups
    data = load_training_data(data_cfg(path, "tulu"), quiet)
    assert data.report.rows_in == 8 and data.report.rows_kept == 2
    assert dict(data.report.dropped) == {"missing_field": 2, "no_assistant_turn": 1, "empty_reference": 1,
                                         "duplicate_prompt": 1, "row_too_large": 1}
    with pytest.raises(DatasetError, match=rf"^{path}:3: missing_field: missing field 'messages'"):
        load_training_data(data_cfg(path, "tulu", strict=True), quiet)

    binary = tmp_path / "binary.parquet"  # bytes that are not UTF-8 arrive as a bytes value: wrong type
    pq.write_table(pa.table({"prompt": pa.array([b"what is a dog ?", b"caf\xe9"], pa.binary()),
                             "response": ["a pet .", "coffee ."]}), binary)
    with pytest.raises(DatasetError, match=r"no usable rows .*2 rows read, 0 kept, 2 dropped.*dropped 2 rows: wrong_type"):
        load_training_data(data_cfg(binary, "prompt_response"), quiet)


def test_hf_datasets_directory(tmp_path):
    import datasets

    rows = [{"conversations": [{"from": "human", "value": "what is a dog ?"}, {"from": "gpt", "value": "a pet ."}]},
            {"conversations": [{"from": "system", "value": "be brief ."}, {"from": "human", "value": "what is a cat ?"},
                               {"from": "gpt", "value": "a pet too ."}]},
            {"conversations": [{"from": "human", "value": "what is a cup ?"}, {"from": "gpt", "value": " "}]},
            {"conversations": [{"from": "human", "value": "what is a cup ?"}]},
            {"conversations": None}]
    directory = tmp_path / "hf_infinity"
    datasets.Dataset.from_list(rows).save_to_disk(str(directory))
    data = load_training_data(data_cfg(directory, "infinity"), quiet)
    assert data.report.rows_in == 5 and data.report.rows_kept == 2
    assert dict(data.report.dropped) == {"empty_reference": 1, "no_assistant_turn": 1, "missing_field": 1}
    assert data.train[1].example.prompt == "system : be brief . user : what is a cat ?"
    with pytest.raises(DatasetError, match=rf"^{directory}:3: empty_reference: "):
        load_training_data(data_cfg(directory, "infinity", strict=True), quiet)

    split_dir = tmp_path / "hf_dict"  # a DatasetDict: data.hf_split picks the split
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(split_dir))
    assert load_training_data(data_cfg(split_dir, "infinity", hf_split="test"), quiet).report.rows_kept == 2


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.format='sharegpt' is not one of"):
        load_training_data(DataConfig(path=str(FIXTURES / "tulu.jsonl"), format="sharegpt"), quiet)
    with pytest.raises(ConfigError, match="needs data.path"):
        load_training_data(DataConfig(format="tulu"), quiet)
    for missing in (str(tmp_path / "missing.jsonl"), "data/missing.parquet"):  # never mistaken for a hub name
        with pytest.raises(FileNotFoundError, match="no such dataset"):
            load_training_data(DataConfig(path=missing, format="tulu"), quiet)
    (tmp_path / "rows.csv").write_text("prompt,response\n")
    with pytest.raises(ValueError, match="unknown dataset file type '.csv'"):
        load_training_data(DataConfig(path=str(tmp_path / "rows.csv"), format="auto"), quiet)


def test_bundled_default_is_unchanged():
    from nemo_rlsr.data.instructions import BUNDLED_DATASET, build_word_tokenizer, encode_prompt, load_instructions

    data = load_training_data(DataConfig(), quiet)
    examples = load_instructions(BUNDLED_DATASET)
    assert data.report is None and data.tokenizer == build_word_tokenizer(examples)
    assert [t.example for t in data.train + data.heldout] == [e for e in examples if e.split == "train"] + [
        e for e in examples if e.split == "heldout"]
    assert [t.prompt_ids for t in data.train] == [encode_prompt(data.tokenizer, e.prompt) for e in examples
                                                  if e.split == "train"]


# --- real Hugging Face tokenizers with chat templates, built offline -------------------------------

def template_ids(hf, messages) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def hf_tokenizer_dir(request, tmp_path_factory) -> Path:
    return build_hf_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("name, fmt", [("tulu.jsonl", "tulu"), ("infinity.jsonl", "infinity")])
def test_prompt_is_the_tokenizers_own_chat_template(hf_tokenizer_dir, name, fmt):
    from transformers import AutoTokenizer

    data = load_training_data(data_cfg(FIXTURES / name, fmt, tokenizer_path=str(hf_tokenizer_dir),
                                       max_prompt_tokens=60), quiet)
    assert isinstance(data.tokenizer, HFTokenizer)
    hf = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))  # an independent load of the same directory
    # Rows 2 (system turn) and 3 (multi-turn) of the fixtures, written out by hand.
    system_row = [{"role": "system", "content": "you answer in one short sentence ."},
                  {"role": "user", "content": "what is a cat ?"}]
    multi_turn = [{"role": "user", "content": "what is a lemon ?"},
                  {"role": "assistant", "content": "a lemon is a sour yellow fruit ."},
                  {"role": "user", "content": "and what colour is it ?"}]
    for example, messages in zip(data.train[1:3], [system_row, multi_turn]):
        assert example.prompt_ids == template_ids(hf, messages)
        assert data.tokenizer.render(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
        assert hf.unk_token_id not in example.prompt_ids
    assert data.train[2].example.reference == "a lemon is yellow ."
    assert data.train[2].reference_ids == hf.encode("a lemon is yellow .", add_special_tokens=False)
    if "im_start" in hf.chat_template:  # the ChatML text itself, spelled out
        assert data.tokenizer.render(system_row) == ("<|im_start|>system\nyou answer in one short sentence .<|im_end|>\n"
                                                     "<|im_start|>user\nwhat is a cat ?<|im_end|>\n"
                                                     "<|im_start|>assistant\n")
    else:
        assert template_ids(hf, system_row)[0] == hf.bos_token_id == data.tokenizer.bos_id


def test_hf_tokenizer_identity(hf_tokenizer_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hf_tokenizer_dir, copy)
    assert HFTokenizer(copy).to_json() == HFTokenizer(hf_tokenizer_dir).to_json()  # a moved copy is the same
    other = build_hf_tokenizer(tmp_path / "other", "chatml" if "llama" not in str(hf_tokenizer_dir) else "llama3")
    if HFTokenizer(other).hf.chat_template != HFTokenizer(hf_tokenizer_dir).hf.chat_template:
        assert HFTokenizer(other).to_json() != HFTokenizer(hf_tokenizer_dir).to_json()


def test_missing_tokenizer_folder_is_a_clear_error_not_a_hub_lookup(tmp_path, capsys):
    """A path that is not there (a model folder not converted yet) names the key; transformers would
    take it for a hub repository name and fail on the network instead (`plan` did)."""
    from nemo_rlsr.cli import main

    with pytest.raises(FileNotFoundError, match="data.tokenizer_path=.*no such directory"):
        HFTokenizer(tmp_path / "not_converted_yet")
    tiny = Path(__file__).resolve().parents[1] / "conf/rlsr_tiny.yaml"
    assert main(["plan", "--config", str(tiny), f"data.tokenizer_path={tmp_path / 'nothing'}"]) == 2
    assert "data.tokenizer_path=" in capsys.readouterr().err


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "what is a dog ?", "response": "a pet ."}, "not a row",
                                {"prompt": "what is a cat ?", "response": "a pet too ."}]))
    data = load_training_data(data_cfg(path, "prompt_response"), quiet)
    assert (data.report.rows_in, data.report.rows_kept, dict(data.report.dropped)) == (3, 2, {"not_an_object": 1})
    path.write_text('[{"prompt": "what is a dog ?",')  # one value: a broken array cannot be split into rows
    with pytest.raises(ValueError, match="not a JSON array file"):
        load_training_data(data_cfg(path, "prompt_response"), quiet)
