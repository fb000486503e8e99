"""The benchmark scripts run end to end at tiny settings (their timings are not checked)."""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import FIXTURE
from drafting import ALWAYS_DRAFT
from mlx_lm.models import gemma4_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import ablate_controller  # noqa: E402
import bench_apps  # noqa: E402
import bench_mtp  # noqa: E402
import bench_projection  # noqa: E402
import bench_quant  # noqa: E402
import bench_sampling  # noqa: E402
import bench_server  # noqa: E402
import replay_schedules  # noqa: E402

from mlx_gemma_mtp import benchmarks as bc  # noqa: E402
from mlx_gemma_mtp.config import normalize_text_config  # noqa: E402
from mlx_gemma_mtp.engine.loop import SpeculativeGenerator  # noqa: E402
from mlx_gemma_mtp.loading import validate_pair  # noqa: E402
from mlx_gemma_mtp.models import gemma4_assistant  # noqa: E402
from mlx_gemma_mtp.models.target import Target  # noqa: E402


def test_acceptance_model():
    assert bc.tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert bc.tokens_per_round(1.0, 4) == pytest.approx(5.0)
    assert bc.alpha_from_tokens_per_round(1.75, 2) == pytest.approx(0.5, abs=1e-9)
    assert bc.alpha_from_tokens_per_round(2.28, 2) == pytest.approx(0.737, abs=1e-3)
    with pytest.raises(ValueError):
        bc.alpha_from_tokens_per_round(3.5, 2)
    # 3 tokens per round; target forward 10 ms on 1 token, 20 ms on 3; draft 1 ms.
    assert bc.ideal_speedup(3.0, 0.010, 0.020, 2, 0.001) == pytest.approx(0.030 / 0.022)


def test_summarize_spread():
    stat = bc.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (stat["n"], stat["median"], stat["min"], stat["max"]) == (5, 3.0, 1.0, 5.0)
    assert (stat["p25"], stat["p75"]) == (2.0, 4.0)
    assert bc.spread(stat) == "3.0 [2.0-4.0]"
    assert bc.summarize([])["median"] is None


@pytest.mark.parametrize("name", ["gemma-4-E2B-it", "gemma-4-E4B-it", "gemma-4-12B-it"])
def test_real_configs_make_a_valid_pair(name):
    """The transcribed configs build (lazily: nothing is allocated) into a target and a drafter
    that fit together, and say where they come from."""
    folder = SCRIPTS / "real_configs"
    raw = json.loads((folder / f"{name}.json").read_text())
    raw_assistant = json.loads((folder / f"{name}-assistant.json").read_text())
    for config in (raw, raw_assistant):
        assert config["_source"]["url"].startswith("https://huggingface.co/google/")
        assert config["_source"]["retrieved"]
    target_config = bench_projection.read_config(name)
    args = gemma4_text.ModelArgs.from_dict(normalize_text_config(target_config))
    target = Target(gemma4_text.Model(args))
    drafter = gemma4_assistant.Model(
        gemma4_assistant.ModelArgs.from_dict(bench_projection.read_config(f"{name}-assistant"))
    )
    validate_pair(target, drafter)
    assert len(args.layer_types) == args.num_hidden_layers


def tiny_config_dir(tmp_path: Path) -> Path:
    """The fixture pair's configs under the names bench_projection.py reads."""
    folder = tmp_path / "configs"
    folder.mkdir()
    shutil.copy(FIXTURE / "target" / "config.json", folder / "tiny.json")
    shutil.copy(FIXTURE / "assistant" / "config.json", folder / "tiny-assistant.json")
    shutil.copy(SCRIPTS / "real_configs" / "published_acceptance.json", folder)
    return folder


