"""The video evaluator on known answers: rendered clips score 1 on every metric; an edited clip fails exactly the
metric the edit breaks (time reversal or a mirror: direction; a static clip labelled moving: dynamic degree; the
wrong law: motion smoothness; a vanished object: count and identity; noise: flicker); the law fits recover the
sampler's parameters; the Fréchet features see motion."""
import numpy as np
import pytest
import torch

from s2g.data.clips import render_prompts, sample_clips
from s2g.eval.video import ATTRIBUTES, FLICKER_MAX, VideoEvaluator, fit_law, frechet_video_distance

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle moving left", "a blue square moving right", "a yellow triangle moving up",
           "a white circle moving down", "a green square moving up and a purple circle moving left",
           "a red triangle moving right and a blue circle moving down", "a white square falling",
           "a purple triangle falling", "a green circle bouncing", "a yellow square bouncing",
           "a blue triangle standing still", "a red square standing still"]


@pytest.fixture(scope="module")
def evaluator():
    return VideoEvaluator.load()


@pytest.fixture(scope="module")
def batch():
    return render_prompts(PROMPTS * 2, seed=7)


def failing(row) -> set:
    return {a for a in ATTRIBUTES if row[a] == 0}


def test_rendered_clips_score_one(evaluator):
    b = sample_clips(48, seed=123)
    rows = evaluator.score(b.videos, b.prompts)
    assert all(failing(r) == set() for r in rows), [(r["prompt"], failing(r)) for r in rows if failing(r)]
    assert all(r["dynamic"] == "right" and r["counts"] == [len(c.objects)] * 8 for r, c in zip(rows, b.clips))
    assert all(max(r["law_residual_px"]) < 0.4 and r["flicker"] == 0 for r in rows)
    other = sample_clips(12, seed=124, num_frames=12, size=48)  # another frame count and size: resampled to 32
    assert all(failing(r) == set() for r in evaluator.score(other.videos, other.prompts))


def test_reversed_in_time_fails_exactly_direction(evaluator, batch):
    rows = evaluator.score(batch.videos.flip(1), batch.prompts)
    for r in rows:
        if r["family"] in ("direction", "pair", "falling"):
            assert failing(r) == {"direction", "all"}, (r["prompt"], failing(r))
        elif r["family"] == "bouncing":  # still down-then-up, but the rebound gains energy (restitution 1.25)
            assert failing(r) == {"motion_smoothness", "all"}, (r["prompt"], failing(r))
        else:
            assert failing(r) == set()


def test_mirrored_fails_exactly_direction_where_left_and_right_swap(evaluator, batch):
    rows = evaluator.score(batch.videos.flip(-1), batch.prompts)
    for r in rows:
        horizontal = "left" in r["prompt"] or "right" in r["prompt"]
        assert failing(r) == ({"direction", "all"} if horizontal else set()), (r["prompt"], failing(r))


def test_static_clip_labelled_moving_fails_dynamic_degree(evaluator):
    b = render_prompts(["a green triangle standing still", "a blue circle standing still"], seed=1)
    rows = evaluator.score(b.videos, ["a green triangle moving left", "a blue circle falling"])
    for r in rows:
        assert r["dynamic"] == "too_static" and r["dynamic_degree"] == 0 and r["direction"] == 0
        assert r["found"] == r["count_stable"] == r["subject_consistency"] == 1 and r["all"] == 0
    moving = render_prompts(["a green triangle moving left"], seed=1)
    (r,) = evaluator.score(moving.videos, ["a green triangle standing still"])
    assert r["dynamic"] == "too_fast" and failing(r) == {"dynamic_degree", "motion_smoothness", "all"}


def test_the_wrong_law_fails_exactly_motion_smoothness(evaluator):
    b = render_prompts(["a red circle moving down", "a white square falling", "a green circle bouncing"], seed=2)
    relabelled = ["a red circle falling", "a white square moving down", "a green circle falling"]
    for r in evaluator.score(b.videos, relabelled):
        assert failing(r) - {"direction", "dynamic_degree"} == {"motion_smoothness", "all"}, (r["prompt"], failing(r))
    r0, r1 = evaluator.score(b.videos[:2], relabelled[:2])
    assert failing(r0) == failing(r1) == {"motion_smoothness", "all"}  # down at constant speed vs accelerating


