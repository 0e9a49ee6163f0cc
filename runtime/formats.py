"""Datasets as LLaMA-Factory describes them: dataset_info.json names, alpaca / sharegpt / openai files, ranking.

`dataset: a,b` names entries of `dataset_dir/dataset_info.json` (file_name, formatting, ranking, columns, tags, as
LLaMA-Factory reads them) or paths of files; a file is a JSON array or JSON lines (.json or .jsonl), a folder all
of those inside it. Every example becomes a `Conversation` (system, alternating user/assistant messages, and for
ranking data the chosen and rejected last replies); runtime/render.py turns conversations into tokens.
Unlike LLaMA-Factory, which logs and skips a malformed example, spbench stops at it with the file and index.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataError
from .errors import read_json_object

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool"}
UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "kto_tag")


@dataclass
class Conversation:
    """One example: roles alternate user, assistant, … (SFT: ends with assistant; ranking: ends with user)."""

    messages: list[tuple[str, str]]
    system: str = ""
    chosen: str | None = None
    rejected: str | None = None


@dataclass
class DatasetAttr:
    """How to read one dataset (LLaMA-Factory's dataset_info.json entry, or guessed for a bare file)."""

    path: Path
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def column(self, name: str, default: str | None) -> str | None:
        return self.columns.get(name, default)


def resolve(dataset: str, dataset_dir: str, stage: str) -> list[DatasetAttr]:
    """The datasets `dataset` names, in order: dataset_info.json entries first, else file or folder paths."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = None
    attrs = []
    for name in (n.strip() for n in dataset.split(",") if n.strip()):
        if Path(name).exists():
            attrs.append(DatasetAttr(Path(name), ranking=stage == "dpo"))
            continue
        if info is None:
            info = _read_info(info_path, name)
        if name not in info:
            raise DataError(f"dataset {name!r} is not an existing file nor an entry of {info_path} "
                            f"(it has {', '.join(sorted(info)) or 'none'})")
        attrs.append(_attr(name, info[name], Path(dataset_dir), info_path))
    for a in attrs:
        if a.ranking != (stage == "dpo"):
            kind = "ranking (preference)" if a.ranking else "non-ranking"
            raise DataError(f"dataset {a.path} is {kind} data but stage is {stage}; "
                            f"dpo needs ranking: true data, sft the other kind")
    return attrs


def _read_info(info_path: Path, name: str) -> dict:
    if not info_path.is_file():
        raise DataError(f"dataset {name!r} is not an existing file, and there is no {info_path} to name it "
                        f"(set dataset_dir to the folder of your dataset_info.json, or give a file path)")
    return read_json_object(info_path, DataError, str(info_path))


def _attr(name: str, entry: Any, folder: Path, info_path: Path) -> DatasetAttr:
    where = f"{info_path} [{name}]"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: must be a JSON object")
    remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
    if remote and "file_name" not in entry:
        raise DataError(f"{where}: {remote[0]} needs a download, and spbench reads local files only; download it and "
                        f"give file_name")
    if "file_name" not in entry:
        raise DataError(f"{where}: no file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{where}: formatting {formatting!r} is unknown; use alpaca, sharegpt or openai")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    used = sorted(c for c in UNSUPPORTED_COLUMNS if columns.get(c))
    if used:
        raise DataError(f"{where}: columns {', '.join(used)} are not supported (text-only SFT and DPO)")
    path = folder / entry["file_name"]
    if not path.exists():
        raise DataError(f"{where}: file {path} does not exist")
    return DatasetAttr(path, formatting, bool(entry.get("ranking", False)), columns, tags)


def read_examples(path: Path) -> list[tuple[str, dict]]:
    """(where, example) of a JSON-array or JSON-lines file, or of every .json/.jsonl file in a folder."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"dataset folder {path} holds no .json or .jsonl file")
        return [ex for f in files for ex in read_examples(f)]
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(f"dataset {path}: only .json and .jsonl files are read (convert {path.suffix or 'it'} to JSON lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out = [(f"{path}[{i}]", x) for i, x in enumerate(items)]
    else:
        out = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    for where, x in out:
        if not isinstance(x, dict):
            raise DataError(f"{where}: expected a JSON object")
    return out


def guess(attr: DatasetAttr, example: dict) -> DatasetAttr:
    """A bare file's format from its first example: sharegpt/openai messages, alpaca, or prompt/chosen/rejected."""
    for key in ("conversations", "messages"):
        if isinstance(example.get(key), list):
            first = example[key][0] if example[key] else {}
            tags = OPENAI_TAGS if isinstance(first, dict) and "role" in first else SHAREGPT_TAGS
            return DatasetAttr(attr.path, "sharegpt", attr.ranking, {"messages": key}, tags)
    if "instruction" in example:
        return attr
    if "prompt" in example:
        return DatasetAttr(attr.path, "alpaca", attr.ranking, {"prompt": "prompt", "query": ""})
    raise DataError(f"{attr.path}: the first example has none of conversations, messages, instruction, prompt: "
                    f"give a dataset_info.json entry with its columns")


def convert(attr: DatasetAttr, ex: dict, where: str) -> Conversation:
    """One example → Conversation, as LLaMA-Factory's alpaca / sharegpt converters read it."""
    conv = _sharegpt(attr, ex, where) if attr.formatting in ("sharegpt", "openai") else _alpaca(attr, ex, where)
    if attr.ranking:
        if conv.chosen is None or conv.rejected is None:
            raise DataError(f"{where}: ranking data needs chosen and rejected replies")
    tools = ex.get(attr.column("tools", "tools"))
    if tools:
        raise DataError(f"{where}: tool definitions ('tools') are not supported yet: spbench renders text turns only")
    return conv


def _text(where: str, ex: dict, key: str | None, required: bool = True) -> str:
    value = ex.get(key) if key else None
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} missing or not a string")
    return value


def _alpaca(attr: DatasetAttr, ex: dict, where: str) -> Conversation:
    messages: list[tuple[str, str]] = []
    history = ex.get(attr.column("history", "history"))
    for turn in history or []:
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: history must be a list of [prompt, response] string pairs")
        messages += [("user", turn[0]), ("assistant", turn[1])]
    query = [_text(where, ex, attr.column("prompt", "instruction")), _text(where, ex, attr.column("query", "input"), False)]
    messages.append(("user", "\n".join(q for q in query if q)))
    system = _text(where, ex, attr.column("system", "system"), False)
    if attr.ranking:
        return Conversation(messages, system, _text(where, ex, attr.column("chosen", "chosen")),
                            _text(where, ex, attr.column("rejected", "rejected")))
    messages.append(("assistant", _text(where, ex, attr.column("response", "output"))))
    return Conversation(messages, system)


def _sharegpt(attr: DatasetAttr, ex: dict, where: str) -> Conversation:
    tags = {**(OPENAI_TAGS if attr.formatting == "openai" else SHAREGPT_TAGS), **attr.tags}
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
               tags["observation_tag"]: "observation", tags["function_tag"]: "function"}
    turns = ex.get(attr.column("messages", "conversations"))
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: {attr.column('messages', 'conversations')!r} must be a list of message objects")
    messages = [(_role(t, tags, role_of, where), _text(where, t, tags["content_tag"])) for t in turns]
    system = _text(where, ex, attr.column("system", "system"), False)
    if messages and messages[0][0] == "system":
        system, messages = messages[0][1], messages[1:]
    chosen = rejected = None
    if attr.ranking:
        chosen, rejected = (_reply(ex.get(attr.column(k, k)), tags, role_of, f"{where} {k}") for k in ("chosen", "rejected"))
    _check_turns(messages, attr.ranking, where)
    return Conversation(messages, system, chosen, rejected)


