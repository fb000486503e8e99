"""The chat's ``main`` driven through stdin, in-process: replies equal plain decoding. (The real
``python -m mlx_gemma_mtp.chat`` process runs in test_readme.py, on the README's command.)"""

import io
import json
import re
import subprocess
import sys
import time

import pytest
from conftest import FIXTURE, plain_greedy

from mlx_gemma_mtp import chat, load, stream_generate
from mlx_gemma_mtp.engine.prompt_cache import load_prompt_cache, save_prompt_cache
from mlx_gemma_mtp.generation import encode_chat

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")
ARGS = ["--model", TARGET, "--draft-model", ASSISTANT, "--max-tokens", "10", "--dtype", "float32"]


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


def chat_run(monkeypatch, capsys, args: list, lines: list) -> tuple[list, str]:
    """The replies (one per line sent) and stderr of ``chat.main``."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*lines, "q"]) + "\n"))
    chat.main(args)
    result = capsys.readouterr()
    return result.out.split(">> ")[1:-1], result.err


def saved_after_turn_one(
    monkeypatch, capsys, path: str, turns: list, args: list = ARGS
) -> tuple[list, list, list]:
    """The replies of the uninterrupted conversation, of turn 1 alone (saved to ``path``), and
    the uninterrupted turns' new prompt tokens."""
    uninterrupted, err = chat_run(monkeypatch, capsys, args, turns)
    first, _ = chat_run(monkeypatch, capsys, [*args, "--save-cache", path], turns[:1])
    return uninterrupted, first, [int(n) for n in re.findall(r"prompt: (\d+) new", err)]


def test_chat_saves_and_resumes_a_conversation(monkeypatch, capsys, tmp_path):
    path, turns = str(tmp_path / "conversation.safetensors"), ["def f():", "class A:"]
    uninterrupted, first, fed = saved_after_turn_one(monkeypatch, capsys, path, turns)
    resumed, err = chat_run(monkeypatch, capsys, [*ARGS, "--load-cache", path], turns[1:])
    assert first + resumed == uninterrupted
    assert "[INFO] Resumed 2 messages" in err
    new, total = map(int, re.search(r"prompt: (\d+) new of (\d+)", err).groups())
    assert new == fed[1] < total / 2  # the history came from the file
    # Another dtype is another model; file names MLX would change are refused.
    with pytest.raises(SystemExit, match="the weights differ"):
        chat.main(["--model", TARGET, "--load-cache", path])
    with pytest.raises(SystemExit):
        chat.main([*ARGS, "--save-cache", str(tmp_path / "conversation")])
    assert "must end in .safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_a_conversation_resumed_in_a_new_process(monkeypatch, capsys, tmp_path):
    """Saved after turn 1, loaded by a new process: turn 2 is token-identical to the
    uninterrupted conversation's, and its first token comes at least 5x sooner (loading the file
    included) than after prefilling the history, as a restart without the file would."""
    path = str(tmp_path / "conversation.safetensors")
    target, drafter, tokenizer = load(TARGET, ASSISTANT, dtype="float32")
    lines = (FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()
    ids = [t for line in lines for t in json.loads(line)["input_ids"]]
    turns = [" ".join(tokenizer.decode(ids).split()), "def main():"]
    uninterrupted, first, _ = saved_after_turn_one(monkeypatch, capsys, path, turns)
    command = [sys.executable, "-m", "mlx_gemma_mtp.chat", *ARGS, "--load-cache", path]
    resumed_times = []
    for _ in range(2):  # the better of two resumptions: this machine is shared
        resumed = subprocess.run(command, input=turns[1] + "\nq\n", capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert first + resumed.stdout.split(">> ")[1:-1] == uninterrupted
        loading = float(re.search(r"Resumed .* in ([\d.]+) s", resumed.stderr).group(1))
        first_token = float(re.search(r"first token after ([\d.]+) s", resumed.stderr).group(1))
        resumed_times.append((loading + first_token, loading, first_token))
    resumed_time, loading, first_token = min(resumed_times)
    messages = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first[0]}]
    history = encode_chat(tokenizer, [*messages, {"role": "user", "content": turns[1]}])
    assert len(history) > 1000
    tic = time.perf_counter()
    stream = stream_generate(target, tokenizer, history, 1, drafter)
    next(stream)
    prefilled = time.perf_counter() - tic
    stream.close()
    ratio = prefilled / resumed_time
    print(f"time to first token: {prefilled:.3f} s prefilling {len(history)} tokens, "
          f"{loading:.3f} + {first_token:.3f} s resumed: {ratio:.1f}x")  # fmt: skip
    assert ratio >= 5


def test_generate_continues_a_conversation_the_chat_saved(monkeypatch, capsys, tmp_path):
    """``python -m mlx_gemma_mtp.generate --prompt-cache-file``: the prompt follows the saved
    messages and only what the cache does not hold is fed; the reply is the chat's."""
    from click.testing import CliRunner

    from mlx_gemma_mtp.generate import main as generate_main

    path, turns = str(tmp_path / "conversation.safetensors"), ["def f():", "class A:"]
    as_stored = ARGS[:6]  # the checkpoint's own dtype, as the generate command loads it
    uninterrupted, _, fed = saved_after_turn_one(monkeypatch, capsys, path, turns, as_stored)
    stats = tmp_path / "stats.json"
    args = [*ARGS[:4], "-m", "10", "-p", turns[1], "--prompt-cache-file", path]
    result = CliRunner().invoke(generate_main, [*args, "--stats-json", str(stats)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == uninterrupted[1].strip()
    # Fed: what the uninterrupted chat fed in turn 2, not the whole conversation.
    assert json.loads(stats.read_text())["prompt_tokens"] == fed[1]


def test_a_saved_conversation_of_the_wrong_shape_is_refused_naming_the_field(
    monkeypatch, capsys, tmp_path
):
    path = str(tmp_path / "conversation.safetensors")
    saved_after_turn_one(monkeypatch, capsys, path, ["def f():"])
    cache, metadata = load_prompt_cache(path, return_metadata=True)
    for field, value in [("messages", '{"role": "user"}'), ("messages", "[1]"), ("media", "[]"),
                         ("media", '{"image": "a.png"}'), ("media", '{"video": []}')]:  # fmt: skip
        save_prompt_cache(path, cache, {**metadata, field: value})
        with pytest.raises(SystemExit, match=f"Error: {field}: expected"):
            chat.main([*ARGS, "--load-cache", path])