def test_projection_runs(tmp_path):
    out = tmp_path / "out"
    result = bench_projection.main(
        ["--models", "tiny", "--config-dir", str(tiny_config_dir(tmp_path)),
         "--precisions", "fp32,q4", "--ks", "1,2", "--iters", "1", "--context", "40",
         "--out", str(out)]
    )  # fmt: skip
    assert [arm["precision"] for arm in result["arms"]] == ["fp32", "q4"]
    for arm in result["arms"]:
        assert sorted(arm["t_target"]) == [1, 2, 3]
        assert set(arm["t_draft"]) == {
            "centroid",
            "centroid_compiled",
            "full_vocab",
            "full_vocab_compiled",
        }
        assert not arm["target"]["ple_truncated"]
        assert {p["k"] for p in arm["projection"]} == {1, 2}
        assert all(p["ideal_speedup"] > 0 for p in arm["projection"])
    saved = json.loads((out / "projection.json").read_text())
    assert len(saved["arms"]) == 2
    assert "| tiny | q4 |" in (out / "projection.md").read_text()


def test_projection_cuts_the_per_layer_table_when_asked(tmp_path):
    config_dir = tiny_config_dir(tmp_path)
    result = bench_projection.main(
        ["--models", "tiny", "--config-dir", str(config_dir), "--precisions", "bf16",
         "--ks", "1", "--iters", "1", "--context", "8", "--ple-rows", "1024",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    target = result["arms"][0]["target"]
    assert target["ple_truncated"] and target["ple_rows"] == 1024
    assert target["params_bytes_built"] < target["params_bytes_full_size"]


def run_bench(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "bench"
    result = bench_mtp.main(
        ["--num-prompts", "2", "--max-prompt-tokens", "12", "--long-prompts", "1",
         "--long-length", "30", "--max-tokens", "8",
         "--cooldown", "0", "--micro-iters", "1", "--out", str(out), *extra]
    )  # fmt: skip
    return result, out


def test_per_prompt_speedup_takes_the_median_over_repeats():
    def run(arm, prompt, tps):
        return {"arm": arm, "prompt": prompt, "gen_tps": tps}

    mine = [run("mtp", 0, v) for v in (90, 100, 200)] + [run("mtp", 1, 50)]
    base = [run("plain", 0, v) for v in (100, 50, 100)] + [run("plain", 1, 100)]
    assert bench_mtp.per_prompt_ratios(mine, base) == [1.0, 0.5]


def test_replay_counts_rounds_as_the_pipelined_loop_does():
    """10 tokens, every round accepting 2 of its drafts: the first token is the prefill's, then
    constant k = 2 takes three rounds of 3 tokens. k = 3 takes two, then a round cut to 2 drafts
    (3 tokens left), as the engine cuts it."""
    seconds = [1.0, 1.5, 1.8, 2.0]
    two = bc.replay([[2] * 10], lambda: replay_schedules.DraftSchedule(2, "constant"), seconds)
    assert two["accepted"] == [[2, 2, 2]] and two["k_histogram"] == {2: 3}
    assert two["tokens_per_s"] == pytest.approx(9 / (3 * 1.8))
    three = bc.replay([[2] * 10], lambda: replay_schedules.DraftSchedule(3, "constant"), seconds)
    assert three["accepted"] == [[2, 2, 2]] and three["k_histogram"] == {3: 2, 2: 1}


@pytest.mark.slow
def test_replay_schedules_runs_and_matches_the_engine(tmp_path, monkeypatch, fixture_pair):
    """The per-position acceptance replays the engine's own rounds exactly (greedy decoding is
    deterministic), and the report has a row per schedule."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path / "costs"))
    cached = tmp_path / "acceptance.json"
    args = [
        *("--num-prompts", "2", "--long-prompts", "0", "--max-tokens", "10", "--k-max", "3"),
        *("--round-ms", "10,12,13,14", "--seeds", "2", "--acceptance-json", str(cached)),
        *("--out", str(tmp_path / "out")),
    ]
    result = replay_schedules.main(args)
    assert [r["schedule"] for r in result["rows"]] == [
        "constant k=1", "constant k=2", "constant k=3", "auto"
    ]  # fmt: skip
    assert result["mismatches"] == 0 and max(r["vs_best_constant"] for r in result["rows"]) >= 1
    assert "| auto |" in (tmp_path / "out" / "replay_schedules.md").read_text()
    lengths = json.loads(cached.read_text())
    assert [len(entry["accepted"]) for entry in lengths] == [10, 10]
    assert replay_schedules.main(args)["rows"] == result["rows"]  # read back, same replay

    target, drafter, _ = bench_mtp.load(
        str(FIXTURE / "target"), str(FIXTURE / "assistant"), "float32"
    )
    prompt = bc.read_prompts(FIXTURE / "held_out_prompts.jsonl", 1)[0]
    engine = replay_schedules.SpeculativeGenerator(
        target, drafter, num_draft_tokens=2, draft_schedule="constant"
    )
    blocks = list(engine.generate(mx.array(prompt), 10))
    replayed = bc.replay(
        [lengths[0]["accepted"]],
        lambda: replay_schedules.DraftSchedule(2, "constant"),
        [1.0, 1.0, 1.0],
    )
    assert lengths[0]["tokens"] == [t for b in blocks for t in b.tokens]
    assert replayed["accepted"] == [[b.num_from_draft for b in blocks[1:]]]


@pytest.mark.slow
def test_bench_mtp_runs(tmp_path):
    result, out = run_bench(
        tmp_path,
        *("--ks", "2", "--schedules", "auto,constant,heuristic", "--temps", "0,0.7"),
        *("--auto-k-max", "3", "--top-p", "0.9"),
        *("--profile", "--profile-prompts", "1", "--profile-ks", "2"),
    )
    arms = {s["arm"]: s for s in result["arms"]}
    assert set(arms) == {
        "plain", "ours-plain", "mtp auto k<=3", "mtp k=2 constant", "mtp k=2 heuristic",
        "plain temp=0.7", "mtp auto k<=3 temp=0.7", "mtp k=2 constant temp=0.7",
        "mtp k=2 heuristic temp=0.7",
    }  # fmt: skip
    for name, s in arms.items():
        assert s["runs"] == 3 and s["speedup_per_prompt"]["n"] == 3
        if s["kind"] == "mtp" and s["schedule"] != "auto":  # auto may park every round
            assert 0.0 <= s["acceptance"] <= 1.0
            assert 1.0 <= s["tokens_per_round"] <= s["k"] + 1
            assert s["ideal_speedup"] > 0
        if s["kind"] in ("mtp", "ours-plain") and s["temp"] == 0:
            assert s["identical_to_plain_greedy"] == "3/3", name
    assert sorted(result["tokens_per_round_by_k"]) == [2]
    assert sorted(result["efficiency"]["t_target"]) == [1, 2, 3, 4]  # up to auto's k_max + 1
    queued = result["efficiency"]["queued"]  # the engine's own costs, per temperature
    assert set(queued) == {"0.0", "0.7"} and all(len(c["verify"]) == 4 for c in queued.values())
    assert [p["k"] for p in result["profile"]] == [2]
    assert {"plain", "ours-plain"} <= set(result["memory_check"])
    saved = json.loads((out / "bench_mtp.json").read_text())
    assert len(saved["runs"]) == 9 * 3
    assert "| mtp k=2 heuristic temp=0.7 |" in (out / "bench_mtp.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "bench_mtp.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_mtp_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    result, _ = run_bench(
        tmp_path,
        *("--ks", "2", "--schedules", "constant", "--temps", "0", "--no-engine-plain"),
        *("--with-transformers", "--hf-k", "2"),
    )
    arms = {s["arm"]: s for s in result["arms"]}
    assert arms["hf-assisted k=2"]["identical_to_plain_greedy"] == "3/3"
    assert arms["hf-plain"]["identical_to_plain_greedy"] == "3/3"
    assert arms["hf-assisted k=2"]["tokens_per_target_forward"] > 1.0


@pytest.mark.parametrize(
    "calibrated",
    [False, True],
    ids=["given-costs", "measured"],
)
@pytest.mark.slow
def test_bench_quant_runs(tmp_path, monkeypatch, calibrated):
    """By default each pair's costs are given: calibrating the 4 sampled cells took 40 of the
    test's 55 s here, and the measurement is tested in test_costs.py."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE_DIR", str(tmp_path / "costs"))
    if not calibrated:
        monkeypatch.setattr(SpeculativeGenerator, "measure_costs", lambda *_, **__: ALWAYS_DRAFT)
    result = bench_quant.main(
        ["--num-prompts", "1", "--max-tokens", "8", "--targets", "float32,4bit"]
        + ["--drafters", "bf16", "--temps", "0,0.7", "--out", str(tmp_path)]
    )
    cells = {(c["target"], c["drafter"], c["temp"]): c for c in result["cells"]}
    assert len(cells) == 4
    greedy = [c for c in cells.values() if c["temp"] == 0]
    assert all(c["violations"] == [] and c["generated"] == 8 for c in greedy)
    assert all("identical" not in c for c in cells.values() if c["temp"] > 0)
    table = (tmp_path / "bench_quant.md").read_text()
    assert "| 4bit | bf16 | 0 |" in table and "1/1 identical" in table


@pytest.mark.slow
def test_bench_apps_runs(tmp_path):
    result = bench_apps.main(
        [
            *("--history", "64", "--reply", "8", "--repeats", "1"),
            *("--server-prompts", "1", "--max-tokens", "8", "--out", str(tmp_path)),
        ]
    )
    assert result["ttft"] and result["server"]
    saved = json.loads((tmp_path / "bench_apps.json").read_text())
    assert saved["ttft"] == result["ttft"]
    assert "Server / direct" in (tmp_path / "bench_apps.md").read_text()


@pytest.mark.slow
def test_bench_server_runs(tmp_path):
    """Three servers side by side, two client counts, one short request per client."""
    result = bench_server.main(
        [*("--clients", "1,2", "--requests", "1", "--repeats", "1", "--max-tokens", "8"),
         *("--out", str(tmp_path))]
    )  # fmt: skip
    assert set(result["table"]) == {"1", "2"}
    for arms in result["table"].values():
        assert set(arms) == {"ours", "ours-serial", "mlx-lm"}
        assert all(a["errors"] == 0 and a["tokens_per_second"] > 0 for a in arms.values())
    assert "| 2 | ours |" in (tmp_path / "bench_server_reference_t0.md").read_text()


def test_bench_sampling_runs(tmp_path):
    result = bench_sampling.main(["--rows", "1,3", "--vocab", "4096", "--iters", "3",
                                  "--warmup", "1", "--out", str(tmp_path)])  # fmt: skip
    assert len(result["cells"]) == 8 and all(c["median"] > 0 for c in result["cells"])
    table = (tmp_path / "bench_sampling.md").read_text()
    assert "| temperature 0.7, top-p 0.95 (single stream) | 3 |" in table
    assert "| temperature 0.7, top-p 0.95, first row sorted (batch) | 3 |" in table


def test_ablate_controller_replays_constants_and_alternatives(tmp_path):
    """Both tables of docs/controller.md come from this script: the constants taken out and the
    alternatives tried, in the regimes asked for; a table it does not know is refused."""
    accepted = [[(3 * i + p) % 5 for i in range(40)] for p in range(3)]
    path = tmp_path / "acc.json"
    path.write_text(json.dumps([{"accepted": a} for a in accepted]))
    common = ["--acceptance", f"temp 1.0 top-p 0.95={path}", "--seeds", "1", "--tables"]
    for extra, rows in (([], ablate_controller.VARIANTS), (["--alternatives"],
                        ablate_controller.ALTERNATIVES)):  # fmt: skip
        out = tmp_path / ("alt" if extra else "constants")
        result = ablate_controller.main([*common, "measured", *extra, "--out", str(out)])
        assert len(result["regimes"]) == len(ablate_controller.CONDITIONS)
        for regime in result["regimes"].values():
            assert set(rows) - {"default"} <= set(regime) and regime["auto / plain"] > 0
    with pytest.raises(SystemExit, match="--tables: bogus"):
        ablate_controller.main([*common, "bogus"])
