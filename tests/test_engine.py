"""The speculative loop: greedy MTP output is plain greedy decoding (mlx-lm's own), in float32."""

import gc
import itertools
import json
import random
import weakref

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import FIXTURE, plain_greedy
from drafting import ALWAYS_DRAFT
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_logits_processors

from mlx_gemma_mtp import generation, load
from mlx_gemma_mtp.contract import check_greedy_contract
from mlx_gemma_mtp.contract import plain_greedy as contract_plain_greedy
from mlx_gemma_mtp.costs import Costs
from mlx_gemma_mtp.engine.cache import SlidingWindowCache
from mlx_gemma_mtp.engine.loop import AutoSchedule, DraftSchedule, SpeculativeGenerator
from mlx_gemma_mtp.generation import make_policy, stream_generate
from mlx_gemma_mtp.models.gemma4_assistant import DraftOutput
from mlx_gemma_mtp.state import BoundedTable, pair_state

# transformers 5.23.0 assisted generation on the fixture, float32, k=4, 20 prompts x 128 tokens
# (TRAINING.md): mean acceptance over prompts, mean new tokens per target forward.
HF_ACCEPTANCE, HF_TOKENS_PER_FORWARD = 0.797, 4.04


def held_out_prompts() -> list:
    lines = (FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["input_ids"] for line in lines]


def run(target, drafter, prompt: list, max_tokens: int, **kwargs):
    """Token ids and the last response of ``stream_generate`` (no tokenizer: ids in, ids out)."""
    responses = list(stream_generate(target, None, prompt, max_tokens, drafter, **kwargs))
    return [r.token for r in responses], responses


# ``auto`` drafting k_max every round, whatever this machine's BLAS, through the default loop.
SPECULATE = ALWAYS_DRAFT
# Costs near break-even at the oracles' acceptance: ``auto`` switches between parking (k = 0) and
# drafting, so plain steps and rollbacks alternate.
BREAK_EVEN = Costs([0.010 + 0.0045 * w for w in range(12)], 1e-4, fixed=True)
MARK = 1e6  # the oracle's hidden state carries its step count in its last element, above MARK


class LazyOracle(nn.Module):
    """The real drafter's forward (through the compiled, pipelined draft step: masks over the
    cache buffers, a lazy position), with its proposal replaced by the reference continuation
    (probability ``hit`` per step, from a hash of position and step) or a wrong token: partial
    acceptances on demand, computed in lazy MLX ops only."""

    def __init__(self, drafter, reference: list, hit: float, seed: int = 0):
        super().__init__()
        self.inner = drafter
        self.reference = mx.array(reference + [0] * 16, mx.int32)
        self.hit, self.seed = hit, seed
        self.vocab_size = drafter.vocab_size
        self.args = drafter.args

    def visibility_masks(self, *args):
        return self.inner.visibility_masks(*args)

    def full_vocab_logits(self, out):
        return out.logits

    def __call__(self, inputs_embeds, shared_kv, position, full_vocab=False, masks=None):
        out = self.inner(inputs_embeds, shared_kv, position, full_vocab, masks=masks)
        carried = inputs_embeds[0, 0, -1]
        step = mx.where(carried >= MARK, carried - MARK, 0).astype(mx.int32) + 1
        index = mx.minimum(step + position, self.reference.size - 1)
        token = mx.take(self.reference, index)
        mixed = (index.astype(mx.uint32) * 2654435761 + step.astype(mx.uint32) * 40503) ^ (
            (self.seed * 2246822519) % 2**32
        )
        hit = ((mixed >> 8) % 1000).astype(mx.float32) < self.hit * 1000
        token = mx.where(hit, token, (token + 1) % self.vocab_size)
        logits = (mx.arange(self.vocab_size) == token).astype(mx.float32)[None, None]
        hidden = mx.concatenate(
            [out.hidden[..., :-1], (MARK + step).astype(out.hidden.dtype).reshape(1, 1, 1)], -1
        )
        return DraftOutput(logits, None, hidden)


# -- the fixture pair (window 128) ---------------------------------------------------------


