"""The chat's ``main`` driven through stdin, in-process: replies equal plain decoding. (The real
``python -m mlx_gemma_mtp.chat`` process runs in test_readme.py, on the README's command.)"""

import io
import re
import sys

from conftest import FIXTURE, plain_greedy

from mlx_gemma_mtp import chat, load
from mlx_gemma_mtp.generation import encode_chat

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")


def plain_reply(target, tokenizer, messages: list, max_tokens: int) -> str:
    return tokenizer.decode(plain_greedy(target, encode_chat(tokenizer, messages), max_tokens))


def test_chat_keeps_the_conversation_and_matches_plain_decoding(monkeypatch, capsys):
    turns = ["def f():", "class A:", "import os"]
    args = [
        "--model", TARGET, "--draft-model", ASSISTANT, "--max-tokens", "12", "--dtype", "float32",
    ]  # fmt: skip
    stdin = "\n".join([turns[0], "h", *turns[1:], "q"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    chat.main(args)
    result = capsys.readouterr()

    target, _, tokenizer = load(TARGET, dtype="float32")
    messages, expected = [], ""
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        reply = plain_reply(target, tokenizer, messages, 12)
        messages.append({"role": "assistant", "content": reply})
        expected += ">> " + reply + "\n" + (">> " if i == 0 else "")  # "h" prints help only
    assert result.out == expected + ">> "
    stats = [line for line in result.err.splitlines() if "tokens/s" in line]
    assert len(stats) == 3 and all("acceptance" in line for line in stats)
    # Turns after the first feed only what the template adds after the cached conversation.
    counts = [tuple(map(int, re.search(r"prompt: (\d+) new of (\d+)", s).groups())) for s in stats]
    assert counts[0][0] == counts[0][1]
    assert all(new < total / 2 for new, total in counts[1:])
