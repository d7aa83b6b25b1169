"""The classifier's train → export → quantize → calibrate → serve path, on a tiny random
DistilBERT (the same code path as the real model), and `pointsman classify`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from pointsman_classifier.labels import DOMAINS, RISKS
from pointsman_classifier.runtime import ArtifactError, ClassifierModel, Encoded, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def test_artifact_has_what_serving_needs(tiny_artifact: Path) -> None:
    meta = json.loads((tiny_artifact / "metadata.json").read_text())
    assert meta["labels"] == {"domain": list(DOMAINS), "risk": list(RISKS)}
    assert meta["base_model"] == "random-distilbert-tiny"
    assert len(meta["training"]["data_fingerprint"]) == 64
    cal = meta["calibration"]
    assert cal["temperature_domain"] > 0 and cal["temperature_risk"] > 0
    assert set(cal["risk_thresholds"]) == set(RISKS[1:])
    assert 0 <= cal["ambiguity_threshold"] <= 1
    agreement = meta["metrics"]["int8_fp32_agreement"]
    assert agreement["rows"] == 300 and agreement["domain"] >= 0.9


def test_onnx_graph_is_int8_with_dynamic_axes(tiny_artifact: Path) -> None:
    model = onnx.load(str(tiny_artifact / "model.onnx"))
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul"}, ops
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]


def test_predictions_are_probabilities_in_order(tiny_artifact: Path) -> None:
    model = ClassifierModel.load(tiny_artifact)
    texts = [
        "is it legal to bring melatonin into Japan",
        "a poem about my chemo",
        "hi",
        "word " * 400,
    ]
    preds = model.predict(texts)
    assert len(preds) == 4
    for p in preds:
        assert sum(p.domain_probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(p.risk_probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.domain in DOMAINS and p.risk in RISKS
        assert p.confidence == pytest.approx(max(p.domain_probs.values()))
    assert [p.truncated for p in preds] == [False, False, False, True]
    # padding in a batch does not change a prediction (beyond int8 activation rounding: the
    # dynamic quantization scale is per batch; the fp32 graph is exact, see the agreement test)
    alone = model.predict([texts[1]])[0]
    assert alone.domain_probs == pytest.approx(preds[1].domain_probs, abs=0.02)


def test_chunked_batches_come_back_in_input_order(
    tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows run in length-sorted chunks; each prediction must land on its own input. The graph is
    replaced by one whose domain logit is the row's real token count, so a misplaced row shows."""
    model = ClassifierModel.load(tiny_artifact)
    calls: list[int] = []

    def logits(encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(encoded.input_ids))
        n = len(encoded.input_ids)
        domain = np.zeros((n, len(DOMAINS)))
        domain[:, 0] = encoded.attention_mask.sum(axis=1)
        return domain, np.zeros((n, len(RISKS)))

    monkeypatch.setattr(model, "logits", logits)
    rng = random.Random(3)
    texts = [" ".join(["word"] * rng.choice([1, 2, 5, 40, 90])) for _ in range(200)]
    preds = model.predict(texts, max_rows=16)
    assert len(calls) > 200 // 16  # chunked, not one padded batch
    expected = [len(model.tokenizer.encode(t).ids) for t in texts]
    recovered = [
        round(np.log(p.domain_probs[DOMAINS[0]] / p.domain_probs[DOMAINS[1]]) * model.t_domain)
        for p in preds
    ]
    assert recovered == expected