@pytest.mark.slow
def test_fixture_pair_greedy_identical_and_acceptance_at_least_transformers(fixture_pair):
    """20 held-out prompts, k=4, 128 new tokens: identical to mlx-lm's plain greedy decoding, and
    acceptance / tokens per target forward at least transformers' (TRAINING.md)."""
    target, drafter, _ = fixture_pair
    acceptance, per_forward = [], []
    for prompt in held_out_prompts():
        tokens, responses = run(
            target, drafter, prompt, 128, num_draft_tokens=4, draft_schedule="constant"
        )
        assert tokens == plain_greedy(target, prompt, 128)
        last = responses[-1]
        acceptance.append(last.acceptance_rate)
        per_forward.append(last.tokens_per_target_forward)
    assert sum(acceptance) / len(acceptance) >= HF_ACCEPTANCE
    assert sum(per_forward) / len(per_forward) >= HF_TOKENS_PER_FORWARD


@pytest.mark.slow
def test_identical_to_transformers_assisted_generation(fixture_pair):
    torch = pytest.importorskip("torch")
    from hf_reference import load_hf

    target, drafter, _ = fixture_pair
    hf_target, hf_drafter = load_hf(FIXTURE / "target"), load_hf(FIXTURE / "assistant")
    hf_drafter.generation_config.num_assistant_tokens = 4
    hf_drafter.generation_config.num_assistant_tokens_schedule = "constant"
    for prompt in held_out_prompts()[:4]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                assistant_model=hf_drafter,
                max_new_tokens=64,
                do_sample=False,
                pad_token_id=0,
            )
        tokens, _ = run(target, drafter, prompt, 64, eos_token_ids=[1, 5])
        assert tokens == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "quantized", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["bf16", "bf16-q4"]
)
def test_bf16_and_quantized_targets_are_identical_up_to_near_ties(quantized):
    """README "Guarantees" (``mlx_gemma_mtp.contract``). On this CPU both runs are in fact
    identical here."""
    target, drafter, _ = load(str(FIXTURE / "target"), str(FIXTURE / "assistant"))
    if quantized:
        nn.quantize(target.model, group_size=32, bits=4)
    for prompt in held_out_prompts()[8:10]:
        tokens, _ = run(target, drafter, prompt, 40, costs=SPECULATE)
        check = check_greedy_contract(tokens, contract_plain_greedy(target.model, prompt, 40))
        assert check.holds, check


class Sabotaged:
    """The drafter fed wrongly, the way other ports got it wrong."""

    def __init__(self, drafter, target, how: str):
        self.drafter, self.target, self.how = drafter, target, how

    def __call__(self, inputs_embeds, shared_kv, position, full_vocab=False):
        embedding, hidden = mx.split(inputs_embeds, 2, axis=-1)
        if self.how == "concat_order":
            inputs_embeds = mx.concatenate([hidden, embedding], axis=-1)
        elif self.how == "embed_scale":
            embedding = embedding / self.target.backbone.embed_scale
            inputs_embeds = mx.concatenate([embedding, hidden], axis=-1)
        return self.drafter(inputs_embeds, shared_kv, position, full_vocab)

    def full_vocab_logits(self, out):
        return self.drafter.full_vocab_logits(out)


def pooled_acceptance(target, drafter, prompts, max_tokens=64) -> float:
    drafted = accepted = 0
    for prompt in prompts:
        _, responses = run(
            target, drafter, prompt, max_tokens, num_draft_tokens=4, draft_schedule="constant"
        )
        drafted, accepted = drafted + responses[-1].drafted, accepted + responses[-1].accepted
    return accepted / drafted


# Clean: 0.72 on these prompts; each sabotage below brings it to 0.22 or less.
GUARD_ACCEPTANCE = 0.65


SABOTAGES = ["concat_order", "embed_scale", "kv_layer", "attn_scale"]


