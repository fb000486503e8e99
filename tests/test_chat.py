"""``python -m mlx_gemma_mtp.chat`` driven through stdin: replies equal plain decoding."""

import re
import subprocess
import sys

from conftest import FIXTURE, plain_greedy

from mlx_gemma_mtp import load
from mlx_gemma_mtp.generation import encode_chat

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")


def plain_reply(target, tokenizer, messages: list, max_tokens: int) -> str:
    return tokenizer.decode(plain_greedy(target, encode_chat(tokenizer, messages), max_tokens))


def test_chat_keeps_the_conversation_and_matches_plain_decoding():
    turns = ["def f():", "class A:", "import os"]
    command = [
        sys.executable, "-m", "mlx_gemma_mtp.chat", "--model", TARGET, "--draft-model",
        ASSISTANT, "--max-tokens", "12", "--dtype", "float32",
    ]  # fmt: skip
    stdin = "\n".join([turns[0], "h", *turns[1:], "q"]) + "\n"
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    target, _, tokenizer = load(TARGET, dtype="float32")
    messages, expected = [], ""
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        reply = plain_reply(target, tokenizer, messages, 12)
        messages.append({"role": "assistant", "content": reply})
        expected += ">> " + reply + "\n" + (">> " if i == 0 else "")  # "h" prints help only
    assert result.stdout == expected + ">> "
    stats = [line for line in result.stderr.splitlines() if "tokens/s" in line]
    assert len(stats) == 3 and all("acceptance" in line for line in stats)
    # Turns after the first feed only what the template adds after the cached conversation.
    counts = [tuple(map(int, re.search(r"prompt: (\d+) new of (\d+)", s).groups())) for s in stats]
    assert counts[0][0] == counts[0][1]
    assert all(new < total / 2 for new, total in counts[1:])