def test_tampered_model_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    for name in ("model.onnx", "tokenizer.json", "metadata.json"):
        (tmp_path / name).write_bytes((tiny_artifact / name).read_bytes())
    with open(tmp_path / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        ClassifierModel.load(tmp_path)
    with pytest.raises(ArtifactError, match=r"metadata\.json"):
        ClassifierModel.load(tmp_path / "nowhere")


def test_classify_cli_keeps_order_and_reports_bad_lines(tiny_artifact: Path) -> None:
    lines = [
        json.dumps({"text": "how do I refinance my mortgage"}),
        "plain text query about a visa",
        json.dumps({"text": "   "}),
        "{not json",
        json.dumps({"text": "x" * 50}),
        json.dumps({"prompt": "wrong key"}),
        json.dumps({"text": "last one"}),
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pointsman",
            "classify",
            "--model",
            str(tiny_artifact),
            "--max-chars",
            "40",
            "--batch-size",
            "2",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = [json.loads(x) for x in result.stdout.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5, 6, 7]
    assert [("error" in o) for o in out] == [False, False, True, True, True, True, False]
    assert "empty" in out[2]["error"] and "JSON" in out[3]["error"] and "limit" in out[4]["error"]
    ok = out[0]
    assert {
        "domain",
        "risk",
        "domain_probs",
        "risk_probs",
        "confidence",
        "ambiguous",
        "model_version",
    } <= set(ok)
    assert "torch" not in result.stderr


def test_classify_runs_without_torch(tiny_artifact: Path) -> None:
    """Serving never imports torch: block it and classify."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pointsman_classifier.runtime import ClassifierModel\n"
        f"m = ClassifierModel.load(__import__('pathlib').Path({str(tiny_artifact)!r}))\n"
        "print(m.predict(['hello'])[0].domain)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in DOMAINS


def test_fp32_export_honours_the_attention_mask(tmp_path: Path) -> None:
    """A padded row gives exactly the logits it gives alone: the mask is in the graph, not
    traced away as a constant."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from pointsman_classifier.modeling import (
        RANDOM_DISTILBERT,
        TwoHeadClassifier,
        export_onnx,
        load_encoder,
    )

    torch.manual_seed(0)
    model = TwoHeadClassifier(load_encoder(RANDOM_DISTILBERT)).eval()
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    alone = np.array([[101, 2054, 2003, 1037, 102]])
    batch = np.array([[101, 2054, 2003, 1037, 102, 0, 0, 0], [101, 2, 3, 4, 5, 6, 7, 102]])
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
    d1, r1 = session.run(None, {"input_ids": alone, "attention_mask": np.ones_like(alone)})
    d2, r2 = session.run(None, {"input_ids": batch, "attention_mask": mask})
    assert np.abs(d1[0] - d2[0]).max() < 1e-5 and np.abs(r1[0] - r2[0]).max() < 1e-5
    with torch.no_grad():
        torch_d, _ = model(torch.tensor(batch), torch.tensor(mask))
    assert np.abs(torch_d.numpy() - d2).max() < 1e-4


def test_layer_pruning_keeps_evenly_spaced_layers_ending_with_the_last() -> None:
    from pointsman_classifier.modeling import RANDOM_DISTILBERT, keep_layers, load_encoder

    assert keep_layers(6, 3) == [1, 3, 5]
    assert keep_layers(6, 2) == [2, 5]
    assert keep_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError):
        keep_layers(6, 7)
    full = load_encoder(RANDOM_DISTILBERT)
    pruned = load_encoder(RANDOM_DISTILBERT, layers=1)
    assert len(pruned.transformer.layer) == pruned.config.n_layers == 1
    assert len(full.transformer.layer) == 2


