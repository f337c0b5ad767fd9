"""The science on the bundled SmolLM2-135M-Instruct: scores equal TransformerLens's,
sink scores equal those from HF eager attention, and the weight cache works."""

from __future__ import annotations

import pydoc_data.topics
from pathlib import Path

import pytest
import torch
from transformer_lens import head_detector

from headscope.data import TokenizedPrompts
from headscope.probes.loading import load_model
from headscope.probes.patterns import classic_score, probe_patterns
from headscope.runs import open_run
from headscope.scanning import scan

pytestmark = pytest.mark.model


def _prose_texts(n: int) -> list[str]:
    topics = pydoc_data.topics.topics
    return [" ".join(topics[key].split())[:240] for key in sorted(topics)[:n]]


def _repeated_words(n: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    words = "apple river stone cloud green silver window music garden candle orbit velvet".split()
    texts = []
    for _ in range(n):
        picks = [words[i] for i in torch.randint(0, len(words), (10,), generator=generator)]
        texts.append(" ".join(picks + picks))
    return texts


@pytest.mark.parametrize(
    ("exclude_bos", "exclude_current_token"), [(False, False), (True, False), (True, True)]
)
def test_classic_scores_equal_transformer_lens(smollm2, exclude_bos, exclude_current_token):
    texts = _prose_texts(4) + _repeated_words(4)
    tokens = tuple(smollm2.bridge.to_tokens(text)[0] for text in texts)
    prompts = TokenizedPrompts(name="t", prompt_set_hash="t", tokens=tokens, bos_prepended=True)
    stats = probe_patterns(smollm2, prompts, batch_size=4)
    for kind in ("previous_token", "duplicate_token", "induction"):
        ours = classic_score(
            stats.classic_sums,
            kind,
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        ).mean(0)
        theirs = head_detector.detect_head(
            smollm2.bridge,
            texts,
            f"{kind}_head",
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
        )
        assert ours.shape == (30, 9)
        assert (ours - theirs.double()).abs().max() <= 1e-5, kind
        # the comparison is not between near-zero scores: some head does the job
        assert ours.max() > 0.15, f"no head of smollm2 scores above 0.15 as {kind}"


def test_first_token_sink_scan_writes_its_table(smollm2, tmp_path):
    result = scan(
        smollm2, prompts=("prose",), detectors=("first_token_sink",), out=tmp_path / "run",
        on_progress=False,
    )  # fmt: skip
    table = result.head_table("first_token_sink", "prose")
    assert table.summary["n_prompts"] >= 100
    assert len(table.frame) == 30 * 9
    # Sink_1 (Gu et al.): the percentage of (prompt, layer, head) with alpha_0 > 0.3,
    # recounted from the stored statistics; a trained model has many such heads
    alpha = result.stats["prose"]["streaming"].sink_alpha[..., 0]
    assert not alpha.isnan().any()
    recounted = float((alpha > 0.3).double().mean()) * 100.0
    assert table.summary["sink_rate"] == pytest.approx(recounted, abs=1e-9)
    assert table.summary["sink_rate"] > 50.0
    assert set(result.stats["prose"]["streaming"].lengths) == {64}
    assert "patterns" not in result.stats["prose"]  # no detector asked for full patterns
    reopened = open_run(result.path)
    assert reopened.head_table("first_token_sink", "prose").summary == table.summary
    assert "prose/streaming/sink_alpha" in reopened.tensors()


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_weight_cache_cold_then_warm(tmp_path, monkeypatch):
    """The first load dequantizes the GGUF and writes one cache entry; the second reads
    that entry without dequantizing again, writes nothing, and gives the very same logits.
    How long each takes is `headscope bench model-load`'s business, not a test's."""
    from headscope.probes import loading, weight_cache

    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    cold = load_model("smollm2-135m")
    assert cold.cache_hit is False
    entries = list((tmp_path / "models").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries  # no leftovers
    written = _files(tmp_path)
    names = {Path(name).name for name in written}
    assert weight_cache.CACHE_MARKER in names and any(n.endswith(".safetensors") for n in names)

    def dequantize_again(*_args, **_kwargs):
        raise AssertionError("the warm load dequantized the GGUF again")

    monkeypatch.setattr(loading, "_load_gguf", dequantize_again)
    warm = load_model("smollm2-135m")
    assert warm.cache_hit is True
    assert _files(tmp_path) == written  # read, not rewritten
    assert warm.model is not cold.model and warm.arch == cold.arch
    text = "Attention sinks are"
    tokens = warm.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(tokens, cold.tokenizer(text, return_tensors="pt").input_ids)
    with torch.inference_mode():
        assert torch.equal(cold.model(tokens).logits, warm.model(tokens).logits)