@pytest.mark.parametrize(
    "how", [None] + [pytest.param(h, marks=pytest.mark.slow) for h in SABOTAGES]
)
def test_acceptance_guard_catches_the_known_traps(fixture_pair, monkeypatch, how):
    target, drafter, _ = fixture_pair
    if how == "kv_layer":  # the first sliding layer instead of the last K/V-computing one
        monkeypatch.setattr(
            target,
            "shared_kv_layers",
            {
                "sliding_attention": 0,
                **{"full_attention": target.shared_kv_layers["full_attention"]},
            },
        )
    elif how == "attn_scale":
        # The compiled steps were traced with the old scale.
        monkeypatch.setattr(pair_state(target.backbone, drafter), "steps", BoundedTable())
        for layer in drafter.layers:
            monkeypatch.setattr(layer.self_attn, "scale", layer.self_attn.head_dim**-0.5)
    elif how is not None:
        drafter = Sabotaged(drafter, target, how)
    acceptance = pooled_acceptance(target, drafter, held_out_prompts()[:3])
    assert (acceptance >= GUARD_ACCEPTANCE) == (how is None), acceptance


class Spy:
    def __init__(self, drafter):
        self.drafter, self.calls = drafter, []

    def __call__(self, inputs_embeds, shared_kv, position, full_vocab=False):
        out = self.drafter(inputs_embeds, shared_kv, position, full_vocab)
        self.calls.append((inputs_embeds, shared_kv, position, out))
        return out

    def full_vocab_logits(self, out):
        return self.drafter.full_vocab_logits(out)


def test_drafter_sees_the_clean_mtp_inputs(fixture_pair):
    """Each round: position p, [scaled embedding of x_p ; target hidden at p-1], the target's K/V
    of positions < p (full) and at least window + 1 of them (sliding), then its own hidden."""
    target, drafter, _ = fixture_pair
    spy, prompt = Spy(drafter), held_out_prompts()[1]
    tokens, _ = run(target, spy, prompt, 90, num_draft_tokens=3, costs=SPECULATE)
    sequence = prompt + tokens
    # One causal forward of the whole sequence: its hidden state at p - 1 and K/V below p are
    # the target's on the clean prefix of length p.
    caches = [KVCache() for _ in target.make_cache()]
    expected_hiddens = target.backbone(mx.array([sequence]), cache=caches)
    previous = None
    for inputs, shared_kv, position, out in spy.calls:
        embedding, hidden = mx.split(inputs, 2, axis=-1)
        if previous is not None and previous[2] == position:  # a later step of the same round
            assert mx.array_equal(hidden, previous[3].hidden).item()
            assert mx.array_equal(embedding, target.embed(previous[3].tokens())).item()
        else:
            expected_hidden = expected_hiddens[0, position - 1]
            assert mx.allclose(hidden[0, 0], expected_hidden, atol=1e-4).item()
            expected_embedding = target.embed(mx.array([[sequence[position]]]))
            assert mx.array_equal(embedding, expected_embedding).item()
            for layer_type, layer in target.shared_kv_layers.items():
                keys, values = shared_kv[layer_type]
                expected_keys = caches[layer].keys[..., :position, :]
                held = keys.shape[2]
                assert (
                    held == position
                    if layer_type == "full_attention"
                    else held >= min(position, 129)
                )
                assert mx.allclose(keys, expected_keys[..., position - held :, :], atol=1e-4).item()
        previous = (inputs, shared_kv, position, out)
    assert len({call[2] for call in spy.calls}) >= 5


@pytest.fixture
def stream_engines(monkeypatch):
    """The engines ``stream_generate`` makes, each with the size of every block it emitted."""
    engines = []

    class Recording(SpeculativeGenerator):
        def generate(self, prompt, max_tokens):
            engines.append(self)
            self.block_sizes = []
            for block in super().generate(prompt, max_tokens):
                self.block_sizes.append(len(block.tokens))
                yield block

    monkeypatch.setattr(generation, "SpeculativeGenerator", Recording)
    return engines


