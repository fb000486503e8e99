"""``python -m mlx_gemma_mtp.generate`` and the text side of ``stream_generate``."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import FIXTURE

from mlx_gemma_mtp import load
from mlx_gemma_mtp.generate import main
from mlx_gemma_mtp.generation import generate, stream_generate
from mlx_gemma_mtp.text import StopStrings

TARGET, ASSISTANT = str(FIXTURE / "target"), str(FIXTURE / "assistant")
STATS_KEYS = {
    "prompt_tokens",
    "generation_tokens",
    "generation_tps",
    "prompt_tps",
    "num_draft_tokens",
    "draft_schedule",
    "acceptance_rule",
    "draft_path",
    "k_histogram",
    "parked_seconds",
    "drafted",
    "accepted",
    "acceptance_rate",
    "target_forwards",
    "peak_memory_gb",
    "finish_reason",
    "tokens",
}
PROMPT = "import json\n\n\ndef load_config(path):\n"


@pytest.fixture(scope="module")
def pair():
    """As the CLI loads it (the checkpoint's own dtype)."""
    return load(TARGET, ASSISTANT)


def invoke(*args, input=None, tmp_path=None):
    stats = tmp_path / "stats.json" if tmp_path else None
    extra = ["--stats-json", str(stats)] if stats else []
    result = CliRunner().invoke(main, [*args, *extra], input=input)
    return result, json.loads(stats.read_text()) if stats and stats.exists() else None


def chat_prompt(tokenizer, text: str) -> list:
    messages = [{"role": "user", "content": text}]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(templated, add_special_tokens=False)


def test_cli_streams_text_and_writes_stats(pair, tmp_path):
    target, drafter, tokenizer = pair
    result, stats = invoke(
        "--model",
        TARGET,
        "--draft-model",
        ASSISTANT,
        "--prompt",
        PROMPT,
        "--max-tokens",
        "40",
        tmp_path=tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert set(stats) >= STATS_KEYS
    # The chat template is applied by default, as mlx_lm.generate does.
    prompt = chat_prompt(tokenizer, PROMPT)
    expected = list(stream_generate(target, tokenizer, prompt, 40, drafter))
    assert stats["tokens"] == [r.token for r in expected]
    assert stats["prompt_tokens"] == len(prompt)
    assert stats["generation_tokens"] == 40 and stats["finish_reason"] == "length"
    # The default schedule is auto: how many rounds parked depends on this machine's costs.
    assert stats["mode"] == "mtp" and stats["num_draft_tokens"] == 6
    assert stats["draft_schedule"] == "auto" and stats["acceptance_rule"] == "match"
    assert stats["draft_path"] == "compiled, pipelined, centroid-masked"
    assert sum(stats["k_histogram"].values()) == stats["target_forwards"] - 1
    drafted = sum(int(k) * n for k, n in stats["k_histogram"].items())
    assert stats["drafted"] == drafted
    if drafted:
        assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    assert "".join(r.text for r in expected) in result.stdout
    for line in ("Prompt:", "Generation:", "tokens per target forward", "Peak memory:"):
        assert line in result.stderr


def test_cli_samples_coupled_and_a_seed_reproduces_it(pair, tmp_path):
    args = ["--model", TARGET, "--draft-model", ASSISTANT, "--prompt", PROMPT, "--max-tokens"]
    args += ["24", "--temp", "0.8", "--top-p", "0.9", "--seed", "5"]
    result, stats = invoke(*args, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert stats["acceptance_rule"] == "coupled"
    assert stats["draft_path"] == "compiled, pipelined, centroid-masked"
    assert "coupled rule" in result.stderr
    again = invoke(*args, "--num-draft-tokens", "2", "--draft-schedule", "constant",
                   tmp_path=tmp_path)[1]  # fmt: skip
    assert again["tokens"] == stats["tokens"] and again["k_histogram"] != stats["k_histogram"]


def test_cli_reads_the_prompt_from_stdin(pair, tmp_path):
    target, drafter, tokenizer = pair
    result, stats = invoke(
        "--model",
        TARGET,
        "--draft-model",
        ASSISTANT,
        "--prompt",
        "-",
        "--ignore-chat-template",
        "--max-tokens",
        "12",
        "--draft-schedule",
        "heuristic",
        "--num-draft-tokens",
        "6",
        input=PROMPT,
        tmp_path=tmp_path,
    )
    assert result.exit_code == 0, result.output
    prompt = tokenizer.encode(PROMPT)
    expected = [r.token for r in stream_generate(target, tokenizer, prompt, 12, drafter)]
    assert stats["tokens"] == expected
    assert stats["prompt_tokens"] == len(prompt)
    assert stats["draft_schedule"] == "heuristic" and stats["drafted"] > 0


def test_cli_prompt_tokens_and_no_draft(tmp_path):
    ids = json.loads((FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()[0])["input_ids"]
    common = ["--model", TARGET, "--prompt-tokens", " ".join(map(str, ids)), "--max-tokens", "16"]
    result, with_draft = invoke(*common, "--draft-model", ASSISTANT, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    result, plain = invoke(*common, "--draft-model", ASSISTANT, "--no-draft", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert plain["mode"] == "plain" and plain["drafted"] == 0 and plain["num_draft_tokens"] == 0
    assert plain["target_forwards"] == 16
    assert with_draft["prompt_tokens"] == plain["prompt_tokens"] == len(ids)
    # bf16 checkpoint: the same tokens up to near-ties (exact identity is tested in float32).
    same = sum(a == b for a, b in zip(with_draft["tokens"], plain["tokens"], strict=True))
    assert same >= 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "/no/such/model: no such folder"),
        (["--model", TARGET, "--draft-model", TARGET], "not a Gemma 4 assistant drafter"),
        (["--model", ASSISTANT], "is an assistant drafter"),
    ],
    ids=["bad-path", "target-as-drafter", "drafter-as-target"],
)
def test_cli_bad_input_is_one_clear_line(args, message):
    result, _ = invoke(*args, "--prompt", "hi")
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_needs_exactly_one_prompt():
    result, _ = invoke("--model", TARGET)
    assert result.exit_code != 0 and "exactly one of --prompt and --prompt-tokens" in result.output
    result, _ = invoke("--model", TARGET, "--prompt", "x", "--prompt-tokens", "1 two")
    assert result.exit_code != 0


@pytest.mark.slow
def test_module_runs_as_a_new_user_would(tmp_path):
    """The real entry point, prompt from stdin. By default the real entry point runs in
    test_readme.py (the README's first command), stdin in test_cli_reads_the_prompt_from_stdin.
    """
    stats = tmp_path / "stats.json"
    command = [
        sys.executable,
        "-m",
        "mlx_gemma_mtp.generate",
        "--model",
        TARGET,
        "--draft-model",
        ASSISTANT,
        "--prompt",
        "-",
        "--max-tokens",
        "8",
        "--stats-json",
        str(stats),
    ]
    result = subprocess.run(command, input="def main():", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(stats.read_text())["tokens"]) == 8
    assert "tokens per target forward" in result.stderr


# -- text, stop strings, EOS -------------------------------------------------------------------


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["\n\n", "END"])
    assert stops.feed("abc") == ("abc", False)
    assert stops.feed("de\n") == ("de", False)  # "\n" may begin "\n\n"
    assert stops.feed("x") == ("\nx", False)
    assert stops.feed("E") == ("", False)
    assert stops.feed("ND more") == ("", True)
    assert StopStrings().feed("anything") == ("anything", False)


def test_stop_string_inside_a_drafted_block(pair):
    target, drafter, tokenizer = pair
    prompt = chat_prompt(tokenizer, PROMPT)
    responses = list(stream_generate(target, tokenizer, prompt, 48, drafter))
    text = "".join(r.text for r in responses)
    # A stop string completed by a token in the middle of a drafted block.
    offsets = [0]
    for r in responses:
        offsets.append(offsets[-1] + len(r.text))
    inside = [
        i
        for i in range(1, len(responses) - 1)
        if responses[i].from_draft and responses[i + 1].from_draft and responses[i].text.strip()
    ]
    first_seen = [
        i for i in inside if text.find(text[offsets[i] - 3 : offsets[i + 1]]) == offsets[i] - 3
    ]
    assert first_seen
    i = first_seen[0]
    stop = text[offsets[i] - 3 : offsets[i + 1]]
    stopped = list(stream_generate(target, tokenizer, prompt, 48, drafter, stop=[stop]))
    assert "".join(r.text for r in stopped) == text[: offsets[i] - 3]
    assert stopped[-1].finish_reason == "stop"
    assert [r.token for r in stopped] == [r.token for r in responses[: i + 1]]


def test_eos_ends_generation_without_its_text(pair):
    target, drafter, tokenizer = pair
    prompt = chat_prompt(tokenizer, PROMPT)
    reference = list(stream_generate(target, tokenizer, prompt, 30, drafter))
    eos = reference[10].token
    first = next(i for i, r in enumerate(reference) if r.token == eos)
    responses = list(stream_generate(target, tokenizer, prompt, 30, drafter, eos_token_ids=[eos]))
    assert [r.token for r in responses] == [r.token for r in reference[: first + 1]]
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].generation_tokens == first + 1
    assert "".join(r.text for r in responses) == "".join(r.text for r in reference[:first])


def test_generate_returns_the_text_and_rejects_text_without_tokenizer(pair, capsys):
    target, drafter, tokenizer = pair
    text = generate(target, tokenizer, PROMPT, verbose=True, max_tokens=10, draft_model=drafter)
    streamed = "".join(r.text for r in stream_generate(target, tokenizer, PROMPT, 10, drafter))
    assert text == streamed
    captured = capsys.readouterr()
    assert text in captured.out and "Generation: 10 tokens" in captured.err
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(stream_generate(target, None, PROMPT, 10, drafter))


@pytest.mark.slow
def test_entry_points_are_clean():
    """``python -m`` prints no warning; importing the package does not pull in the CLI."""
    modules = ("generate", "convert", "server", "chat")
    for module in (f"mlx_gemma_mtp.{name}" for name in modules):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
    code = (
        "import sys, mlx_gemma_mtp; "
        "print(sorted({'click', 'mlx_gemma_mtp.generate'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize(
    "ids, message",
    [
        ("1 2 99999999", "token id 99999999 at position 2 is outside the vocabulary"),
        ("1 2 -5", "token id -5 at position 2 is outside the vocabulary"),
        ("1 2 32768", "token id 32768 at position 2 is outside the vocabulary"),
        ("1 two 3", "token id 'two' at position 1 is not an integer"),
    ],
    ids=["huge", "negative", "one-past", "word"],
)
def test_cli_rejects_bad_token_ids(ids, message):
    result, _ = invoke("--model", TARGET, "--draft-model", ASSISTANT, "--prompt-tokens", ids)
    assert result.exit_code == 2, result.output
    assert message in result.output and "vocabulary size is 32768" in result.output
    assert "Traceback" not in result.output


def test_the_cli_module_does_not_hide_the_generate_function(pair):
    """Importing ``mlx_gemma_mtp.generate`` (the CLI) rebinds the package attribute to it."""
    import mlx_gemma_mtp

    target, drafter, tokenizer = pair
    expected = generate(target, tokenizer, PROMPT, max_tokens=6, draft_model=drafter)
    assert mlx_gemma_mtp.generate(target, tokenizer, PROMPT, max_tokens=6, draft_model=drafter) == (
        expected
    )


# -- mlx_lm.generate's flags -------------------------------------------------------------------


def test_cli_takes_mlx_lm_flags(pair, tmp_path):
    target, drafter, tokenizer = pair
    common = ["--model", TARGET, "--draft-model", ASSISTANT, "-p", PROMPT, "-m", "10"]
    result, stats = invoke(
        *common, "--verbose", "False", "--prefill-step-size", "4", "--trust-remote-code",
        "--min-tokens-to-keep", "2", tmp_path=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = list(stream_generate(target, tokenizer, chat_prompt(tokenizer, PROMPT), 10, drafter))
    assert stats["tokens"] == [r.token for r in expected]
    assert result.stdout.strip() == "".join(r.text for r in expected).strip()
    assert "Generation:" not in result.stderr  # --verbose False: the text only


def test_cli_prefill_response_extra_eos_and_xtc(pair, tmp_path):
    """A prefilled reply is continued; --extra-eos-token ends generation at that token."""
    target, drafter, tokenizer = pair
    common = ["--model", TARGET, "--draft-model", ASSISTANT, "-p", PROMPT, "-m", "10"]
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "import"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    prefilled = tokenizer.encode(text, add_special_tokens=False)
    reference = [r.token for r in stream_generate(target, tokenizer, prefilled, 10, drafter)]
    eos = reference[4]
    result, stats = invoke(
        *common, "--prefill-response", "import", "--chat-template-config", '{"x": 1}',
        "--extra-eos-token", str(eos), tmp_path=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stats["prompt_tokens"] == len(prefilled)
    assert stats["tokens"] == reference[: reference.index(eos) + 1]
    assert stats["finish_reason"] == "stop"
    # XTC is honoured exactly by mlx-lm's sampler, with the match rule (and a warning, once).
    result, stats = invoke(
        *common, "--temp", "0.8", "--xtc-probability", "0.5", "--seed", "1", tmp_path=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert stats["acceptance_rule"] == "match"


@pytest.mark.parametrize(
    "flag, message",
    [
        (["--adapter-path", "adapters"], "adapters are not supported"),
        (["--prompt-cache-file", "c.safetensors"], "c.safetensors: no such prompt cache file"),
        (["-qa"], "activation quantization is not supported"),
        (["--kv-bits", "4"], "quantized K/V cache is not supported"),
        (["--kv-group-size", "64"], "quantized K/V cache is not supported"),
        (["--quantized-kv-start", "0"], "quantized K/V cache is not supported"),
        (["--use-default-chat-template"], "no default chat templates"),
        (["--max-kv-size", "4096"], "max_kv_size=4096 is not supported"),
        (["--chat-template-config", "{x"], "--chat-template-config: not JSON"),
        (["--chat-template-config", "[1]"], "must be a JSON object"),
        (["--ignore-chat-template", "--prefill-response", "x"], "needs the chat template"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_cli_refuses_mlx_lm_flags_that_cannot_apply(flag, message):
    result, _ = invoke("--model", TARGET, "-p", "hi", *flag)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_cli_image_on_a_model_without_vision_tower_names_the_file():
    result, _ = invoke("--model", TARGET, "-p", "hi", "--image", "cat.png")
    assert result.exit_code == 1, result.output
    assert "cat.png: this model has no vision tower" in result.output
