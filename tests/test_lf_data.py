"""LLaMA-Factory dataset formats read to the token streams a hand-built expectation gives (byte tokenizer:
token = UTF-8 byte + 3), and what spbench does not read is refused with the reason."""
from __future__ import annotations

import json
import re

import pytest

from runtime.config import from_dict
from runtime.data import DataError, build_units
from runtime.losses import IGNORE
from runtime.records import ByteTokenizer, read_records


def enc(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def write(path, examples, jsonl=False):
    path.write_text("\n".join(json.dumps(e) for e in examples) + "\n" if jsonl else json.dumps(examples, indent=2))
    return path


def records(tmp_path, dataset, stage="sft", info=None, **cfg):
    if info is not None:
        (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    c = from_dict({"dataset": dataset, "dataset_dir": str(tmp_path), "stage": stage, **cfg})
    return read_records(c, ByteTokenizer())


ALPACA = {"instruction": "add 1 and 2", "input": "show it", "output": "3", "system": "be brief",
          "history": [["hi", "hello"]]}
SHAREGPT = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                              {"from": "gpt", "value": "hello"}, {"from": "human", "value": "add 1 and 2\nshow it"},
                              {"from": "gpt", "value": "3"}]}
OPENAI = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}, {"role": "user", "content": "add 1 and 2\nshow it"},
                       {"role": "assistant", "content": "3"}]}
# the same conversation in each format: system on the first prompt, both assistant turns supervised
EXPECTED_TURNS = [[enc("be brief\nhi\n"), enc("hello")], [enc("add 1 and 2\nshow it\n"), enc("3")]]


@pytest.mark.parametrize("example", [ALPACA, SHAREGPT, OPENAI], ids=["alpaca", "sharegpt", "openai"])
@pytest.mark.parametrize("jsonl", [False, True], ids=["json-array", "jsonl"])
def test_sft_formats_keep_system_and_every_turn(tmp_path, example, jsonl):
    path = write(tmp_path / ("d.jsonl" if jsonl else "d.json"), [example, example], jsonl)
    assert records(tmp_path, str(path)) == [{"turns": EXPECTED_TURNS}] * 2


def test_every_assistant_turn_is_supervised_with_its_eos(tmp_path):
    path = write(tmp_path / "d.json", [SHAREGPT])
    [unit] = build_units("sft", records(tmp_path, str(path)), 4096, False, eos=2)
    doc = unit.docs[0]
    (p1, r1), (p2, r2) = EXPECTED_TURNS
    assert doc.input_ids == p1 + r1 + [2] + p2 + r2 + [2]
    assert doc.labels == [IGNORE] * len(p1) + r1 + [2] + [IGNORE] * len(p2) + r2 + [2]


def test_dataset_info_names_columns_tags_and_concatenates(tmp_path):
    write(tmp_path / "a.json", [{"q": "hi", "a": "hello", "sys": "be brief"}])
    write(tmp_path / "b.jsonl", [{"dialog": [{"who": "u", "text": "hi"}, {"who": "bot", "text": "hello"}]}], jsonl=True)
    info = {"first": {"file_name": "a.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}},
            "second": {"file_name": "b.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog"},
                       "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "u", "assistant_tag": "bot"}}}
    got = records(tmp_path, "second,first", info=info)
    assert got == [{"turns": [[enc("hi\n"), enc("hello")]]}, {"turns": [[enc("be brief\nhi\n"), enc("hello")]]}]
    assert records(tmp_path, "first", info=info, max_samples=1) == got[1:]


PAIR = {"prompt": enc("be brief\nhi\nhello"), "chosen": enc("good"), "rejected": enc("bad")}


@pytest.mark.parametrize("example,entry", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                        {"from": "human", "value": "q"}],
      "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}, "system": "be brief"},
     {"formatting": "sharegpt", "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                            "system": "system"}}),
    ({"instruction": "q", "input": "", "chosen": "good", "rejected": "bad", "system": "be brief",
      "history": [["hi", "hello"]]},
     {"columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}),
], ids=["sharegpt-ranking", "alpaca-ranking"])
def test_preference_formats(tmp_path, example, entry):
    write(tmp_path / "p.json", [example])
    got = records(tmp_path, "pref", stage="dpo", info={"pref": {"file_name": "p.json", "ranking": True, **entry}})
    # history turns then the last user turn form the prompt; each history reply ends with eos (id 2), as in SFT
    assert got == [{"prompt": enc("be brief\nhi\n") + enc("hello") + [2] + enc("q\n"),
                    "chosen": enc("good"), "rejected": enc("bad")}]


def test_plain_prompt_chosen_rejected_file(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}], jsonl=True)
    assert records(tmp_path, str(path), stage="dpo") == [{"prompt": enc("q\n"), "chosen": enc("good"), "rejected": enc("bad")}]


REFUSED = [  # (examples, dataset_info entry or None for a bare file, stage, what the error says)
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "tools": "[{}]"}], None, "sft",
     "tool definitions ('tools') are not supported"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
                         {"from": "observation", "value": "1"}, {"from": "gpt", "value": "x"}]}], None, "sft",
     "tool-call turns"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "x"}]}], None, "sft",
     "must alternate user, assistant"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}], None, "sft", "must end with an assistant turn"),
    ([{"instruction": "hi", "output": "x"}], None, "dpo", "field 'chosen' missing"),
    ([{"instruction": "hi", "output": "x"}], {"file_name": "d.json", "images": "x", "columns": {"images": "img"}}, "sft",
     "columns images are not supported"),
    ([{"instruction": "hi", "output": "x"}], {"hf_hub_url": "org/data"}, "sft", "reads local files only"),
    ([{"instruction": "hi", "output": "x"}], {"file_name": "d.json"}, "dpo", "is non-ranking data but stage is dpo"),
    ([{"text": "hi"}], None, "sft", "none of conversations, messages, instruction, prompt"),
]