def test_stop_conditions_inside_drafted_blocks(fixture_pair, stream_engines):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[2]
    reference = plain_greedy(target, prompt, 40)
    tokens, responses = run(target, drafter, prompt, 40, num_draft_tokens=4, costs=SPECULATE)
    assert tokens == reference
    # A token first seen inside a drafted block (not the block's last) becomes the EOS.
    inside = [
        i
        for i, r in enumerate(responses[:-1])
        if r.from_draft and responses[i + 1].from_draft and reference.index(r.token) == i
    ]
    assert inside
    i = inside[0]
    tokens, responses = run(
        target,
        drafter,
        prompt,
        40,
        num_draft_tokens=4,
        costs=SPECULATE,
        eos_token_ids=[reference[i]],
    )
    assert tokens == reference[: i + 1]
    assert responses[-1].finish_reason == "stop"
    for max_tokens in range(1, 12):
        tokens, responses = run(
            target, drafter, prompt, max_tokens, num_draft_tokens=4, costs=SPECULATE
        )
        assert tokens == reference[:max_tokens]
        assert responses[-1].finish_reason == "length"
        assert responses[-1].generation_tokens == max_tokens
        # No round drafts past max_tokens: emitted so far + drafts + the target's own <= max.
        engine = stream_engines[-1]
        before_rounds = itertools.accumulate(engine.block_sizes[:-1])
        for before, k in zip(before_rounds, engine.stats.draft_lengths, strict=True):
            assert before + k + 1 <= max_tokens


# Every schedule, ``auto`` with costs that make it draft always, switch, and with this machine's.
SCHEDULE_COSTS = [
    ("constant", None),
    ("heuristic", None),
    ("auto", SPECULATE),
    ("auto", BREAK_EVEN),
    ("auto", None),
]


# A few k by default; test_every_k_and_schedule_with_rollbacks covers every k and schedule.
FIXTURE_KS = [1, 4]  # every other k, up to 8 (past the default 6), in the slow suite


@pytest.mark.parametrize(
    "k", [k if k in FIXTURE_KS else pytest.param(k, marks=pytest.mark.slow) for k in range(1, 9)]
)
def test_every_k_and_schedule_on_the_fixture(fixture_pair, k):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[3]
    reference = plain_greedy(target, prompt, 24)
    for schedule, costs in SCHEDULE_COSTS:
        tokens, _ = run(
            target, drafter, prompt, 24, num_draft_tokens=k, draft_schedule=schedule, costs=costs
        )
        assert tokens == reference, (k, schedule)


def test_full_vocab_draft_and_plain_mode(fixture_pair):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[4]
    reference = plain_greedy(target, prompt, 32)
    tokens, responses = run(
        target, drafter, prompt, 32, num_draft_tokens=4, full_vocab_draft=True, costs=SPECULATE
    )
    assert tokens == reference and responses[-1].acceptance_rate > GUARD_ACCEPTANCE
    assert responses[-1].draft_path == "compiled, pipelined, full-vocabulary"
    for drafter_, k in ((None, 4), (drafter, 0)):
        tokens, responses = run(target, drafter_, prompt, 32, num_draft_tokens=k)
        assert tokens == reference
        assert responses[-1].mode == "plain" and responses[-1].drafted == 0
        assert responses[-1].target_forwards == 32


def test_logits_processors_see_the_same_history_as_in_mlx_lm(fixture_pair):
    """Greedy with a repetition penalty: each verified position is penalised with the tokens
    before it (prompt, accepted tokens, the drafts up to it), exactly as mlx-lm's loop does."""
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[9]
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    steps = generate_step(
        mx.array(prompt), target.model, max_tokens=40, logits_processors=processors
    )
    reference = [token for token, _ in steps]
    assert reference != plain_greedy(target, prompt, 40)  # the penalty matters here
    for options in (
        # mlx-lm's penalty reads a window of 8 tokens: pipelined, centroid-masked drafting.
        dict(repetition_penalty=1.5, repetition_context_size=8),
        # The same processor passed as a custom one: the whole history, on the host.
        dict(logits_processors=processors),
    ):
        tokens, responses = run(target, drafter, prompt, 40, costs=SPECULATE, **options)
        assert tokens == reference
        assert responses[-1].accepted > 0
        pipelined = "logits_processors" not in options
        assert responses[-1].draft_path.startswith("compiled") == pipelined

    # Any sampler is honoured too: drafts are accepted where they equal its choices.
    def second_best(logprobs):
        return mx.argsort(logprobs, axis=-1)[..., -2]

    steps = generate_step(mx.array(prompt), target.model, max_tokens=20, sampler=second_best)
    reference = [token for token, _ in steps]
    tokens, responses = run(target, drafter, prompt, 20, sampler=second_best, costs=SPECULATE)
    assert tokens == reference
    assert responses[-1].acceptance_rule == "match"
    assert responses[-1].draft_path.startswith("compiled")


