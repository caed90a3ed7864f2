"""Trace-replay benchmark, scaled down to run on CPU in seconds (the GPU run is the real measurement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import random_traces

from benchmarks.bench_replay import bench, format_table, main
from benchmarks.replay_data import load_replay_data, save_npz, scale, synthetic_data

pytestmark = pytest.mark.usefixtures("one_thread")


def small_traces(tmp_path):
    return random_traces(tmp_path / "traces", num_layers=3, num_experts=8, top_k=2, vocab_size=50,
                         lengths=(12, 13), architecture="olmoe", token_space="vocab:sha256:0123",
                         expert_shape={"hidden": 16, "intermediate": 8, "num_matrices": 3, "dtype_bytes": 4}).path


def test_replay_counters_add_up_and_resident_never_misses():
    data = synthetic_data()
    rows = bench(
        data,
        device="cpu",
        capacities=(0.25,),
        methods=("lru", "cooc", "oracle", "resident"),
        max_tokens=12,
        warmup=4,
        dense_mb=0.01,
        dtype=torch.float32,
        log=lambda *_: None,
    )
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["decode_tokens"] == 12
        assert r["hits"] + r["misses"] == r["accesses"] > 0
        assert r["prefetches_issued"] == r["prefetches_used"] + r["prefetches_wasted"]
        assert r["tokens_per_s"] > 0
    assert by["resident"]["misses"] == 0 and by["resident"]["bytes_moved"] == 0
    assert by["lru"]["prefetches_issued"] == 0 and by["cooc"]["prefetches_issued"] > 0
    # perfect prediction with room for a token's experts: every access is served by a prefetch
    assert by["oracle"]["hit_rate"] > by["lru"]["hit_rate"]
    assert "tokens/s" in format_table(rows)


def test_trace_dir_npz_round_trip_and_scaling(tmp_path):
    data = load_replay_data(small_traces(tmp_path))
    assert (data.num_layers, data.num_experts, data.top_k, data.hidden) == (3, 8, 2, 16)
    assert len(data.tokens) == 2  # the val split of 10 prompts
    assert data.cooc_train.shape == (2, 8, 8) and data.cooc_train.sum() == 8 * 12 * 2 * 2 * 2
    back = load_replay_data(save_npz(data, tmp_path / "slice.npz"))
    assert all(np.array_equal(a, b) for a, b in zip(back.experts, data.experts))
    small = scale(back, layers=2, experts=4)
    assert small.cooc_train.shape == (1, 4, 4) and max(e.max() for e in small.experts) < 4
    assert small.cooc_train.sum() == data.cooc_train[0].sum()
    assert small.token_space == back.token_space == data.token_space == "vocab:sha256:0123"  # ids not scaled


def test_cli_runs_scaled_down_replay(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--max-tokens",
                "4",
                "--warmup",
                "2",
                "--dense-mb",
                "0.01",
                "--capacities",
                "0.5",
                "--methods",
                "lru",
                "predictor",
                "resident",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "no predictor file given" in text and "resident" in text
    assert out.exists()


@pytest.mark.parametrize("mode", ["token_ahead", "layer_ahead"])
def test_predictor_rows_with_an_exported_predictor(tmp_path, mode):
    """The predictor method loads an exported file and prefetches from it (token_ahead or layer_ahead,
    with a routing memory shorter than the replay, so its ring buffer wraps)."""
    from synthetic import tiny_predictor

    from predictor.export import export_predictor

    data = synthetic_data()
    path = export_predictor(
        tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts,
                       top_k=data.top_k, mode=mode, memory_heads=1, memory_head_dim=4, memory_size=4),
        tmp_path / f"{mode}.safetensors",
    )
    rows = bench(data, device="cpu", capacities=(0.25,), methods=("lru", "predictor"), predictor_path=[path],
                 max_tokens=8, warmup=2, dense_mb=0.01, dtype=torch.float32, threshold=[0.0, 0.5],
                 log=lambda *_: None)
    preds = [r for r in rows if r["method"].startswith("predictor")]
    assert len(preds) == 2  # one row per threshold
    for r in preds:
        assert r["hits"] + r["misses"] == r["accesses"] > 0
        assert r["predictor_steps"] > 0 and r["predictor_ms_per_step"] > 0
    top_k_only, confident = sorted(preds, key=lambda r: r["threshold"])
    assert (top_k_only["threshold"], confident["threshold"]) == (0.0, 0.5)
    assert "@p0.5" in format_table(rows)
    # threshold 0 prefetches the top-k of every predicted layer; p >= 0.5 keeps a subset of those
    assert top_k_only["prefetches_issued"] > 0
    assert top_k_only["prefetches_issued"] >= confident["prefetches_issued"]


def test_grouped_layer_equals_one_expert_at_a_time(monkeypatch):
    """The replay's grouped call over the slot pool (in windows of the used slots) computes what one
    fetch and one matmul per expert computes, with the same cache decisions."""
    import benchmarks.replay_model as rm
    import integrate.grouping as grouping
    from integrate.runtime.cache import ExpertCache

    monkeypatch.setattr(rm, "WINDOWS_FROM", 4)  # windows over the 16 slots
    monkeypatch.setattr(grouping.pool_windows, "__defaults__", (5, 2))  # at most 5 slots, split at gaps > 2
    data = synthetic_data()
    outs = {}
    for grouped in (True, False):
        model = rm.ReplayModel(data, torch.device("cpu"), torch.float32, 0.01, grouped=grouped)
        cache = ExpertCache(model.store, 16, "cpu")
        outs[grouped] = [model.token(cache, None, 0, data.experts[0][t], t) for t in range(6)]
        outs[grouped, "hits"] = cache.counters.hits
    assert outs[True, "hits"] == outs[False, "hits"]
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scheduled_rows_hybrid_bytes_and_simulator_columns(tmp_path):
    """Predictor, hybrid and oracle rows run under the schedule's settings; every row's bytes moved are its
    copies times the expert size; on a CPU device hybrid runs every miss from the store (no copy); --sim
    puts the simulator's figures next to every row it models."""
    from synthetic import tiny_predictor

    from benchmarks.bench_replay import format_sim
    from predictor.export import export_predictor

    data = synthetic_data()
    path = export_predictor(
        tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts,
                       top_k=data.top_k, mode="layer_ahead"),
        tmp_path / "layer.safetensors",
    )
    kw = dict(device="cpu", capacities=(0.25,), predictor_path=[path], max_tokens=6, warmup=2,
              dense_mb=0.01, dtype=torch.float32, log=lambda *_: None)
    rows = bench(data, methods=("lru", "cooc", "predictor", "hybrid", "oracle", "resident"), sim="h100_replay", **kw)
    by = {(r["method"], r["predictor"]): r for r in rows}
    expert_bytes = (2 * data.intermediate * data.hidden + data.hidden * data.intermediate) * 4  # gate_up + down, fp32
    for r in rows:
        assert r["hits"] + r["misses"] == r["accesses"] > 0
        assert r["bytes_moved"] == (r["demand_loads"] + r["prefetches_issued"]) * expert_bytes
    for method in ("predictor", "hybrid"):
        r = by[method, "layer"]
        assert (r["max_inflight"], r["threshold"], r["policy"]) == (4, pytest.approx(1 / 3), "learned")
    assert by["oracle", None]["max_inflight"] == 4 and by["lru", None]["max_inflight"] == 8
    hybrid = by["hybrid", "layer"]
    assert hybrid["host_experts"] == hybrid["misses"] - hybrid["late_prefetches"] > 0 and hybrid["demand_loads"] == 0
    assert by["cooc", None]["sim_tokens_per_s"] is None
    assert all(r["sim_tokens_per_s"] > 0 for r in rows if r["method"] != "cooc")
    assert "vs oracle" in format_sim(rows)
    naive = bench(data, methods=("predictor",), schedule="naive", **kw)[0]
    assert (naive["max_inflight"], naive["threshold"]) == (8, 0.0)