@pytest.mark.parametrize("examples,entry,stage,msg", REFUSED, ids=[r[3][:30] for r in REFUSED])
def test_unreadable_data_is_refused_with_the_reason(tmp_path, examples, entry, stage, msg):
    path = write(tmp_path / "d.json", examples)
    info = None if entry is None else {"d": entry}
    with pytest.raises(DataError, match=re.escape(msg)):
        records(tmp_path, "d" if entry else str(path), stage=stage, info=info)


def test_other_file_types_and_missing_names_say_what_to_do(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,output\nhi,x\n")
    with pytest.raises(DataError, match="only .json and .jsonl files are read"):
        records(tmp_path, str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="there is no .*dataset_info.json to name it"):
        records(tmp_path, "alpaca_en_demo")
    with pytest.raises(DataError, match="nor an entry of .*dataset_info.json .it has other"):
        records(tmp_path, "alpaca_en_demo", info={"other": {"file_name": "x.json"}})


# ---- chat templates: the checkpoint tokenizer's own rendering ------------------------------------------------
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> nl {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
WORDS = ["<pad>", "</s>", "<unk>", "<s>", "nl", "system", "user", "assistant", "say", "hello", "world", "brief"]


def chat_checkpoint(path, template=TEMPLATE):
    """A tokenizer-only checkpoint dir (whitespace word-level vocabulary) with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def test_chat_template_stream_equals_the_templates_rendering(tmp_path):
    from transformers import AutoTokenizer

    from runtime.records import load_tokenizer

    ckpt = chat_checkpoint(tmp_path / "ckpt")
    convo = [{"from": "system", "value": "brief"}, {"from": "human", "value": "say hello"},
             {"from": "gpt", "value": "hello world"}, {"from": "human", "value": "say world"}, {"from": "gpt", "value": "world"}]
    data = write(tmp_path / "d.json", [{"conversations": convo}])
    tok = load_tokenizer(str(ckpt))
    recs = read_records(from_dict({"dataset": str(data), "model_name_or_path": str(ckpt)}), tok)
    [unit] = build_units("sft", recs, 4096, False, eos=tok.eos_id)
    hf = AutoTokenizer.from_pretrained(ckpt)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    whole = hf.apply_chat_template([{"role": roles[m["from"]], "content": m["value"]} for m in convo], tokenize=False)
    ids = hf.encode(whole, add_special_tokens=False)
    assert unit.docs[0].input_ids == ids[:-1]  # the template's own tokens; the closing "nl" after the last eos is cut
    supervised = [t for t, label in zip(unit.docs[0].input_ids, unit.docs[0].labels) if label != IGNORE]
    assert supervised == hf.encode("hello world </s> world </s>", add_special_tokens=False)


def test_plain_note_on_presets_and_template_note_on_checkpoints(tmp_path):
    from runtime.records import load_tokenizer
    from runtime.render import format_note

    assert "plain format" in format_note("qwen3_nothink", ByteTokenizer())
    tok = load_tokenizer(str(chat_checkpoint(tmp_path / "ckpt")))
    assert "own chat template (not LLaMA-Factory's 'qwen3_nothink'" in format_note("qwen3_nothink", tok)
    assert "template: plain" in format_note("plain", tok)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    from runtime.records import load_tokenizer

    rewriting = "{% for m in messages %}{{ m['role'] }} {% if loop.last %}{{ m['content'] }} {% endif %}{% endfor %}"
    ckpt = chat_checkpoint(tmp_path / "ckpt", rewriting)
    data = write(tmp_path / "d.json", [SHAREGPT])
    with pytest.raises(DataError, match="does not render a conversation as a prefix"):
        read_records(from_dict({"dataset": str(data), "model_name_or_path": str(ckpt)}), load_tokenizer(str(ckpt)))