# -- host syncs, memory, cancellation -----------------------------------------------------------


SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__array__")


@pytest.fixture
def count_syncs(monkeypatch):
    """Counts every way the host can wait for an array's value."""
    count = {"n": 0}

    def counting(original):
        def wrapper(*args, **kwargs):
            count["n"] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in SYNC_METHODS:
        if hasattr(mx.array, name):
            monkeypatch.setattr(mx.array, name, counting(getattr(mx.array, name)))
    monkeypatch.setattr(mx, "eval", counting(mx.eval))
    return count


@pytest.mark.parametrize(
    "options",
    [{}, {"temp": 0.8, "top_p": 0.9, "repetition_penalty": 1.1}],
    ids=["greedy", "sampled"],
)
@pytest.mark.parametrize("costs", [SPECULATE, BREAK_EVEN], ids=["drafting", "switching"])
def test_one_host_sync_per_round(fixture_pair, count_syncs, options, costs):
    target, drafter, _ = fixture_pair
    policy = make_policy(**options)
    # Process caches, and the pair's compiled draft step for this kind of policy.
    list(SpeculativeGenerator(target, drafter, policy, costs=costs).generate(mx.array([2, 3]), 3))
    count_syncs["n"] = 0
    engine = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=6, costs=costs)
    blocks = list(engine.generate(mx.array(held_out_prompts()[5]), 60))
    assert sum(len(b.tokens) for b in blocks) == 60
    # Prefill evaluates the cache once (prompt shorter than one chunk), then the first token,
    # then exactly one sync per round, plain steps included.
    assert engine.pipelined
    assert count_syncs["n"] == 1 + 1 + len(engine.stats.draft_lengths)
    assert engine.stats.rounds < 40


def test_memory_no_drafter_cache_and_bounded_peak(fixture_pair):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[6]

    def peak(drafter_):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        engine = SpeculativeGenerator(target, drafter_, num_draft_tokens=4, costs=SPECULATE)
        for _ in engine.generate(mx.array(prompt), 64):
            pass
        assert len(engine.cache) == len(target.make_cache())  # target caches only
        return mx.get_peak_memory() - base

    plain, mtp = peak(None), peak(drafter)
    drafter_weights = sum(v.nbytes for _, v in tree_flatten(drafter.parameters()))
    # Weights are resident in both runs; the margin covers k+1-token activations and logits.
    margin = 16 * 2**20
    assert mtp <= plain + margin, (plain, mtp, drafter_weights)
    assert not any("cache" in name for name in vars(drafter))


def test_closing_early_leaves_nothing_behind(fixture_pair):
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[7]
    gc.collect()
    mx.synchronize()
    before = mx.get_active_memory()
    stream = stream_generate(target, None, prompt, 100, drafter)
    tokens = [next(stream).token for _ in range(5)]
    stream.close()
    gc.collect()
    mx.synchronize()
    assert mx.get_active_memory() <= before + 2**20
    # and the model is untouched: a new generation gives the same tokens
    assert run(target, drafter, prompt, 5)[0] == tokens


def test_engine_is_freed_without_the_garbage_collector(fixture_pair):
    """No reference cycle: a finished engine's caches go with its last reference."""
    target, drafter, _ = fixture_pair
    gc.collect()
    gc.disable()
    try:
        engine = SpeculativeGenerator(target, drafter, num_draft_tokens=3)
        assert engine.pipelined
        for _ in engine.generate(mx.array(held_out_prompts()[7]), 20):
            pass
        freed = weakref.ref(engine)
        del engine
        assert freed() is None
    finally:
        gc.enable()


def test_draft_schedule():
    schedule = DraftSchedule(5, "heuristic")
    ks = []
    for accepted_all in (False, False, True, False, True, True, True):
        k = schedule.verify(schedule.choose(8))
        ks.append(k)
        schedule.observe(k, k if accepted_all else 0)
    assert ks == [5, 4, 3, 5, 4, 5, 5]
    constant = DraftSchedule(3, "constant")
    constant.observe(3, 0)
    assert constant.choose(8) == 3 and constant.choose(2) == 2
    with pytest.raises(ValueError, match="draft schedule"):
        DraftSchedule(3, "sometimes")


