"""The FLOPs command: counts that can be checked by hand."""
import pytest

from pretrain.flops import format_rows, full_attention, main, measure, table
from pretrain.video_encoder import VideoEncoderConfig, preset_values


def test_testa_token_counts_follow_the_merge_schedule():
    # 32 frames of 14x14 patches, 12 blocks each merging 1 frame and 12 patches: 20 frames x 52 patches
    gflops, tokens = measure(VideoEncoderConfig(**preset_values("testa")), 32, (224, 224))
    assert tokens == [32 * 196, 20 * 52]
    full, _ = measure(full_attention(VideoEncoderConfig(**preset_values("testa"))), 32, (224, 224))
    assert gflops < full / 2


def test_window_attention_grows_slower_with_frames_than_full_attention():
    rows = table(["lfvila_small"], [32, 64])
    r32, r64 = rows
    assert r64["gflops"] / r32["gflops"] == pytest.approx(2.0, rel=0.05)  # windows: linear in frames
    assert r64["full_gflops"] / r32["full_gflops"] > 2.5  # full attention: quadratic term
    assert r64["ratio"] < r32["ratio"] < 1.0
    assert "lfvila_small" in format_rows(rows, markdown=True)


def test_full_preset_is_its_own_baseline_and_the_cli_runs(capsys):
    (row,) = table(["full_small"], [16])
    assert row["ratio"] == pytest.approx(1.0)
    assert main(["--presets", "debug", "--frames", "16"]) == 0
    assert "debug" in capsys.readouterr().out
