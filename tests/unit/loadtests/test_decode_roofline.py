"""bench_decode_roofline at tiny size on CPU: its JSON's arithmetic against counts made here from the model shape."""

from __future__ import annotations

import json

import pytest

from loadtests import bench_decode_roofline
from loadtests.random_model import PRESETS


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("roofline") / "roofline.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "8", "--adapters", "8"]
    assert bench_decode_roofline.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_counts_follow_the_shape(report: dict) -> None:
    p = PRESETS["tiny"]
    hidden, inter, layers, vocab = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"], p["vocab_size"]
    head = hidden // p["num_attention_heads"]
    kv_out = p["num_key_value_heads"] * head
    dims = [(hidden, hidden), (hidden, kv_out), (hidden, kv_out), (hidden, hidden)] + [(hidden, inter)] * 2
    dims.append((inter, hidden))
    params = 2 * vocab * hidden + hidden + layers * (sum(i * o for i, o in dims) + 2 * hidden)
    c, rows, rank = report["counts"], report["batch"], report["rank"]
    assert c["weight_bytes_total"] == 4 * params  # float32: the sum of the parameters' sizes
    assert c["weight_bytes_read"] == 4 * (params - vocab * hidden + rows * hidden)  # only the batch's embedding rows
    assert c["kv_bytes_per_token"] == 2 * layers * kv_out * 4
    assert c["kv_bytes"] == pytest.approx((c["kv_tokens_read"] + rows) * c["kv_bytes_per_token"])
    prompt, steps = report["prompt_tokens"], report["measured"]["steps"]
    assert rows * (prompt + 1) <= c["kv_tokens_read"] <= rows * (prompt + 64 + steps)
    assert c["lora_bytes"] == report["adapters"] * layers * rank * sum(i + o for i, o in dims) * 4
    assert c["bytes_per_step"] == c["weight_bytes_read"] + c["kv_bytes"] + c["lora_bytes"]
    assert c["flops_linear"] == 2 * rows * layers * sum(i * o for i, o in dims)
    assert c["flops_lm_head"] == 2 * rows * hidden * vocab
    assert c["flops_lora"] == 2 * rows * rank * layers * sum(i + o for i, o in dims)
    assert c["flops_attention"] == pytest.approx(4 * hidden * c["kv_tokens_read"] * layers)


def test_floor_and_ratio(report: dict) -> None:
    c, f, m = report["counts"], report["floor"], report["measured"]
    copy, matmul = report["ceilings"]["copy"], report["ceilings"]["matmul"]
    assert copy["bytes_per_s"] == pytest.approx(copy["bytes_moved"] / copy["seconds"])
    assert copy["bytes_moved"] == 2 * 64 * 2**20  # read + written
    assert matmul["flops"] == 2 * matmul["n"] ** 3
    assert f["memory_seconds"] == pytest.approx(c["bytes_per_step"] / copy["bytes_per_s"])
    assert f["compute_seconds"] == pytest.approx(c["flops_per_step"] / matmul["flops_per_s"])
    assert f["seconds"] == max(f["memory_seconds"], f["compute_seconds"])
    assert m["steps"] == 8
    assert m["step_period_min_seconds"] <= m["step_period_seconds"] <= m["step_period_max_seconds"]
    assert report["ratio"] == pytest.approx(m["step_period_seconds"] / f["seconds"])
    assert report["passed"] == (report["ratio"] <= 1.5)


def test_full_decode_steps_take_only_decode_periods() -> None:
    record = bench_decode_roofline.StepRecord
    steps = [record(1.0, 32, 4, 4, 0.5, 0), record(2.0, 4, 4, 4, 0.1, 0), record(2.5, 4, 4, 4, 0.1, 0)]
    steps.append(record(3.5, 3, 3, 3, 0.1, 0))
    assert [(r.ended, period) for r, period in bench_decode_roofline.full_decode_steps(steps, 4)] == [(2.5, 0.5)]


def test_bad_setting_is_refused() -> None:
    with pytest.raises(SystemExit, match=r"section\.key=value"):
        bench_decode_roofline.parse_sets(["max_running=3"])
    assert bench_decode_roofline.parse_sets(["engine.max_running=3", "engine.x=a"]) == {
        "engine": {"max_running": 3, "x": "a"}
    }
