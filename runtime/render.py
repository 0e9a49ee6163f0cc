"""Conversations → token records, in the plain format or through the checkpoint tokenizer's own chat template.

SFT record: {"turns": [[prompt ids, response ids], …]}; every assistant turn is supervised (LLaMA-Factory's default,
mask_history off), and runtime.data appends eos after each response. DPO record: {"prompt", "chosen", "rejected"}.

Plain format (presets' byte tokenizer, checkpoints without a chat template, or `template: plain`): the system text
and a newline open the first prompt; each user message is its text and a newline; each response is the text.
Chat template: the conversation is rendered with `apply_chat_template`; the prompt of turn k is what the template
adds from the end of reply k−1 up to and including the generation prompt, the response what it adds for reply k.
The end-of-turn marker the template writes after a reply is replaced by the tokenizer's eos when they are the same
token, and its trailing text (e.g. a newline) opens the next prompt. Each piece is tokenized on its own, as
LLaMA-Factory does.
"""
from __future__ import annotations

from .data import DataError
from .formats import Conversation


class PlainFormat:
    name = "plain"

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def sft(self, conv: Conversation) -> dict:
        turns = []
        for k in range(0, len(conv.messages), 2):
            lead = conv.system + "\n" if k == 0 and conv.system else ""
            turns.append([self.tok.encode(lead + conv.messages[k][1] + "\n"), self.tok.encode(conv.messages[k + 1][1])])
        return {"turns": turns}

    def pair(self, conv: Conversation) -> dict:
        history = self.sft(Conversation(conv.messages[:-1], conv.system))["turns"] if len(conv.messages) > 1 else []
        lead = conv.system + "\n" if conv.system and not history else ""
        prompt = [t for p, r in history for t in p + r + [self.tok.eos_id]]
        prompt += self.tok.encode(lead + conv.messages[-1][1] + "\n")
        return {"prompt": prompt, "chosen": self.tok.encode(conv.chosen), "rejected": self.tok.encode(conv.rejected)}


class ChatTemplateFormat:
    name = "chat template"

    def __init__(self, tokenizer):
        self.tok, self.hf = tokenizer, tokenizer.tok
        self.eos_text = self.hf.eos_token

    def _render(self, conv: Conversation, messages: list[tuple[str, str]], generation: bool) -> str:
        msgs = ([{"role": "system", "content": conv.system}] if conv.system else [])
        msgs += [{"role": r, "content": c} for r, c in messages]
        try:
            return self.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # jinja raises what the template raises (e.g. "system role not supported")
            raise DataError(f"the checkpoint's chat template failed on an example: {str(e).splitlines()[0]}; "
                            f"set template: plain or fix the data") from None

    def _pieces(self, conv: Conversation, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """(prompt text, response text) per assistant turn of `messages`."""
        out, done, carry = [], "", ""
        for k in range(1, len(messages), 2):
            ask = self._render(conv, messages[:k], True)
            full = self._render(conv, messages[: k + 1], False)
            if not (ask.startswith(done) and full.startswith(ask)):
                raise DataError("the checkpoint's chat template does not render a conversation as a prefix of its "
                                "continuation (it rewrites earlier turns), so turns cannot be supervised one by one; "
                                "set template: plain")
            reply = full[len(ask):]
            cut = reply.rfind(self.eos_text) if self.eos_text else -1
            out.append((carry + ask[len(done):], reply if cut < 0 else reply[:cut]))
            carry = "" if cut < 0 else reply[cut + len(self.eos_text):]
            done = full
        return out

    def sft(self, conv: Conversation) -> dict:
        enc = self.tok.encode
        return {"turns": [[enc(p), enc(r)] for p, r in self._pieces(conv, conv.messages)]}

    def pair(self, conv: Conversation) -> dict:
        """The prompt is rendered whole (it is not supervised); each reply as its SFT response would be."""
        reply = {k: self._pieces(conv, conv.messages + [("assistant", text)])[-1][1]
                 for k, text in (("chosen", conv.chosen), ("rejected", conv.rejected))}
        return {"prompt": self.tok.encode(self._render(conv, conv.messages, True)),
                **{k: self.tok.encode(v) for k, v in reply.items()}}


def choose_format(template: str, tokenizer) -> PlainFormat | ChatTemplateFormat:
    """The chat template of a checkpoint tokenizer that has one (template auto or an LLaMA-Factory name), else plain."""
    hf = getattr(tokenizer, "tok", None)
    if template != "plain" and hf is not None and getattr(hf, "chat_template", None):
        return ChatTemplateFormat(tokenizer)
    return PlainFormat(tokenizer)


def format_note(template: str, tokenizer) -> str:
    """One line saying how text is rendered for this config, for the launcher to print."""
    fmt = choose_format(template, tokenizer)
    if fmt.name == "chat template":
        named = f" (not LLaMA-Factory's {template!r} template code)" if template not in ("auto", "plain") else ""
        return f"text renders through the checkpoint tokenizer's own chat template{named}"
    if template == "plain":
        why = "template: plain"
    elif getattr(tokenizer, "tok", None) is None:
        why = "the model has no tokenizer files (presets use bytes), so there is no chat template"
    else:
        why = "the checkpoint's tokenizer has no chat template"
    return f"text renders in the plain format: {why}"
