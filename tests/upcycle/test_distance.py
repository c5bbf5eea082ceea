"""The measured distance at init (`init_distance` in upcycle_report.json, upcycle/distance.py).

The reference numbers are recomputed here with transformers on the written checkpoint: the dense
model's FFN inputs are captured with hooks, fed to the MoE model's blocks, and both full models'
logits are compared, independently of the streaming code under test.
"""

import dataclasses
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2MoeForCausalLM

from tests.upcycle.fixtures import EXACT_CASES, FFN, make_dense, report
from upcycle import MoEShape, UpcycleConfig, upcycle
from upcycle.calibration import calibration_ids
from upcycle.config import CalibrationConfig

EXACT = {case: EXACT_CASES[case] for case in ("copy", "granular_exact")}
FINE = MoEShape(
    num_experts=10, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=32
)
SMALL = CalibrationConfig(num_sequences=2, seq_len=24)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    make_dense(d)
    return d


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_strategies_measure_no_distance(case, dense_dir, tmp_path):
    shape, recipe = EXACT[case]
    upcycle(dense_dir, tmp_path / "moe", MoEShape(**shape), UpcycleConfig(progress=False, **recipe))
    dist = report(tmp_path / "moe")["init_distance"]
    assert [layer["layer"] for layer in dist["layers"]] == [0, 1]
    for layer in dist["layers"]:
        assert layer["ffn_relative_error"] <= 1e-5, layer
    assert abs(dist["kl"]) <= 1e-6 and abs(dist["ce_delta"]) <= 1e-5
    assert dist["calibration"]["tokens"] == "random_ids" and dist["calibration"]["num_sequences"] == 2


def _hf_reference(dense, moe_dir, ids):
    """Per MoE layer (relative error, router entropy, max load ratio, dead fraction); KL; CE dense, moe."""
    moe = Qwen2MoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    inputs = {}
    hooks = [
        layer.mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(dense.model.layers)
    ]
    with torch.no_grad():
        z_dense = dense(ids).logits
        z_moe = moe(ids).logits
        layers = []
        for i, x in sorted(inputs.items()):
            ffn = dense.model.layers[i].mlp(x)
            block = moe.model.layers[i].mlp
            y = block(x)
            logits, _, selected = block.gate(x.reshape(-1, x.shape[-1]))
            p = logits.softmax(-1)
            load = torch.bincount(selected.flatten(), minlength=p.shape[-1]).float()
            layers.append(
                (
                    ((y - ffn).norm() / ffn.norm()).item(),
                    -(p * p.log()).sum(-1).mean().item(),
                    (load.max() / load.mean()).item(),
                    (load == 0).float().mean().item(),
                )
            )
    for h in hooks:
        h.remove()
    logp_dense, logp_moe = z_dense.log_softmax(-1), z_moe.log_softmax(-1)
    kl = (logp_dense.exp() * (logp_dense - logp_moe)).sum(-1).mean().item()

    def ce(logp):
        return -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()

    return layers, kl, ce(logp_dense), ce(logp_moe)


def test_finegrained_distance_equals_a_recomputation_with_transformers(tmp_path):
    dense = make_dense(tmp_path / "dense")
    cfg = UpcycleConfig(progress=False, calibration=SMALL)
    upcycle(tmp_path / "dense", tmp_path / "moe", FINE, cfg)
    dist = report(tmp_path / "moe")["init_distance"]
    ids, _ = calibration_ids(tmp_path / "dense", SMALL, dense.config.vocab_size)
    layers, kl, ce_dense, ce_moe = _hf_reference(dense, tmp_path / "moe", ids)
    close = dict(rel=1e-4, abs=1e-6)
    for got, (error, entropy, load_ratio, dead) in zip(dist["layers"], layers, strict=True):
        assert got["ffn_relative_error"] > 0.1  # shuffled, half re-drawn, router-weighted: far from the FFN
        assert got["ffn_relative_error"] == pytest.approx(error, **close)
        assert got["router_entropy"] == pytest.approx(entropy, **close)
        assert got["max_load_ratio"] == pytest.approx(load_ratio, **close)
        assert got["dead_experts"] == pytest.approx(dead, **close)
    assert dist["mean_ffn_relative_error"] == pytest.approx(sum(e for e, *_ in layers) / 2, **close)
    assert dist["kl"] > 0 and dist["kl"] == pytest.approx(kl, **close)
    assert dist["ce_dense"] == pytest.approx(ce_dense, **close)
    assert dist["ce_moe"] == pytest.approx(ce_moe, **close)
    assert dist["ce_delta"] == pytest.approx(ce_moe - ce_dense, **close)
    assert dist["max_router_entropy"] == pytest.approx(math.log(10))