def test_hybrid_rows_on_the_pool_take_the_threads_decisions_and_the_simulators_pool():
    """--hybrid-run pool on a CPU device: the same hits, misses and host experts as on the thread (there the
    rule sends every miss to the store), the row named for it, and its simulated figure from the model of a
    pool off the host thread (cpu_async)."""
    from types import SimpleNamespace

    from benchmarks.replay_sim import RowSimulator
    from benchmarks.replay_table import row_name
    from predictor.simulate.timing import TimeModel

    logs = []
    kw = dict(device="cpu", capacities=(0.25,), methods=("hybrid",), max_tokens=6, warmup=2, dense_mb=0.01,
              dtype=torch.float32, log=logs.append)
    rows = {r["hybrid_run"]: r for r in bench(synthetic_data(), hybrid_run=("thread", "pool"), **kw)}
    assert any(" on a pool of " in line for line in logs)  # its expert timed where the pool runs it
    assert rows["pool"]["cpu_expert_ms"] > 0 and rows["thread"]["cpu_expert_ms"] > 0
    keys = ("hits", "misses", "host_experts", "demand_loads", "bytes_moved")
    assert [rows["thread"][k] for k in keys] == [rows["pool"][k] for k in keys] and rows["pool"]["host_experts"] > 0
    assert (row_name(rows["thread"]), row_name(rows["pool"])) == ("hybrid", "hybrid/pool")
    rs = SimpleNamespace(base=TimeModel(10**6, 25.0, 0.5), cpu_expert_ms=0.2, modes={})
    assert [RowSimulator.time_model(rs, r).cpu_async for r in (rows["thread"], rows["pool"])] == [False, True]