def test_distillation_loss_is_zero_on_agreement_and_grows_with_disagreement() -> None:
    import torch

    from pointsman_classifier.train import distillation_loss

    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert float(distillation_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    near = float(distillation_loss(teacher + torch.tensor([[0.5, 0.0, 0.0]]), teacher, 2.0))
    far = float(distillation_loss(teacher.flip(-1), teacher, 2.0))
    assert 0.0 < near < far


def test_a_student_learns_from_a_teacher_artifact(
    tiny_artifact: Path, tiny_train_config: Callable[..., Any], tmp_path: Path
) -> None:
    """The distillation path end to end: the teacher's logits are read from its artifact and the
    student comes out as a complete, loadable artifact that records its teacher."""
    from pointsman_classifier.train import train

    out = tmp_path / "student"
    config = tiny_train_config(
        out, layers=1, max_rows=100, agreement_rows=100, calibration_cap=20, teacher=tiny_artifact
    )
    meta = train(config)
    assert meta["training"]["config"]["teacher"] == str(tiny_artifact)
    assert "teacher" in (out / "train.log").read_text()
    assert len(ClassifierModel.load(out).predict(["a poem about my chemo"])) == 1


def test_a_soup_trains_one_model_per_seed_and_averages_them(
    tiny_train_config: Callable[..., Any], tmp_path: Path
) -> None:
    from pointsman_classifier.train import train

    out = tmp_path / "soup"
    config = tiny_train_config(out, max_rows=100, agreement_rows=100, calibration_cap=20, soup=[7])
    meta = train(config)
    log = (out / "train.log").read_text()
    assert "training with seed 13 (1 of 2)" in log and "training with seed 7 (2 of 2)" in log
    assert "model soup:" in log
    assert meta["training"]["config"]["soup"] == [7]
    assert len(ClassifierModel.load(out).predict(["a poem about my chemo"])) == 1
    with pytest.raises(ValueError, match="distinct seeds"):
        train(tiny_train_config(tmp_path / "twice", soup=[13]))


def test_recalibration_rewrites_calibration_and_names_it_in_the_version(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    import shutil

    from pointsman_classifier.train import recalibrate

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, artifact)
    before = json.loads((artifact / "metadata.json").read_text())
    shared, natural = ROOT.parent / "shared" / "datasets", ROOT / "data" / "natural"
    meta = recalibrate(artifact, shared, natural, cap=20)
    assert meta["model_version"].startswith(before["model_version"] + "-cal")
    assert meta["files"] == before["files"]  # weights untouched
    assert "evaluation" not in meta["metrics"]
    assert set(meta["calibration"]["risk_thresholds"]) == set(RISKS[1:])
    model = ClassifierModel.load(artifact)
    assert model.version == meta["model_version"]
    again = recalibrate(
        artifact, shared, natural, cap=20
    )  # same data: same calibration, one suffix
    assert again["model_version"] == meta["model_version"]


def test_int8_keeps_the_heads_and_the_first_ffn_down_projection_in_fp32() -> None:
    from pointsman_classifier.train import fp32_nodes

    bert = [
        f"/encoder/encoder/layer.{i}/{part}/MatMul"
        for i in range(3)
        for part in ("attention/self/query", "intermediate/dense", "output/dense")
    ] + ["/domain_head/Gemm", "/risk_head/Gemm"]
    assert fp32_nodes(bert) == [
        "/domain_head/Gemm",
        "/risk_head/Gemm",
        "/domain_head/Gemm_MatMul",
        "/risk_head/Gemm_MatMul",
        "/encoder/encoder/layer.0/output/dense/MatMul",
    ]
    distilbert = [
        "/encoder/transformer/layer.1/ffn/lin2/MatMul",
        "/encoder/transformer/layer.0/ffn/lin2/MatMul",
    ]
    assert fp32_nodes(distilbert) == ["/encoder/transformer/layer.0/ffn/lin2/MatMul"]
    assert fp32_nodes(["/domain_head/Gemm"]) == ["/domain_head/Gemm", "/domain_head/Gemm_MatMul"]


def test_requantize_rebuilds_the_int8_graph_from_the_recorded_fp32_export(
    tiny_train_config: Callable[..., Any], tmp_path: Path
) -> None:
    """`pointsman quantize`: a new int8 graph from the kept fp32 export, checked against it and
    recalibrated; a foreign fp32 file or too little agreement leaves the artifact as it was."""
    from pointsman_classifier.train import requantize, train

    artifact, fp32 = tmp_path / "artifact", tmp_path / "model.fp32.onnx"
    before = train(tiny_train_config(artifact, keep_fp32=fp32, max_rows=100))
    shared, natural = ROOT.parent / "shared" / "datasets", ROOT / "data" / "natural"
    assert len(before["fp32_sha256"]) == 64

    with pytest.raises(ValueError, match="is not the fp32 export"):
        requantize(artifact, artifact / "model.onnx", shared, natural)
    with pytest.raises(ValueError, match="too few test rows"):
        requantize(artifact, fp32, shared, natural, agreement_rows=100, min_agreement=1.01)
    assert json.loads((artifact / "metadata.json").read_text())["files"] == before["files"]

    meta = requantize(artifact, fp32, shared, natural, agreement_rows=100, min_agreement=0.5)
    assert meta["files"]["model.onnx"] == sha256_file(artifact / "model.onnx")
    assert meta["fp32_sha256"] == sha256_file(fp32)
    assert meta["metrics"]["int8_fp32_agreement"]["rows"] == 100
    assert "-cal" in meta["model_version"] and meta["model_version"] != before["model_version"]
    model = ClassifierModel.load(artifact)
    assert model.version == meta["model_version"]
    assert len(model.predict(["is it legal to bring melatonin into Japan"])) == 1


def test_nan_guards_around_softmax_are_dropped_and_nothing_else(tmp_path: Path) -> None:
    """The exporter's Where(IsNaN(p), 0, p) after a softmax goes (with its fill constant, an
    initializer or a Constant node); a Where that fills with something other than 0 stays;
    outputs do not change."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pointsman_classifier.train import drop_nan_guards

    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
    one = numpy_helper.from_array(np.ones((), dtype=np.float32), "one")
    nodes = [
        helper.make_node("Constant", [], ["zero_c"], value=zero),
        helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1),
        helper.make_node("IsNaN", ["p"], ["q_nan"], name="guard_check_2"),
        helper.make_node("Where", ["q_nan", "zero_c", "p"], ["q_safe"], name="guard_2"),
        helper.make_node("IsNaN", ["p"], ["p_nan"], name="guard_check"),
        helper.make_node("Where", ["p_nan", "zero", "p"], ["p_safe"], name="guard"),
        helper.make_node("IsNaN", ["x"], ["x_nan"]),  # unnamed, like many exported nodes
        helper.make_node("Where", ["x_nan", "one", "x"], ["x_filled"]),  # fills 1: kept
        helper.make_node("Add", ["p_safe", "x_filled"], ["s"], name="add"),
        helper.make_node("Add", ["s", "q_safe"], ["y"], name="add_2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [zero, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0]], dtype=np.float32)

    def run(m: Any) -> Any:
        path = tmp_path / "m.onnx"
        onnx.save(m, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": x})[0]

    before = run(model)
    assert drop_nan_guards(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Softmax", "IsNaN", "Where", "Add", "Add"]
    assert model.graph.node[-2].input[0] == "p" and model.graph.node[-1].input[1] == "p"
    assert [i.name for i in model.graph.initializer] == ["one"]
    np.testing.assert_array_equal(run(model), before)


def test_int8_matmul_is_exact_on_every_x86_cpu(tmp_path: Path) -> None:
    """onnxruntime's fast U8S8 kernel on x86 CPUs without VNNI (AVX2, AVX-512F) adds pairs of
    u8 x s8 products in 16 bits, which saturate: 255 * 127 * 2 > 32767. The serving session must
    use the exact path, or the model's decisions depend on the CPU it runs on."""
    from onnx import TensorProto, helper, numpy_helper

    from pointsman_classifier.runtime import open_session

    k, n = 64, 4
    w = np.full((k, n), 127, dtype=np.int8)
    w[:, 1::2] = -127
    graph = helper.make_graph(
        [
            helper.make_node(
                "DynamicQuantizeMatMul",
                ["x", "w", "w_scale", "w_zero"],
                ["y"],
                domain="com.microsoft",
            )
        ],
        "saturation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
            numpy_helper.from_array(np.array([0], np.int8), "w_zero"),
        ],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "m.onnx"))
    # 0..255 quantize exactly (scale 1, zero point 0), so the int8 product is exact arithmetic
    x = np.full((2, k), 255.0, dtype=np.float32)
    x[1, ::3] = 0.0
    (y,) = open_session(tmp_path / "m.onnx").run(None, {"x": x})
    np.testing.assert_array_equal(y, x @ w.astype(np.float32))