def _save_word_tokenizer(directory, words):
    """A word-level tokenizer (ids 0..len(words)) with an EOS token, saved as transformers does."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        directory
    )


def test_calibration_text_is_tokenised_with_the_sources_tokenizer(tmp_path):
    make_dense(tmp_path / "dense")
    words = [f"w{i}" for i in range(40)]
    _save_word_tokenizer(tmp_path / "dense", words)
    texts = [" ".join(words[i : i + 7]) for i in range(0, 35, 7)]
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[:3]))
    (calib / "b.txt").write_text(texts[3])
    cfg = CalibrationConfig(path=str(calib), text_field="body", num_sequences=3, seq_len=10)
    ids, info = calibration_ids(tmp_path / "dense", cfg, vocab_size=96)
    # documents in file order, each followed by <eos> (id 1); 4 documents x 8 tokens = 32 -> 3 x 10
    want = [[i + 2 for i in range(d * 7, d * 7 + 7)] + [1] for d in range(4)]
    assert ids.flatten().tolist() == sum(want, [])[:30]
    assert info == {
        "path": str(calib),
        "tokens": "text",
        "documents": 4,
        "num_sequences": 3,
        "seq_len": 10,
    }
    upcycle(
        tmp_path / "dense",
        tmp_path / "moe",
        FINE,
        UpcycleConfig(progress=False, calibration=dataclasses.replace(cfg, num_sequences=9)),
    )
    calibration = report(tmp_path / "moe")["init_distance"]["calibration"]
    assert calibration["tokens"] == "text" and calibration["num_sequences"] == 3  # all the text there is


def test_calibration_without_a_tokenizer_falls_back_to_random_ids(dense_dir, tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    cfg = CalibrationConfig(path=str(tmp_path / "*.txt"), num_sequences=2, seq_len=8)
    ids, info = calibration_ids(dense_dir, cfg, vocab_size=96)
    again, _ = calibration_ids(dense_dir, CalibrationConfig(num_sequences=2, seq_len=8), vocab_size=96)
    assert ids.shape == (2, 8) and torch.equal(ids, again)  # a fixed set, whatever the path
    assert info["tokens"] == "random_ids" and "no tokenizer files" in info["reason"]


def test_bad_calibration_path_is_refused_before_writing(dense_dir, tmp_path):
    cfg = UpcycleConfig(progress=False, calibration=CalibrationConfig(path=str(tmp_path / "nothing*.jsonl")))
    with pytest.raises(ValueError, match=r"upcycle.calibration.path=.*no file matches"):
        upcycle(dense_dir, tmp_path / "moe", FINE, cfg)
    assert not (tmp_path / "moe").exists()


def test_measurement_can_be_skipped(dense_dir, tmp_path):
    cfg = UpcycleConfig(progress=False, calibration=CalibrationConfig(num_sequences=0))
    upcycle(dense_dir, tmp_path / "moe", FINE, cfg)
    assert report(tmp_path / "moe")["init_distance"] == {"skipped": "upcycle.calibration.num_sequences=0"}
    dry = upcycle(dense_dir, tmp_path / "dry", FINE, UpcycleConfig(dry_run=True))
    assert dry["init_distance"] == {"skipped": "dry run"}


def test_dense_layers_are_measured_through(dense_dir, tmp_path):
    """Layer 0 stays dense (decoder_sparse_step=2): only layer 1 is reported, and copy stays exact."""
    shape = MoEShape(num_experts=3, num_experts_per_tok=2, decoder_sparse_step=2)
    upcycle(dense_dir, tmp_path / "moe", shape, UpcycleConfig(strategy="copy", progress=False))
    dist = report(tmp_path / "moe")["init_distance"]
    assert [layer["layer"] for layer in dist["layers"]] == [1]
    assert dist["layers"][0]["ffn_relative_error"] <= 1e-5 and abs(dist["ce_delta"]) <= 1e-5
    assert FFN == 96  # the copy experts are the whole 96-wide FFN