# -- tiny random pairs (sliding window 8): long generations, rollbacks after the window wrapped --


KINDS = ["e2b", "31b", "26b"]


@pytest.fixture(scope="module")
def random_pairs(hf_pair):
    pairs = {}

    def get(kind, target_class="causal"):
        if (kind, target_class) not in pairs:
            pair = hf_pair(kind, target_class)
            target, drafter, _ = load(str(pair.target), str(pair.assistant), "float32")
            pairs[kind, target_class] = untie(target), drafter
        return pairs[kind, target_class]

    return get


def untie(target):
    """A random target with a tied head mostly predicts its input token again (a loop that would
    hide errors); a random untied head makes it chaotic."""
    model = target.language_model
    hidden, vocab = target.args.hidden_size, target.args.vocab_size
    mx.random.seed(0)
    model.lm_head = nn.Linear(hidden, vocab, bias=False)
    model.lm_head.weight = mx.random.normal((vocab, hidden)) * hidden**-0.5
    model.tie_word_embeddings = False
    return target


def plain_steps(response) -> int:
    return response.k_histogram.get(0, 0)


def long_prompt(seed: int, length: int = 40, vocab: int = 512) -> list:
    rng = random.Random(seed)
    return [2] + [rng.randrange(3, vocab) for _ in range(length - 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_long_generations_past_the_window(random_pairs, kind):
    """Prompt 5x and generation 8x the sliding window; the real drafter (mostly rejected) and
    an oracle that makes partial acceptances common: rollbacks long after the window wrapped."""
    target, drafter = random_pairs(kind)
    prompt = long_prompt(1)
    reference = plain_greedy(target, prompt, 64)
    assert len(set(reference)) > 20  # a chaotic model, not a loop that hides errors
    tokens, _ = run(target, drafter, prompt, 64, num_draft_tokens=4, costs=SPECULATE)
    assert tokens == reference
    for hit, k, costs in ((0.6, 3, SPECULATE), (0.8, 6, SPECULATE), (0.7, 4, BREAK_EVEN)):
        oracle = LazyOracle(drafter, prompt + reference, hit, seed=k)
        tokens, responses = run(target, oracle, prompt, 64, num_draft_tokens=k, costs=costs)
        assert tokens == reference
        assert 0 < responses[-1].accepted < responses[-1].drafted
        assert responses[-1].draft_path.startswith("compiled, pipelined")


def test_conditional_target_class(random_pairs):
    target, drafter = random_pairs("e2b", "conditional")
    prompt = long_prompt(2, 20)
    reference = plain_greedy(target, prompt, 24)
    oracle = LazyOracle(drafter, prompt + reference, 0.7)
    assert run(target, oracle, prompt, 24, costs=SPECULATE)[0] == reference


def test_the_rollback_trap_is_caught(random_pairs, monkeypatch):
    """A sliding cache that silently stops rolling back once wrapped (mlx-lm's RotatingKVCache
    behaviour) changes the output: the long-generation test would fail."""
    target, drafter = random_pairs("e2b")
    prompt = long_prompt(3)
    reference = plain_greedy(target, prompt, 48)
    original = SlidingWindowCache.trim

    def broken_trim(self, n):
        return 0 if self.offset > self.window else original(self, n)

    monkeypatch.setattr(SlidingWindowCache, "trim", broken_trim)
    oracle = LazyOracle(drafter, prompt + reference, 0.7)
    assert run(target, oracle, prompt, 48, num_draft_tokens=4, costs=SPECULATE)[0] != reference


@pytest.mark.parametrize("k", range(1, 9))
def test_every_k_and_schedule_with_rollbacks(random_pairs, k):
    """Past the window (sliding window 8, 64 tokens), with partial acceptances: every schedule,
    through the default loop (compiled, pipelined drafting)."""
    target, drafter = random_pairs("e2b")
    prompt = long_prompt(k, 24)
    reference = plain_greedy(target, prompt, 40)
    for schedule, costs in SCHEDULE_COSTS:
        oracle = LazyOracle(drafter, prompt + reference, 0.75, seed=k)
        tokens, responses = run(
            target, oracle, prompt, 40, num_draft_tokens=k, draft_schedule=schedule, costs=costs
        )
        assert tokens == reference, schedule
        assert responses[-1].draft_path.startswith("compiled, pipelined")


def test_stop_conditions_with_full_acceptance(random_pairs):
    """Every draft accepted: EOS at each position of a block, and max_tokens, never overshoot."""
    target, drafter = random_pairs("e2b")
    prompt = long_prompt(4, 12)
    reference = plain_greedy(target, prompt, 30)
    firsts = [i for i, token in enumerate(reference) if reference.index(token) == i]
    for i in firsts[:10]:
        for costs in (SPECULATE, BREAK_EVEN):
            oracle = LazyOracle(drafter, prompt + reference, 1.0)
            tokens, responses = run(
                target, oracle, prompt, 30, eos_token_ids=[reference[i]], costs=costs
            )
            assert tokens == reference[: i + 1]
            assert responses[-1].finish_reason == "stop"
    for max_tokens in (1, 2, 5, 6, 7, 11):
        oracle = LazyOracle(drafter, prompt + reference, 1.0)
        tokens, responses = run(
            target, oracle, prompt, max_tokens, num_draft_tokens=5, costs=SPECULATE
        )
        assert tokens == reference[:max_tokens]
        last = responses[-1]
        assert last.accepted == last.drafted == max_tokens - 1 - last.rounds - plain_steps(last)


def test_pipelined_drafting_matches_the_synchronous_loop(fixture_pair):
    """The pipelined loop drafts with a compiled step, through masks over whole cache buffers,
    lazily in the previous round's accepted count. Past the sliding window and across a buffer
    growth (a retrace), every round must draft and accept what the synchronous loop does with
    the ordered K/V."""
    target, drafter, _ = fixture_pair
    prompts = held_out_prompts()
    # 100 tokens: past the window after 29 new ones, the buffers grow at 256 (after 156).
    # 300 tokens: past the window from the start, the buffers grow after the prefill.
    short_prompt = (prompts[0] + prompts[1])[:100]
    long_prompt = sum(prompts[10:14], [])[:300]
    # One schedule whose choices do not depend on when a round is read, for both loops: ``auto``
    # chooses the next k before the last round is read only when pipelined.
    for prompt, schedule, max_tokens in ((short_prompt, "heuristic", 170),
                                         (long_prompt, "constant", 48)):  # fmt: skip
        runs = []
        for pipelined in (False, True):
            engine = SpeculativeGenerator(
                target, drafter, num_draft_tokens=3, draft_schedule=schedule, costs=SPECULATE
            )
            engine.pipelined = pipelined
            generated = engine.generate(mx.array(prompt), max_tokens)
            blocks = [(b.tokens, b.num_from_draft) for b in generated]
            runs.append((blocks, engine.stats.draft_lengths))
        assert runs[0] == runs[1]
        assert sum(n for _, n in runs[1][0]) > max_tokens // 2
    # The step itself: the buffered view with masks sees exactly the ordered, windowed K/V.
    position = engine.cache[0].offset
    shared_kv, first_positions = target.shared_kv_buffers(engine.cache)
    masks = drafter.visibility_masks(shared_kv, first_positions, mx.array(position))
    assert masks["full_attention"].sum().item() == position
    assert masks["sliding_attention"].sum().item() == drafter.sliding_window + 1
    token, hidden = mx.array([7], mx.int32), mx.random.normal((1, 1, target.hidden_size))
    ordered = target.shared_kv(engine.cache)
    none = mx.array(0)  # no logits processors' history, no noise or values (greedy)
    eager = engine._draft_step(token, hidden, ordered, None, position, none, none, none)
    compiled = engine._compiled_step(
        token, hidden, shared_kv, masks, mx.array(position), none, none, none
    )
    assert mx.allclose(compiled["hidden"], eager["hidden"], atol=1e-5).item()
    assert compiled["token"].item() == eager["token"].item()


# Default-suite proofs: test_reproducible (measured in each fresh process) and
# test_sampling::test_seeded_mtp_output_is_seeded_plain_output (``auto``, measured, is plain's).
@pytest.mark.slow
def test_a_seed_reproduces_sampled_output_under_auto(fixture_pair, tmp_path, monkeypatch):
    """Sampled tokens depend on every round's k: auto must not let run-to-run timing change it,
    and measuring the costs (first run, empty cache) must not draw from the seeded state."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path))
    target, drafter, _ = fixture_pair
    prompt = held_out_prompts()[11]
    outputs, cached = [], []
    for _ in range(2):
        cached.append(len(list(tmp_path.glob("costs/*.json"))))
        mx.random.seed(7)
        outputs.append(run(target, drafter, prompt, 48, temp=0.8, top_p=0.95)[0])
    assert cached == [0, 1]  # measured in the first run, read from the cache in the second
    assert outputs[0] == outputs[1]


def test_greedy_generations_of_a_pair_go_on_from_what_the_last_one_followed(fixture_pair):
    """A calibration can come from another spell of the machine, and a reply's first rounds
    accept less than the pair does: each greedy generation goes on from the round times and
    acceptance the pair's last one followed; sampling follows its own (another kind of round),
    and other costs start afresh."""
    target, drafter, _ = fixture_pair
    costs = Costs([0.010 + 0.002 * w for w in range(7)], 1e-4)  # followed online
    prompt = held_out_prompts()[3][:40]
    reference = plain_greedy(target, prompt, 24)

    def schedule(policy=None, given=costs):
        engine = SpeculativeGenerator(target, drafter, policy, num_draft_tokens=4, costs=given)
        out = [t for block in engine.generate(mx.array(prompt), 24) for t in block.tokens]
        assert policy is not None or out == reference
        return engine.schedule

    first, second = schedule(), schedule()
    assert second.times is first.times and sum(first.times.counts.values()) > 8
    assert second.acceptance is first.acceptance
    sampled = schedule(make_policy(temp=0.8))
    assert sampled.times is not first.times and sampled.acceptance is not first.acceptance
    other = Costs([0.010 + 0.002 * w for w in range(7)], 2e-4)
    assert schedule(given=other).times is not first.times


def test_sampling_follows_round_times_as_greedy_does(fixture_pair):
    """A seed fixes sampled output whatever the draft lengths, so sampling follows the measured
    round times and carries them between generations of its kind, as greedy does."""
    target, drafter, _ = fixture_pair
    costs = Costs([0.010 + 0.002 * w for w in range(7)], 1e-4)
    prompt = mx.array(held_out_prompts()[0][:20])
    schedules = []
    for _ in range(2):
        engine = SpeculativeGenerator(target, drafter, make_policy(temp=0.8), costs=costs)
        list(engine.generate(prompt, 16))
        assert engine.stats.acceptance_rule == "coupled" and engine.schedule.timed
        schedules.append(engine.schedule)
    assert schedules[1].times is schedules[0].times and schedules[0].times.counts


def test_auto_is_told_only_times_that_hold_a_round_of_their_own(fixture_pair, monkeypatch):
    """The pipelined loop queues the next round's drafts before it reads a round (after a plain
    step, the whole next round), and the backend decides which interval between reads runs
    them: a time is told only where the next round drafts as many, and neither for a plain step
    followed by a round nor for that round, nor for a plain step right after a round."""
    target, drafter, _ = fixture_pair
    costs = Costs([0.010 + 0.002 * w for w in range(7)], 1e-4)
    pattern = itertools.cycle([0, 0, 0, 5, 5, 5, 2, 2, 2])
    told = []
    monkeypatch.setattr(AutoSchedule, "choose", lambda self, limit: min(next(pattern), limit))
    monkeypatch.setattr(AutoSchedule, "observe", lambda self, k, n, s: told.append((k, s)))
    engine = SpeculativeGenerator(target, drafter, num_draft_tokens=6, costs=costs)
    list(engine.generate(mx.array(held_out_prompts()[0][:20]), 80))
    ks = [k for k, _ in told]
    timed = []
    for i, (k, seconds) in enumerate(told[1:-1], start=1):
        before, after = ks[i - 1], ks[i + 1]
        alone = after == k and (before == 0) == (k == 0)
        assert (seconds is not None) == alone, (i, ks[i - 1 : i + 2], seconds)
        if alone:
            timed.append(k)
    assert {0, 2, 5} <= set(timed)
