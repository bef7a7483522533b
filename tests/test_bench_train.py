"""``python -m gradstab bench --train`` on a tiny setting, and its report arithmetic."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

pytest.importorskip("lightning.pytorch")

import gradstab.callback
from gradstab.__main__ import main
from gradstab.tools.bench import train as bench_train


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # bench --train sets one thread


def test_bench_train_command(tmp_path, capsys):
    path = tmp_path / "train.json.gz"  # .gz: the raw timings too
    argv = ["bench", "--train", "--repeats", "1", "--train-steps", "8", "--warmup", "2"]
    argv += ["--train-width", "8", "--train-depth", "2", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for v in bench_train.VARIANTS:
        assert f"| {v} |" in out
    assert "gradstab overhead / Lightning overhead" in out or "no ratio" in out
    assert "final parameters match the Lightning run" in out
    with gzip.open(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    for clock in bench_train.CLOCKS:
        for v in bench_train.VARIANTS:
            assert len(doc["times_ms"][clock][v]) == 5  # 8 steps: 7 intervals, 2 untimed
    assert doc["check"]["clipped_steps"] >= 1
    assert doc["check"]["max_abs_param_diff"] < 1e-5


def test_bad_plan_is_refused(capsys):
    argv = ["bench", "--train", "--repeats", "1", "--train-steps", "4", "--warmup", "3"]
    assert main(argv) == 2
    assert "0 <= warmup < steps - 1" in capsys.readouterr().err


def test_summary_arithmetic():
    wall = {"none": [1.0, 3.0, 2.0], "lightning": [4.0, 5.0, 6.0], "gradstab": [2.5, 2.5, 2.5]}
    cpu = {"none": [1.0], "lightning": [0.5], "gradstab": [1.1]}
    s = bench_train.summarize({"times": {"wall": wall, "cpu": cpu}})
    assert s["wall"]["ratio"] == pytest.approx(0.5 / 3.0)
    assert [r["overhead_ms"] for r in s["wall"]["rows"]] == [None, 3.0, 0.5]
    assert s["cpu"]["ratio"] is None  # Lightning "faster" than nothing: noise, no ratio
    text = bench_train.format_report(s)
    assert "wall clock: gradstab overhead / Lightning overhead = 0.167" in text
    assert "cpu clock:  Lightning's overhead was not positive" in text


# --train-model transformer: a GPT-2-like decoder at toy size (one block, d_model 16), fused
# AdamW; a few seconds on one core.
TINY_GPT = ["--train-model", "transformer", "--train-depth", "1", "--train-width", "16"]
TINY_GPT += ["--train-heads", "2", "--train-seq", "8", "--train-vocab", "32", "--train-batch", "4"]
TINY_PLAN = ["--repeats", "1", "--train-steps", "8", "--warmup", "2"]


def test_bench_train_transformer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_train, "CHECK_STEPS", 5)  # compared after 5 of the 8 steps
    path = tmp_path / "train.json"
    assert main(["bench", "--train", *TINY_GPT, *TINY_PLAN, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GPT-2-like decoder, 1 blocks x d_model 16, 2 heads, seq 8, vocab 32" in out
    fused = bench_train.fused_adamw_supported("cpu")
    assert fused  # torch >= 2.4 has a fused AdamW for the CPU
    assert "optimizer: AdamW(lr=0.001, fused=True)" in out
    assert "device:   cpu" in out
    assert "; after 5 steps, the parameters match the Lightning run to" in out
    doc = json.loads(path.read_text())
    assert doc["meta"]["device"] == "cpu"
    model = doc["model"]
    assert model["kind"] == "transformer"
    assert (model["layers"], model["d_model"], model["heads"]) == (1, 16, 2)
    assert (model["seq"], model["vocab"], model["batch"], model["tied"]) == (8, 32, 4, True)
    assert model["optimizer"] == "AdamW(lr=0.001, fused=True)" and model["fused"] is True
    # tied head: the embedding counted once
    spec = bench_train.TransformerSpec(layers=1, d_model=16, heads=2, seq=8, vocab=32)
    assert model["params"] == spec.params() == 3952 and model["tensors"] == 16
    for clock in bench_train.CLOCKS:
        rows = {r["variant"]: r for r in doc["summary"][clock]["rows"]}
        assert set(rows) == set(bench_train.VARIANTS)
        for r in rows.values():
            assert r["steps"] == 5 and r["median_ms"] > 0
    chk = doc["check"]
    assert chk["clipped_steps"] >= 1 and chk["compared_after_steps"] == 5
    assert chk["max_abs_param_diff"] <= chk["tolerance"]["atol"]
    assert chk["tolerance"] == {"rtol": 1e-3, "atol": 1e-4}


def test_bench_train_transformer_check_fails_when_gradstab_never_clips(capsys):
    argv = ["bench", "--train", *TINY_GPT, *TINY_PLAN, "--train-max-norm", "1e6"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "correctness check failed" in err and "gradstab never clipped" in err


def test_bench_train_transformer_check_fails_when_a_tensor_is_not_clipped(monkeypatch, capsys):
    # A plausible bug: gradstab leaving out a tensor (here the tied embedding/LM head, whose
    # gradient it zeroes); Lightning's run updates it, so the final parameters part.
    class Broken(gradstab.callback.GradStabCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            next(pl_module.parameters()).grad.zero_()

    monkeypatch.setattr(gradstab.callback, "GradStabCallback", Broken)
    assert main(["bench", "--train", *TINY_GPT, *TINY_PLAN]) == 1
    assert "had different parameters after 8 steps" in capsys.readouterr().err


def test_transformer_is_causal_and_tied():
    spec = bench_train.TransformerSpec(layers=2, d_model=16, heads=2, seq=8, vocab=32)
    torch.manual_seed(0)
    model = bench_train.TinyGPT(spec)
    assert model.head.weight is model.tok.weight
    x = torch.randint(32, (2, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 32  # change the future only
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions 0-4 cannot see 5-7
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    untied = bench_train.TinyGPT(
        bench_train.TransformerSpec(layers=1, d_model=16, heads=2, tied=False)
    )
    assert untied.head.weight is not untied.tok.weight


def test_bad_transformer_sizes_are_refused(capsys):
    argv = ["bench", "--train", "--train-model", "transformer", "--train-width", "10"]
    assert main([*argv, "--train-heads", "4"]) == 2  # 10 is not a multiple of 4
    assert "d_model a multiple of heads" in capsys.readouterr().err
    assert main(["bench", "--train", "--train-heads", "2"]) == 2  # transformer-only option
    assert "are for --train-model transformer" in capsys.readouterr().err


def test_bench_train_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for model in bench_train.MODELS:
        argv = ["bench", "--train", "--device", "cuda", "--train-model", model, *TINY_PLAN]
        assert main(argv) != 0
        captured = capsys.readouterr()
        assert "--device cuda but no CUDA device is available" in captured.err
        assert "| none |" not in captured.out  # refused before timing anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", bench_train.MODELS)
def test_bench_train_on_cuda(model, tmp_path, capsys):
    path = tmp_path / "train.json"
    argv = ["bench", "--train", "--quick", "--device", "cuda", "--train-model", model]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "GPU:" in out and "device:   cuda:" in out
    doc = json.loads(path.read_text())
    assert doc["meta"]["device"].startswith("cuda")
    assert doc["model"]["kind"] == model
    if model == "transformer":
        assert doc["model"]["fused"] is bench_train.fused_adamw_supported("cuda")
    assert doc["check"]["clipped_steps"] >= 1
    for clock in bench_train.CLOCKS:
        assert {r["variant"] for r in doc["summary"][clock]["rows"]} == set(bench_train.VARIANTS)
