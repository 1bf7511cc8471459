"""``llmjax lifecycle``: every stage of the README's first command, end to end at the tiny size."""

import json

import numpy as np
import pytest

from llmjax.cli import main
from llmjax.evaluate import load_model_for_inference
from llmjax.quantize import is_quantized


@pytest.mark.slow
def test_tiny_lifecycle_runs_every_stage_and_reports_where_each_artifact_is(tmp_path, capsys):
    out = tmp_path / "life"
    assert main(["lifecycle", "--out", str(out), "--tiny", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    for row in ("zero_shot", "full_ft", "lora_r1", "reward_model", "ppo", "int8"):
        assert row in results, row
    assert "full_ft_mixed" not in results and "dpo" not in results and "distill" not in results
    assert "instruct_zero_shot" not in results  # the lab's instruction-base rows are not part of the lifecycle
    q = results["int8"]
    assert q["base"] == "ppo" and 0.0 <= q["summaries_identical_to_base"] <= 1.0
    # int8 kernels and embeddings with fp32 scales: about a quarter of the float bytes (norms stay float).
    assert q["memory_bytes"] < 0.35 * q["float_memory_bytes"] and q["disk_bytes"] >= q["memory_bytes"]
    predictions = (out / "predictions" / "int8.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and all(json.loads(line)["references"] for line in predictions)

    qmodel, qparams, _ = load_model_for_inference(out / "int8")
    assert is_quantized(qmodel)
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model, params, _ = load_model_for_inference(out / "ppo")
    exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(out / "hf").eval()
    ids = np.array([[5, 9, 13, 1]])
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor([[0, 7]])).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, ids, np.array([[0, 7]])))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

    text = (out / "report.md").read_text()
    assert "## int8 post-training quantization" in text and "## Where everything is" in text and "`hf/`" in text
    assert "lifecycle done in" in capsys.readouterr().out