def test_a_vanished_object_breaks_count_and_identity_but_not_the_rest(evaluator):
    b = render_prompts(["a blue square moving right and a yellow circle moving up"], seed=4)
    videos = b.videos.clone()
    videos[0, 3] = 0  # frame 3 is empty
    (r,) = evaluator.score(videos, b.prompts)
    assert r["counts"][3] == 0 and failing(r) == {"count_stable", "subject_consistency", "all"}
    videos[0, 5] = 0  # two frames of eight: the objects are no longer found in almost every frame
    (r,) = evaluator.score(videos, b.prompts)
    assert {"found", "multiple_objects", "color", "object_class"} <= failing(r)


def test_flicker_is_background_change_between_frames(evaluator, batch):
    v = batch.videos[:4]
    g = torch.Generator().manual_seed(0)
    # uniform noise of width 0.1: consecutive frames differ by 0.1 / 3 on average when it is drawn afresh
    noisy = (v + 0.1 * torch.rand(v.shape, generator=g)).clamp(0, 1)
    frozen = (v + 0.1 * torch.rand((4, 1, 3, 32, 32), generator=g)).clamp(0, 1)  # the same noise every frame
    flick = evaluator.score(noisy, batch.prompts[:4])
    still = evaluator.score(frozen, batch.prompts[:4])
    assert all(r["flicker"] == pytest.approx(0.1 / 3, rel=0.1) and r["temporal_flickering"] == 0 for r in flick)
    assert 0.1 / 3 > FLICKER_MAX
    assert all(r["flicker"] < 1e-6 and r["temporal_flickering"] == 1 for r in still)
    snow = torch.rand((1, 8, 3, 32, 32), generator=g)  # noise everywhere: no background left to measure on
    (r,) = evaluator.score(snow, batch.prompts[:1])
    assert r["flicker"] == pytest.approx(1 / 3, rel=0.05) and r["temporal_flickering"] == 0


def test_law_fits_recover_the_truth():
    t = np.linspace(0, 7, 8)
    pos = np.stack([np.full(8, 10.0), 5 + 0.3 * t + 0.5 * t * t / 2], 1)
    fit = fit_law("falling", t, pos)
    assert fit["ok"] and fit["acceleration"] == pytest.approx(0.5) and fit["residual_px"] < 1e-9
    assert not fit_law("down", t, pos)["ok"]  # 0.5 px/frame² leaves 1.1 px off a straight line
    b = render_prompts(["a yellow square bouncing"] * 6, seed=9)
    for clip, row in zip(b.clips, VideoEvaluator.load().score(b.videos, b.prompts, details=True)):
        law, truth = row["objects"][0]["law"], clip.objects[0]
        assert law["restitution"] == pytest.approx(0.8, abs=0.06)
        assert law["t_bounce"] == pytest.approx(truth.t_bounce, abs=0.15) and abs(law["floor_gap_px"]) < 1


def test_features_see_motion_and_bad_input_fails(evaluator, batch):
    feats = evaluator.features(batch.videos)
    assert feats.shape == (len(PROMPTS) * 2, evaluator.feature_dim(8)) == (24, 128 + 18 * 8)
    _, read_feats = evaluator.read(batch.videos, batch.prompts)
    np.testing.assert_allclose(read_feats, feats, atol=1e-6)
    rev = evaluator.features(batch.videos.flip(1))
    # averaging over frames forgets their order; the per-frame moments keep it: reversed clips, reversed moments
    np.testing.assert_allclose(rev[:, :128], feats[:, :128], atol=1e-5)
    np.testing.assert_allclose(rev[:, 128:].reshape(24, 8, 18), feats[:, 128:].reshape(24, 8, 18)[:, ::-1], atol=1e-5)
    fd = frechet_video_distance(feats, rev)
    assert fd["appearance"] < 1e-6 < fd["motion"] == pytest.approx(fd["fvd"], rel=0.2)
    with pytest.raises(ValueError, match="unknown motion 'jumping'"):
        evaluator.score(batch.videos[:1], ["a red circle jumping"])
    with pytest.raises(ValueError, match="is an image prompt"):
        evaluator.score(batch.videos[:1], ["a red circle"])
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        evaluator.score(batch.videos[0], batch.prompts[:1])
    with pytest.raises(ValueError, match="2 clips but 1 prompts"):
        evaluator.score(batch.videos[:2], batch.prompts[:1])
