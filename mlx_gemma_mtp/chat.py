"""``python -m mlx_gemma_mtp.chat --model T --draft-model D``: multi-turn chat, as mlx_lm.chat.

The conversation's prompt cache is kept between turns: each turn feeds only what the chat
template adds after what the cache already holds. ``--save-cache FILE`` writes the conversation
(its cache and messages) after every turn; ``--load-cache FILE`` resumes it in a later session
without feeding the history again.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx

from .config import ConfigError
from .engine.prompt_cache import (
    PromptCache,
    check_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
)
from .generation import (
    DEFAULT_NUM_DRAFT_TOKENS,
    as_target,
    encode_chat,
    make_prompt_cache,
    stream_generate,
)
from .loading import load
from .media import MediaError, conversation_suffix, user_content

HELP = (
    "[INFO] Type a message. '/image PATH' adds an image to the next message, '/audio PATH' an "
    "audio clip (16 kHz WAV), 'q' quits, 'r' starts a new conversation, 'h' shows this."
)
# command -> (kind, what the count of pending items is called)
MEDIA_COMMANDS = {"/image ": ("image", "image(s)"), "/audio ": ("audio", "audio clip(s)")}


def no_media() -> dict:
    return {"image": [], "audio": []}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Gemma 4 target (MLX/HF folder, hub id).")
    parser.add_argument("--draft-model", help="Its assistant drafter (omit for plain decoding).")
    parser.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS)
    parser.add_argument("--max-tokens", type=int, default=512, help="Per reply.")
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--system-prompt")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    parser.add_argument(
        "--save-cache",
        metavar="FILE.safetensors",
        help="Save the conversation (prompt cache and messages) here after every turn.",
    )
    parser.add_argument(
        "--load-cache",
        metavar="FILE.safetensors",
        help="Resume the conversation saved there (with the model it was saved with).",
    )
    args = parser.parse_args(argv)
    for flag, path in (("--save-cache", args.save_cache), ("--load-cache", args.load_cache)):
        if path is not None and not path.endswith(".safetensors"):
            parser.error(f"{flag}: the file name must end in .safetensors, got {path}")
    if args.load_cache and args.system_prompt:
        parser.error("--system-prompt: a conversation from --load-cache keeps its own")
    return args


def saved_conversation(metadata: dict) -> tuple[list, dict]:
    """The messages and media a saved cache's metadata holds; a ``ValueError`` naming the field
    for anything ``--save-cache`` could not have written."""
    messages = json.loads(metadata.get("messages", "[]"))
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise ValueError("messages: expected a list of messages, each with a role")
    media = json.loads(metadata.get("media", "{}"))
    if not isinstance(media, dict) or not set(media) <= set(no_media()) or not all(
        isinstance(paths, list) and all(isinstance(p, str) for p in paths)
        for paths in media.values()
    ):
        raise ValueError("media: expected {'image': [paths], 'audio': [paths]}")
    return messages, no_media() | media


def resume(path: str, model) -> tuple[list, dict, PromptCache]:
    """The messages and media (none if the file has none: a cache saved from Python) and cache
    saved at ``path``, checked against ``model``."""
    tic = time.perf_counter()
    cache, metadata = load_prompt_cache(path, return_metadata=True)
    check_prompt_cache(cache, as_target(model))
    messages, media = saved_conversation(metadata)
    print(
        f"[INFO] Resumed {len(messages)} messages ({len(cache.tokens)} tokens) from {path} in "
        f"{time.perf_counter() - tic:.3f} s",
        file=sys.stderr,
    )
    return messages, media, cache


def turn_stats(response, new_tokens: int, total_tokens: int) -> str:
    line = (
        f"[{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; "
        f"prompt: {new_tokens} new of {total_tokens}, first token after "
        f"{new_tokens / response.prompt_tps:.3f} s"
    )
    if response.mode == "mtp":
        line += (
            f"; acceptance {response.acceptance_rate:.2f}, "
            f"{response.tokens_per_target_forward:.2f} tokens per target forward"
        )
    return line + "]"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        model, drafter, tokenizer = load(args.model, args.draft_model, args.dtype)
    except ConfigError as e:
        raise SystemExit(f"Error: {e}") from None
    if tokenizer is None:
        raise SystemExit(f"Error: {args.model} has no tokenizer: chat needs one")
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    messages, cache = list(system), make_prompt_cache(model, draft_model=drafter)
    # the conversation's images and audio clips (their paths); those for the next message
    media, pending = no_media(), no_media()
    if args.load_cache:
        try:
            messages, media, cache = resume(args.load_cache, model)
        except (OSError, ValueError) as e:
            raise SystemExit(f"Error: {e}") from None
        system = [m for m in messages[:1] if m["role"] == "system"]
    print(HELP, file=sys.stderr)
    while True:
        try:
            query = input(">> ")
        except EOFError:
            break
        if query == "q":
            break
        if query in ("r", "h"):
            if query == "r":
                messages, cache = list(system), make_prompt_cache(model, draft_model=drafter)
                media, pending = no_media(), no_media()
            print(HELP, file=sys.stderr)
            continue
        command = next((c for c in MEDIA_COMMANDS if query.startswith(c)), None)
        if command is not None:
            kind, counted = MEDIA_COMMANDS[command]
            path = Path(query.removeprefix(command).strip()).expanduser()
            pending[kind].append(str(path.absolute()))  # a saved conversation resumes anywhere
            print(f"[INFO] {len(pending[kind])} {counted} for the next message", file=sys.stderr)
            continue
        content = user_content(query, len(pending["image"]), len(pending["audio"]))
        messages.append({"role": "user", "content": content})
        tokens = encode_chat(tokenizer, messages)
        reply, response = "", None
        try:
            images, audio = (media[kind] + pending[kind] for kind in ("image", "audio"))
            new, new_images, new_audio = conversation_suffix(model, cache, tokens, images, audio)
            for response in stream_generate(
                model,
                tokenizer,
                new,
                args.max_tokens,
                drafter,
                num_draft_tokens=args.num_draft_tokens,
                temp=args.temp,
                top_p=args.top_p,
                prompt_cache=cache,
                images=new_images or None,
                audio=new_audio or None,
            ):
                print(response.text, end="", flush=True)
                reply += response.text
        except MediaError as e:  # the message is dropped; the conversation goes on
            print(f"[ERROR] {e}", file=sys.stderr)
            messages.pop()
            pending = no_media()
            continue
        except KeyboardInterrupt:  # stops the reply; the cache keeps what was emitted
            pass
        media = {kind: media[kind] + pending[kind] for kind in media}
        pending = no_media()
        print()
        messages.append({"role": "assistant", "content": reply})
        if args.save_cache:
            metadata = {"messages": json.dumps(messages), "media": json.dumps(media)}
            save_prompt_cache(args.save_cache, cache, metadata)
        if response is not None:
            print(turn_stats(response, len(new), len(tokens)), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