def _role(turn: dict, tags: dict, role_of: dict, where: str) -> str:
    role = role_of.get(turn.get(tags["role_tag"]))
    if role is None:
        raise DataError(f"{where}: role {turn.get(tags['role_tag'])!r} is not one of the tags "
                        f"{', '.join(repr(k) for k in role_of)} (set tags in dataset_info.json)")
    if role in ("observation", "function") or turn.get("tool_calls"):
        raise DataError(f"{where}: tool-call turns (function_call / observation) are not supported yet; "
                        f"remove them or the example")
    return role


def _reply(turn: Any, tags: dict, role_of: dict, where: str) -> str:
    if isinstance(turn, str):
        return turn
    if not isinstance(turn, dict) or _role(turn, tags, role_of, where) != "assistant":
        raise DataError(f"{where}: must be an assistant message object")
    return _text(where, turn, tags["content_tag"])


def _check_turns(messages: list[tuple[str, str]], ranking: bool, where: str) -> None:
    for i, (role, _) in enumerate(messages):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise DataError(f"{where}: turn {i} is {role!r}; turns must alternate user, assistant, … from the first")
    if not messages or len(messages) % 2 != (1 if ranking else 0):
        need = "end with a user turn (the replies are chosen/rejected)" if ranking else "end with an assistant turn"
        raise DataError(f"{where}: {len(messages)} turns; a {'ranking ' if ranking else ''}example must {need}")


def load_conversations(dataset: str, dataset_dir: str, stage: str) -> list[Conversation]:
    """Every example of the named datasets, concatenated in order."""
    out = []
    for attr in resolve(dataset, dataset_dir, stage):
        examples = read_examples(attr.path)
        if examples and not attr.columns and not attr.tags and attr.formatting == "alpaca":
            attr = guess(attr, examples[0][1])
        out += [convert(attr, ex, where) for where, ex in examples]
    return out
