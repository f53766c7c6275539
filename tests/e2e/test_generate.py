"""The real entry point end to end on the tiny model: one process, torchrun with 2 and 4 ranks (same frames), the
run report, and the output contract (H.264 + AAC, 25 fps, the audio's duration, atomic, no overwrite)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, generate, tiny_args

pytestmark = pytest.mark.slow


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def single(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "talk.mp4"
    result = _ok(generate(*tiny_args(tiny_weights, out, None, "save_intermediates=true")))
    (out.parent / "stderr.log").write_text(result.stderr)
    return out


@pytest.mark.timeout(300)
def test_single_process_writes_h264_aac_at_25fps_with_the_audio_duration(single):
    from avatar.io.video import probe

    info = probe(str(single))
    seconds = sf.info(str(EXAMPLES / "speech_5s.wav")).duration
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.audio_streams == 1
    assert info.fps == 25
    assert abs(info.frames - seconds * 25) <= 1
    assert abs(info.duration - seconds) <= 1 / 25 + 0.03
    assert (info.width, info.height) == (128, 128) or min(info.width, info.height) == 128
    leftovers = [p.name for p in single.parent.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".part")]
    assert leftovers == []
    assert not (single.parent / (single.name + ".state")).exists()


@pytest.mark.timeout(300)
def test_run_report_records_config_plan_hashes_timings_and_windows(single):
    report = json.loads((single.parent / (single.name + ".json")).read_text())
    assert report["seed"] == 128 and report["steps"] == 3 and report["fps"] == 25
    assert report["config"]["model"]["name"] == "tiny"
    assert report["plan"] == {"world": 1, "data": 1, "cfg": 1, "sequence": 1}
    assert len(report["inputs"]["sha256"]["audio"]) == 64
    for stage in ("inputs", "audio_features", "face_mask", "text_conditioning", "reference_latents", "denoise"):
        assert report["timings_seconds"][stage] >= 0, stage
    assert report["denoise"]["windows"] and report["peak_host_memory_mb"] > 0
    decode = report["decode"]
    assert decode["tiles_per_rank"] == [decode["temporal_tiles"] * decode["spatial_tiles_per_temporal_tile"]]
    flops = report["flops"]["stages"]  # the FLOP model: every stage does work, a full step more than a cached one
    assert all(flops[stage]["flops"] > 0 for stage in ("encoders", "dit", "decode")), flops
    assert flops["dit"]["full_step_forward"] > flops["dit"]["cached_step_forward"] > 0
    assert set(flops["encoders"]["per_stage"]) >= {"audio_features", "text_conditioning", "reference_latents"}
    assert report["flops"]["total"] == sum(flops[stage]["flops"] for stage in ("encoders", "dit", "decode"))
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}


@pytest.mark.timeout(300)
def test_report_and_log_observe_every_stage(single, tiny_weights):
    import avatar
    from avatar.weights.files import weights_fingerprint

    report = json.loads((single.parent / (single.name + ".json")).read_text())
    assert report["launcher"]["version"] == avatar.__version__
    commit = report["launcher"]["git_commit"]  # the tests run from the git checkout
    assert commit is None or len(commit.removesuffix("+dirty")) == 40
    assert report["weights"]["fingerprint"] == weights_fingerprint(tiny_weights)
    den = report["denoise"]
    assert den["windows_per_step"] == len(report["denoise"]["windows"]) >= 1
    # one forward per CFG branch per window per step (the tiny run: 3 steps, 2 branches, no CFG split)
    assert den["forwards"] == 2 * den["window_calls"] == 2 * 3 * den["windows_per_step"]
    assert report["face_found"] is True and report["ranks"][0]["peak_host_memory_mb"] > 0
    log = (single.parent / "stderr.log").read_text()
    assert "\r" not in log  # not a terminal: plain progress lines
    for line in ("audio features:", "face detection:", "text conditioning:", "reference latents:", "denoising "):
        assert line in log, line
    assert "denoise: 3/3 it (100%)" in log and "decode: 125/125 frames (100%)" in log and "mux: audio" in log
    assert "ETA" in log
    # The memory plan (no GPU memory to plan for on the CPU: memory=auto resolves to none) in the log and report,
    # and the encoders released before the reference latents.
    assert "memory: none (auto: no GPU memory to plan for" in log and "peak per rank: " in log
    assert report["memory"]["mode"] == "none" and report["memory"]["why"].startswith("auto: no GPU memory")
    assert set(report["memory"]["stages"]) == {"encode", "reference", "denoise", "decode"}
    assert report["memory"]["stages"]["denoise"]["activations"] > 0
    assert log.index("encoders: ") < log.index("reference latents:")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_ranks_write_the_same_frames_as_one_process(single, tiny_weights, tmp_path, nproc):
    from tests.utils.video import read_frames

    out = tmp_path / "multi.mp4"
    _ok(generate(*tiny_args(tiny_weights, out), nproc=nproc, timeout=580))
    report = json.loads((tmp_path / "multi.mp4.json").read_text())
    assert report["plan"]["world"] == nproc
    # every rank decodes a share of the tiles, and the report says how many
    assert len(report["decode"]["tiles_per_rank"]) == nproc and min(report["decode"]["tiles_per_rank"]) > 0
    np.testing.assert_array_equal(read_frames(str(out)), read_frames(str(single)))


@pytest.mark.timeout(300)
def test_saved_intermediates_reproduce_the_denoised_latents(single, tiny_weights):
    """The denoise stage alone, fed the noise and conditioning the run saved, gives the run's final latents."""
    import torch

    from avatar.compose import compose
    from avatar.pipeline import denoise as dn
    from avatar.weights.load import load_dit

    noise, cond, extra = dn.load_intermediates(str(single) + ".intermediates.pt")
    assert extra["strategy"] == "shift" and extra["seed"] == 128 and "latents" in extra
    assert noise.shape == extra["latents"].shape and cond.num_frames == 125
    cfg = compose(["model=tiny", "sampling.steps=3"])
    model = load_dit(tiny_weights, cfg.model, dtype=torch.float32, device="cpu").eval()
    latents = dn.denoise_window_strategy(
        model,
        cond,
        noise,
        cfg.sampling,
        cfg.model,
        extra["strategy"],
        overlap=extra["overlap"],
        use_cache=extra["cache"],
    )
    torch.testing.assert_close(latents, extra["latents"], rtol=0, atol=0)
    # and they are not the noise: the check can fail
    assert not torch.equal(latents, noise)