def test_predictor_step_runs_as_a_module(tmp_path):
    """`python -m benchmarks.predictor_step` end to end (its main block once shadowed the benchmark's own
    function with the CLI wrapper's)."""
    import subprocess
    import sys
    from pathlib import Path

    from synthetic import tiny_predictor

    from predictor.export import export_predictor

    data = synthetic_data()
    path = export_predictor(tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts,
                                           top_k=data.top_k, mode="token_ahead"), tmp_path / "p.safetensors")
    out = subprocess.run([sys.executable, "-m", "benchmarks.predictor_step", "--predictor", str(path), "--positions",
                          "4", "8", "--repeats", "1"], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "step at 4:" in out.stdout and "step at 8:" in out.stdout and "40 steps:" in out.stdout


def test_no_main_block_shadows_a_module_name():
    """What a module's `if __name__ == "__main__":` block imports must not rebind a name the module defines."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1]
    for path in sorted(p for d in ("benchmarks", "predictor", "integrate", "tools") for p in (root / d).rglob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                imported = {a.asname or a.name for n in ast.walk(node) if isinstance(n, ast.ImportFrom) for a in n.names}
                assert not imported & defined, f"{path.name}: the main block rebinds {imported & defined}"


def test_predictor_cost_times_step_and_layer_calls(tmp_path):
    from synthetic import tiny_predictor

    from benchmarks.predictor_cost import measure, measure_worker
    from predictor.export import export_predictor, load_predictor

    data = synthetic_data()
    model = load_predictor(export_predictor(
        tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts, top_k=data.top_k,
                       mode="layer_ahead"), tmp_path / "p.safetensors")).eval()
    res = measure(model, data.tokens, data.experts, torch.device("cpu"), 4)
    assert res["step_ms"] > 0 and res["layer_ms"] > 0
    assert res["token_ms"] == pytest.approx(res["step_ms"] + res["layer_ms"] * data.num_layers)
    lean = load_predictor(export_predictor(
        tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts, top_k=data.top_k,
                       mode="layer_ahead", depth_blocks=0), tmp_path / "l.safetensors")).eval()
    sums = measure(lean, data.tokens, data.experts, torch.device("cpu"), 4, path="sums")
    assert sums["layer_ms"] > 0
    sent = measure_worker(lean, data.tokens, data.experts, 4)
    # (medians over different tokens: a send is not always below a round trip on cores other jobs share)
    assert sent["send_ms"] > 0 and sent["round_trip_ms"] > 0 and sent["take_ms"] > 0 and sent["look_ms"] > 0
    assert sent["token_round_trip_ms"] > 0
    assert sent["host_per_layer_ms"] == pytest.approx(sent["send_ms"] + sent["take_ms"] + sent["look_ms"])
    token_ahead = load_predictor(export_predictor(
        tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts, top_k=data.top_k,
                       mode="token_ahead"), tmp_path / "t.safetensors")).eval()
    assert set(measure(token_ahead, data.tokens, data.experts, torch.device("cpu"), 4)) == {"step_ms"}


def test_predictor_device_reaches_the_driver_and_failed_rows_are_reported(tmp_path, monkeypatch):
    """--predictor-device is where each row's driver puts the predictor ("worker": a worker process, whose
    row completes); a row that raises is kept as a failed row (table, JSON) and the command exits non-zero."""
    from synthetic import tiny_predictor

    import benchmarks.bench_replay as br
    from predictor.export import export_predictor

    data = synthetic_data()
    path = export_predictor(tiny_predictor(vocab_size=100, num_layers=data.num_layers, num_experts=data.num_experts,
                                           top_k=data.top_k), tmp_path / "p.safetensors")
    seen = []
    real = br.make_prefetcher
    monkeypatch.setattr(br, "make_prefetcher", lambda *a, **kw: seen.append(
        (kw.get("predictor_device"), kw.get("predictor_worker"))) or real(*a, **kw))
    kw = dict(device="cpu", capacities=(0.25,), predictor_path=[path], max_tokens=4, warmup=1, dense_mb=0.01,
              dtype=torch.float32, log=lambda *_: None)
    bench(data, methods=("predictor",), predictor_device="cpu", **kw)
    rows = bench(data, methods=("predictor",), predictor_device="worker", **kw)
    assert seen == [("cpu", False), (None, True)]
    assert "error" not in rows[0] and rows[0]["decode_tokens"] == 4 and rows[0]["predictor_steps"] > 0

    def broken(*a, **k):
        raise RuntimeError("copy engine fell over")

    monkeypatch.setattr(br, "run_one", broken)
    rows = bench(data, methods=("lru",), **kw)
    assert rows[0]["error"] == "RuntimeError: copy engine fell over" and "FAILED" in format_table(rows)
    monkeypatch.setattr(br, "synthetic_data", lambda: data)
    assert main(["--device", "cpu", "--dtype", "float32", "--max-tokens", "2", "--warmup", "1", "--dense-mb", "0.01",
                 "--methods", "lru", "--json", str(tmp_path / "r.json")]) == 1


def test_a_failed_row_with_an_explicit_threshold_prints_and_sim_vs_gpu_skips_failed_rows(tmp_path, capsys):
    import json

    from benchmarks.sim_vs_gpu import json_rows

    row = dict(method="predictor", capacity=0.25, threshold=0.5, threshold_set=True, predictor="p", dense_ms=0.0,
               error="RuntimeError: boom")
    assert "predictor:p@p0.5" in format_table([row]) and "FAILED" in format_table([row])
    resident = dict(method="resident", capacity=0.1, error="RuntimeError: boom")
    assert " all FAILED" in format_table([resident])
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": [row, dict(method="lru", capacity=0.25, tokens_per_s=1.0)]}))
    assert [r["method"] for r in json_rows([str(path)])] == ["lru"]
    assert "failed in the run" in capsys.readouterr().out


def test_bad_flags_are_refused_before_any_row_runs(tmp_path, capsys):
    """Capacities outside (0, 1], token counts, scaling a saved slice, an unknown `--sim` preset or
    device or predictor device: exit 2 naming the flag, before the store is built (a bad preset once cost every row)."""
    for argv, said in (
        (["--capacities", "0", "1.5"], "--capacities [0.0, 1.5]"),
        (["--max-tokens", "0"], "--max-tokens 0"),
        (["--warmup", "-1"], "--warmup -1"),
        (["--layers", "0"], "--layers 0"),
        (["--save-npz", str(tmp_path / "s.npz"), "--layers", "2"], "--save-npz writes the slice as read"),
        (["--sim", "nopreset"], "nopreset"),
        (["--predictor-device", "foo"], "--predictor-device=foo: not a device"),
        (["--device", "gpu"], "--device=gpu: not a device"),
        (["--dtype", "bf16"], "invalid choice: 'bf16'"),
        *([(["--device", "cuda"], "--device=cuda requested but torch sees no CUDA device")]
          if not torch.cuda.is_available() else []),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--device", "cpu", "--json", str(tmp_path / "out.json"), *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err, argv
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "s.npz").exists()


def test_max_inflight_given_overrides_the_schedule_and_the_oracle_costs_no_predictor_time():
    """--max-inflight (bench's max_inflight) wins over the schedule's cap for its rows, as --threshold does;
    without it they keep the schedule's. The simulator charges an oracle row no predictor step."""
    from types import SimpleNamespace

    from benchmarks.replay_sim import RowSimulator
    from predictor.simulate.timing import TimeModel

    kw = dict(device="cpu", capacities=(0.25,), methods=("lru", "oracle"), max_tokens=4, warmup=2, dense_mb=0.01,
              dtype=torch.float32, log=lambda *_: None)  # fmt: skip
    given = {r["method"]: r["max_inflight"] for r in bench(synthetic_data(), max_inflight=2, **kw)}
    default = {r["method"]: r["max_inflight"] for r in bench(synthetic_data(), **kw)}
    assert given == {"lru": 2, "oracle": 2} and default == {"lru": 8, "oracle": 4}
    base = TimeModel(10**6, 25.0, 0.5, predict_step_ms=4.5, predict_layer_ms=0.3)
    rs = SimpleNamespace(base=base, cpu_expert_ms=0.2, modes={})
    tm = RowSimulator.time_model(rs, {"method": "oracle", "predictor": None})
    assert (tm.predict_step_ms, tm.predict_layer_ms) == (0.0, 0.0)


def test_the_run_json_records_its_token_counts_and_sim_vs_gpu_simulates_those(tmp_path, capsys):
    """bench_replay --json writes the warm-up and timed token counts; sim_vs_gpu replays rows with them (the
    preset's were used, whatever the run replayed) and refuses runs of different counts together."""
    import json

    from benchmarks.sim_vs_gpu import main as sim_vs_gpu

    run = tmp_path / "run.json"
    assert main(["--device", "cpu", "--capacities", "0.5", "--methods", "lru", "--max-tokens", "2", "--warmup", "1",
                 "--dense-mb", "0.01", "--dtype", "float32", "--threads", "1", "--json", str(run)]) == 0  # fmt: skip
    head = json.loads(run.read_text())
    assert (head["warmup"], head["max_tokens"]) == (1, 2)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**head, "warmup": 16}))
    with pytest.raises(SystemExit):
        sim_vs_gpu(["--replay-json", str(run), str(other)])
    assert "runs of different token counts (warm-up, timed) [(1, 2), (16, 2)]" in capsys.readouterr().err
