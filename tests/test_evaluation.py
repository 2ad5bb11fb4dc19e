"""Evaluation: metrics against hand-computed values, corruptions, cost, the report."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from refinery import models, scoring
from refinery.engine.runtime import Runtime
from refinery.models import ModelConfig, build_model
from refinery.params import CorruptionParams, EvaluateParams, LatencyParams
from refinery.stages.evaluate import corruptions, cost, metrics
from refinery.stages.evaluate.placement import Placement, prediction_placement
from refinery.stages.evaluate.report import comparison_table, evaluate_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ------------------------------------------------------------------- metrics


def test_accuracy_from_logits() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    assert scoring.accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_macro_scores_match_a_manual_computation() -> None:
    # true:      0 0 0 1 1 2
    # predicted: 0 0 1 1 2 2
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 4).float()
    m = metrics.classification_metrics(logits, labels, ["a", "b", "c", "d"])
    # a: P 2/2, R 2/3; b: P 1/2, R 1/2; c: P 1/2, R 1/1; d: no images, no predictions -> 0
    precision = [1.0, 0.5, 0.5, 0.0]
    recall = [2 / 3, 0.5, 1.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.macro_precision == pytest.approx(sum(precision) / 4)
    assert m.macro_recall == pytest.approx(sum(recall) / 4)
    assert m.macro_f1 == pytest.approx(sum(f1) / 4)
    assert m.per_class["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8,
                                              "support": 3})
    assert m.per_class["d"]["support"] == 0
    expected = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(m.confusion, expected)


def test_ece_on_a_constructed_example() -> None:
    # Two images at confidence 0.85 (one right, one wrong): bin (0.8, 0.9], gap |0.5 - 0.85|.
    # Two at 0.65 (both right): bin (0.6, 0.7], gap |1.0 - 0.65|. Each bin holds half.
    probs = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.65, 0.35]])
    labels = torch.tensor([0, 1, 1, 0])
    cal = metrics.calibration(probs, labels, n_bins=10)
    assert cal.ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)
    assert cal.counts.tolist() == [0, 0, 0, 0, 0, 0, 2, 0, 2, 0]
    assert cal.accuracy[8] == pytest.approx(0.5)
    assert cal.confidence[6] == pytest.approx(0.65)
    assert math.isnan(cal.accuracy[0])
    assert metrics.expected_calibration_error(probs, labels, 10) == pytest.approx(cal.ece)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Confidence 0.75 everywhere and exactly 3 of 4 right.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert metrics.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), 15) == \
        pytest.approx(0.0)


def test_ece_edges_go_to_the_lower_bin() -> None:
    # Bins are (lo, hi]: confidence exactly 1.0 lands in the last bin, 0.5 in the fifth of 10.
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    cal = metrics.calibration(probs, torch.tensor([0, 0]), n_bins=10)
    assert cal.counts[9] == 1 and cal.counts[4] == 1


def test_softmax_is_stable_for_large_logits() -> None:
    probs = metrics.softmax(torch.tensor([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


def test_plots_are_pngs(tmp_path) -> None:
    probs = metrics.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)))
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(1))
    m = metrics.classification_metrics(probs, labels, ["cat", "dog", "ship"])
    confusion = metrics.plot_confusion(m.confusion, ["cat", "dog", "ship"], tmp_path / "c.png")
    reliability = metrics.plot_reliability(metrics.calibration(probs, labels, 15),
                                           tmp_path / "r.png")
    for path in (confusion, reliability):
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5_000


# --------------------------------------------------------------- corruptions


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_noise_is_seeded_and_changes_pixels(images) -> None:
    a = corruptions.gaussian_noise(images, 0.1, seed=3)
    b = corruptions.gaussian_noise(images, 0.1, seed=3)
    c = corruptions.gaussian_noise(images, 0.1, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a != images).float().mean() > 0.9
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # Away from the clip at 0 and 1 the noise has the asked-for spread.
    middle = (images > 0.3) & (images < 0.7)
    assert float((a - images)[middle].std()) == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize(("name", "neutral"), [
    ("gaussian_noise", {"gaussian_noise_std": 0.0}),
    ("gaussian_blur", {"blur_sigma": 0.0}),
    ("brightness", {"brightness": 0.0}),
    ("contrast", {"contrast": 1.0}),
])
def test_neutral_severity_is_identity(images, name, neutral) -> None:
    params = CorruptionParams(**neutral)
    assert torch.equal(corruptions.corrupt(name, images, params, seed=0), images)


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_each_corruption_is_deterministic_and_changes_the_images(images, name) -> None:
    params = CorruptionParams()
    a = corruptions.corrupt(name, images, params, seed=7)
    b = corruptions.corrupt(name, images, params, seed=7)
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.dtype == images.dtype
    assert float((a - images).abs().mean()) > 0.01
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_blur_keeps_flat_images_and_smooths_detail() -> None:
    flat = torch.full((2, 1, 8, 8), 0.4)
    torch.testing.assert_close(corruptions.gaussian_blur(flat, 1.5), flat)
    checker = (torch.arange(8).view(1, -1) + torch.arange(8).view(-1, 1)) % 2
    checker = checker.float().expand(1, 1, 8, 8)
    blurred = corruptions.gaussian_blur(checker, 1.0)
    assert float(blurred.std()) < 0.25 * float(checker.std())
    # A radius (3 sigma = 30 px) far beyond an 8x8 image still works.
    assert corruptions.gaussian_blur(checker, 10.0).shape == checker.shape


def test_jpeg_handles_gray_and_color() -> None:
    gray = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = corruptions.jpeg(gray, 30)
    assert out.shape == gray.shape
    assert float((out - gray).abs().mean()) > 0.02
    better = corruptions.jpeg(gray, 95)
    assert float((better - gray).abs().mean()) < float((out - gray).abs().mean())


def test_brightness_and_contrast_do_what_they_say(images) -> None:
    shifted = corruptions.brightness(torch.full((1, 1, 2, 2), 0.5), 0.3)
    torch.testing.assert_close(shifted, torch.full((1, 1, 2, 2), 0.8))
    flatter = corruptions.contrast(images, 0.4)
    torch.testing.assert_close(flatter.mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(flatter.std(dim=(1, 2, 3)), 0.4 * images.std(dim=(1, 2, 3)))


def test_unknown_corruption_is_refused(images) -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.corrupt("fog", images, CorruptionParams(), seed=0)


# ---------------------------------------------------------------------- cost


def test_latency_is_sane_and_threads_are_restored() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten()).eval()
    seen: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return model(x)

    before = torch.get_num_threads()
    result = cost.cpu_latency(predict, (1, 8, 8), threads=1, warmup=2, iterations=20)
    assert torch.get_num_threads() == before
    assert set(seen) == {1}
    assert 0 < result.p50_ms <= result.p95_ms
    assert (result.batch, result.threads, result.iterations) == (1, 1, 20)
    throughput = cost.cpu_throughput(predict, (1, 8, 8), threads=1, batch=16, iterations=3)
    assert throughput.images_per_s > 0 and throughput.batch == 16 and throughput.threads == 1
    assert torch.get_num_threads() == before


def test_threads_are_restored_after_an_error() -> None:
    before = torch.get_num_threads()

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cost.cpu_latency(broken, (1, 4, 4), threads=1, warmup=1, iterations=5)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_gpu_throughput_without_cuda_is_none() -> None:
    assert cost.gpu_throughput(lambda x: x, (1, 4, 4), batch=4, iterations=2) is None


def test_measure_cost_sizes(tmp_path) -> None:
    model = torch.nn.Linear(10, 10)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    result = cost.measure_cost(None, (1, 4, 4), LatencyParams(), parameters=110, file=path)
    assert result.parameters == models.parameter_count(model) == 110
    assert result.file_mb == pytest.approx(path.stat().st_size / 1e6)
    assert result.latency is None and result.throughput is None


# -------------------------------------------------------------------- report


def _digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def _quick_student(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3
                   ) -> torch.nn.Module:
    """A narrow student, one-cycle SGD: ~96% on digits in a second or two."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="student", in_channels=1, image_size=8, num_classes=10,
                                    mean=(0.3,), std=(0.4,), width=8, depth=(1, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1,
                                                   total_steps=epochs * -(-len(labels) // 64))
    generator = torch.Generator().manual_seed(0)
    x = images.float() / 255
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            index = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    images, labels = _digits_uint8()
    model = _quick_student(images[:1400], labels[:1400])
    return model, images[1400:], labels[1400:]


FAST = EvaluateParams(batch_size=128,
                      latency=LatencyParams(warmup=2, iterations=10, throughput_batch=32,
                                            throughput_iterations=2))


def test_evaluate_model_writes_a_full_report(trained, tmp_path) -> None:
    model, images, labels = trained
    classes = [str(i) for i in range(10)]
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    report = evaluate_model(model, images, labels, classes, FAST, tmp_path / "reports", "student",
                            cost_predict=model, parameters=models.parameter_count(model),
                            file=weights)
    folder = tmp_path / "reports" / "student"
    assert report.directory == folder
    for name in ("confusion.png", "reliability.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved == pytest.approx(report.metrics())
    assert set(json.loads((folder / "per_class.json").read_text())) == set(classes)
    assert report.accuracy > 0.85
    assert 0 <= report.ece <= 1 and 0 <= report.macro_f1 <= 1
    assert set(report.corruption_accuracy) == set(corruptions.CORRUPTIONS)
    # Heavy noise on 8x8 digits must cost accuracy; nothing beats clean by much.
    assert report.corruption_accuracy["gaussian_noise"] <= report.accuracy + 0.02
    assert min(report.corruption_accuracy.values()) < report.accuracy
    assert report.cost.latency is not None and report.cost.latency.threads == 1
    assert report.cost.latency.p50_ms <= report.cost.latency.p95_ms
    assert report.cost.file_mb == pytest.approx(weights.stat().st_size / 1e6)

    again = evaluate_model(model, images, labels, classes, FAST, tmp_path / "reports", "again")
    assert again.corruption_accuracy == report.corruption_accuracy  # same corrupted images
    assert again.cost.latency is None

    markdown, table = comparison_table([report, again])
    lines = markdown.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | accuracy % | macro F1 % | ECE |")
    assert "gaussian_noise acc %" in lines[0] and "threads" in lines[0]
    assert lines[3].startswith("| again |") and "–" in lines[3]
    rows = list(csv.DictReader(io.StringIO(table)))
    assert [r["model"] for r in rows] == ["student", "again"]
    assert float(rows[0]["accuracy %"]) == pytest.approx(100 * report.accuracy)
    assert rows[0]["threads"] == "1" and rows[1]["threads"] == ""


def _runtime(device: str, amp: torch.dtype | None) -> Runtime:
    return Runtime(device=torch.device(device), rank=0, world_size=1, local_rank=0,
                   amp_dtype=amp, channels_last=True, compile=False, deterministic=False,
                   data_on_device="auto")


def test_float_models_predict_where_the_engine_runs_int8_and_cpu_runs_in_fp32() -> None:
    gpu = prediction_placement("float", _runtime("cuda:0", torch.bfloat16))
    assert gpu == Placement(torch.device("cuda:0"), torch.bfloat16, channels_last=True)
    assert prediction_placement("float", _runtime("cuda:0", None)).amp_dtype is None
    for kind, runtime in (("int8", _runtime("cuda:0", torch.bfloat16)),  # CPU-only program
                          ("float", _runtime("cpu", torch.bfloat16)),  # bf16 CPU: still fp32
                          ("float", None)):
        placement = prediction_placement(kind, runtime)
        assert placement == Placement() and placement.on_cpu and placement.amp_dtype is None
    with pytest.raises(ValueError, match="unknown model kind"):
        prediction_placement("fp16", None)  # type: ignore[arg-type]


def test_an_accelerator_predictor_runs_a_copy_there(trained) -> None:
    """Off the CPU the predictor moves a copy of the model and each batch to its device
    ("meta" stands in for a GPU here); the CPU model stays for the latency figures."""
    model, images, _ = trained
    run = Placement(torch.device("meta"), None, channels_last=True).predictor(model)
    logits = run(images[:5].float() / 255)
    assert logits.device.type == "meta" and logits.shape == (5, 10)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_the_placed_predictor_scores_as_the_plain_cpu_model(trained, tmp_path) -> None:
    """On the CPU the placed path (inference mode, images moved once) changes no number."""
    model, images, labels = trained
    classes = [str(i) for i in range(10)]
    placed = prediction_placement("float", _runtime("cpu", None)).predictor(model)
    assert torch.equal(scoring.predict_logits(placed, images, 128),
                       scoring.predict_logits(model, images, 128))
    new = evaluate_model(placed, images, labels, classes, FAST, tmp_path, "new", device="cpu")
    old = evaluate_model(model, images, labels, classes, FAST, tmp_path, "old")
    assert new.metrics() == old.metrics() and new.per_class == old.per_class
    assert np.array_equal(new.predictions, old.predictions)


def test_evaluate_model_checks_its_inputs(trained, tmp_path) -> None:
    model, images, labels = trained
    with pytest.raises(ValueError, match="uint8"):
        evaluate_model(model, images.float(), labels, [str(i) for i in range(10)], FAST,
                       tmp_path, "x")
    with pytest.raises(ValueError, match="labels must be in"):
        evaluate_model(model, images, labels, ["0", "1"], FAST, tmp_path, "x")