def test_a_stopped_training_run_resumes_bit_for_bit_from_its_checkpoint(
    tiny_train_config: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after 5 of its steps and started again continues from the checkpoint of
    step 4 (not from step 0) and ends with exactly the weights of a run never stopped."""
    from onnx import numpy_helper

    from pointsman_classifier import data, train
    from pointsman_classifier.checkpoint import Checkpoints, run_key

    config = tiny_train_config(tmp_path / "out", max_rows=96, batch_size=8, epochs=2)
    examples = data.load_all(config.shared_dir, config.natural_dir)
    tokenizer = train.load_tokenizer(config)
    key = run_key(train.asdict(config), "data", config.seed)
    steps = 0
    real_pad = train.pad_ids

    def counting_pad(ids: Any) -> Any:
        nonlocal steps
        steps += 1
        return real_pad(ids)

    def stopping_pad(ids: Any) -> Any:
        if steps == 5:
            raise KeyboardInterrupt  # the process is stopped during step 6
        return counting_pad(ids)

    train.fit(config, examples, tokenizer, tmp_path / "whole.onnx")  # never stopped: 24 steps
    checkpoints = Checkpoints(tmp_path / "ckpt", every=4)
    monkeypatch.setattr(train, "pad_ids", stopping_pad)
    with pytest.raises(KeyboardInterrupt):
        train.fit(config, examples, tokenizer, tmp_path / "resumed.onnx", (checkpoints, key))
    assert checkpoints.load(config.seed, key)["step"] == 4  # type: ignore[index]
    steps = 0
    monkeypatch.setattr(train, "pad_ids", counting_pad)
    train.fit(config, examples, tokenizer, tmp_path / "resumed.onnx", (checkpoints, key))
    assert steps == 24 - 4

    def weights(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path)).graph
        return {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    whole, resumed = weights(tmp_path / "whole.onnx"), weights(tmp_path / "resumed.onnx")
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)

    # another run's checkpoint (other learning rate) is not resumed, and is replaced
    other = run_key(train.asdict(replace(config, lr=1e-4)), "data", config.seed)
    assert other != key
    assert checkpoints.load(config.seed, other) is None
    assert not checkpoints.state_path(config.seed).exists()


def test_train_keeps_finished_seeds_and_clears_checkpoints_when_done(
    tiny_train_config: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soup stopped in its second seed does not train the first seed again; once the artifact
    is written the checkpoint folder is gone."""
    from pointsman_classifier import train

    ckpt = tmp_path / "ckpt"
    config = tiny_train_config(
        tmp_path / "out", max_rows=48, soup=[14], checkpoint_dir=ckpt, checkpoint_every=2
    )
    fitted: list[int] = []
    real_fit = train.fit

    def fit_once(cfg: Any, *args: Any) -> None:
        fitted.append(cfg.seed)
        if cfg.seed == 14 and fitted.count(14) == 1:
            raise KeyboardInterrupt
        real_fit(cfg, *args)

    monkeypatch.setattr(train, "fit", fit_once)
    with pytest.raises(KeyboardInterrupt):
        train.train(config)
    assert (ckpt / "member-13.onnx").is_file()
    meta = train.train(config)
    assert fitted == [13, 14, 14]  # seed 13 came from its kept export
    assert "already trained" in (tmp_path / "out" / "train.log").read_text()
    assert meta["training"]["config"].get("checkpoint_dir") is None
    assert not ckpt.exists()
