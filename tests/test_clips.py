"""Procedural clips: determinism, laws that hold exactly, pixels that carry the ground truth, the video grammar and
its prompt sets, one-line errors for prompts outside it."""
from collections import Counter

import numpy as np
import pytest
import torch

from s2g.data import clips as C
from s2g.data.scenes import COLORS, parse_prompt, render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def many():
    return C.random_clips(400, seed=0)


def test_deterministic_in_seed_and_motion_independent_of_frame_count():
    a, b, c = C.sample_clips(16, seed=5), C.sample_clips(16, seed=5), C.sample_clips(16, seed=6)
    assert a.prompts == b.prompts and torch.equal(a.videos, b.videos) and a.prompts != c.prompts
    assert a.videos.shape == (16, 8, 3, 32, 32) and 0 <= a.videos.min() and a.videos.max() <= 1
    long = C.sample_clips(16, seed=5, num_frames=15, size=48)
    assert long.videos.shape == (16, 15, 3, 48, 48) and long.prompts == a.prompts
    for short, fine in zip(a.clips, long.clips):  # frame k of 8 is frame 2k of 15: the same motion, sampled finer
        np.testing.assert_allclose(fine.positions()[:, ::2], short.positions(), atol=1e-12)


def test_every_law_holds_exactly(many):
    fams = Counter(c.family for c in many)
    assert set(fams) == set(C.FAMILIES) and fams["static"] >= 20
    for clip in many:
        spec = C.parse_video_prompt(clip.prompt)
        assert [(o.color, o.shape, o.motion) for o in clip.objects] == spec
        assert C.video_family(clip.prompt) == clip.family
        assert set(clip.prompt.split()) <= set(C.WORDS)
        pos, vel = clip.positions() * 32, clip.velocities() * 32  # reference px, px per frame (F = 8)
        for o, p, v in zip(clip.objects, pos, vel):
            r = o.size * 32
            up, down = C.vertical_extent(o.shape, r)
            assert (p[:, 0] >= r - 1e-9).all() and (p[:, 0] <= 32 - r + 1e-9).all()  # fully in frame
            assert (p[:, 1] >= up - 1e-9).all() and (p[:, 1] <= 32 - down + 1e-9).all()
            step = np.diff(p, axis=0)
            if o.motion in C.DIRECTIONS:
                u = np.array(C.DIRECTIONS[o.motion])
                speed = step @ u
                assert np.allclose(step, speed[:, None] * u) and np.ptp(speed) < 1e-9  # axis-aligned, constant
                assert 1.5 <= speed[0] <= 2.5 and np.allclose(v, speed[0] * u)
            elif o.motion == "falling":
                assert np.allclose(step[:, 0], 0) and 0.45 <= np.diff(step[:, 1]).mean() <= 0.6
                assert np.ptp(np.diff(step[:, 1])) < 1e-9 and 0 <= v[0, 1] <= 0.5  # constant g, small start speed
            elif o.motion == "bouncing":
                tb, e, g = o.t_bounce, o.restitution, o.g
                assert e == 0.8 and 3 <= tb <= 4 and 0.4 <= g <= 0.6
                (yb,), (vb,) = o.state([tb])[0][:, 1], o.state([tb - 1e-9])[1][:, 1]
                assert yb == pytest.approx(32 - down) and 2.5 <= vb <= 3.5  # touches the floor at impact speed
                assert o.state([tb + 1e-9])[1][0, 1] == pytest.approx(-e * vb)  # reflected with restitution e
                assert p[:, 1].argmax() in (3, 4) and (p[:, 1] <= 32 - down + 1e-9).all()  # one bounce, then up
            else:
                assert np.allclose(step, 0) and np.allclose(v, 0)
        if len(clip.objects) == 2:  # bounding boxes apart in every frame
            a, b = clip.objects
            gap = (a.size + b.size) * 32 + C.PAIR_MARGIN
            assert (np.abs(pos[0] - pos[1]).max(1) >= gap - 1e-9).all()


def test_displacement_ranges_cover_the_sampler(many):
    for clip in many:
        for o, p in zip(clip.objects, clip.positions() * 32):
            lo, hi = C.displacement_range(o.motion)
            d = np.hypot(*(p - p[0]).T).max()
            # the impact falls between frames, so a bounce's sampled drop can miss up to half a frame at 3.5 px/frame
            slack = 1.75 if o.motion == "bouncing" else 1e-9
            assert lo - slack <= d <= hi + 1e-9
    assert C.displacement_range("left") == pytest.approx((10.5, 17.5))


def test_frames_are_the_image_renderer_and_pixels_carry_the_truth():
    batch = C.render_prompts(["a red circle moving right", "a white square falling",
                              "a blue circle moving up and a yellow square moving left", "a green square bouncing"],
                             seed=3)
    size = 32
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for clip, video in zip(batch.clips, batch.videos):
        assert torch.equal(video, render(clip.frames(), size))
        for o, p in zip(clip.objects, clip.positions()):
            col = torch.tensor(COLORS[o.color]).view(3, 1, 1)
            for k, frame in enumerate(video):
                near = ((xx / size - p[k, 0]).abs() < o.size * 1.2) & ((yy / size - p[k, 1]).abs() < o.size * 1.2)
                w = (frame * near).sum(0)
                cx, cy = (w * xx).sum() / w.sum() / size, (w * yy).sum() / w.sum() / size
                assert cx.item() == pytest.approx(p[k, 0], abs=0.01) and cy.item() == pytest.approx(p[k, 1], abs=0.01)
                assert ((frame - col).abs().amax(0) < 1e-6).sum() >= 9  # its colour, fully covered pixels


def test_prompt_sets_are_disjoint_fixed_and_balanced():
    test, val = C.video_prompt_set("test"), C.video_prompt_set("val")
    assert len(test) == len(set(test)) == 300 and len(val) == len(set(val)) == 150
    assert not set(test) & set(val) and C.video_prompt_set("test") == test
    grammar = C.video_grammar_prompts()
    assert {f: len(v) for f, v in grammar.items()} == {"direction": 72, "pair": 18 * 17 * 16, "falling": 18,
                                                        "bouncing": 18, "static": 18}
    whole = Counter(C.video_family(p) for p in test)
    assert whole == {"direction": 48, "pair": 216, "falling": 12, "bouncing": 12, "static": 12}
    head = Counter(C.video_family(p) for p in test[:100])  # a prefix keeps the proportions
    assert head["pair"] == 72 and head["direction"] == 16
    assert all(head[f] == 4 for f in ("falling", "bouncing", "static"))
    assert C.video_prompt_set("val", 10) == val[:10]
    with pytest.raises(ValueError, match="has 150 prompts"):
        C.video_prompt_set("val", 151)


def test_training_prompts_follow_the_mix():
    prompts = C.random_video_prompts(4000, np.random.default_rng(1))
    got = Counter(C.video_family(p) for p in prompts)
    for fam, share in C.DEFAULT_MIX.items():
        assert got[fam] / 4000 == pytest.approx(share, abs=0.03)
    only = C.random_video_prompts(50, np.random.default_rng(1), mix={"falling": 1})
    assert all(p.endswith(" falling") for p in only)
    with pytest.raises(ValueError, match="unknown families"):
        C.random_video_prompts(5, np.random.default_rng(1), mix={"jumping": 1})


@pytest.mark.parametrize("prompt, message", [
    ("a red circle moving sideways", "unknown motion 'moving sideways'.*known: moving left, moving right"),
    ("a red circle jumping", "unknown motion 'jumping'.*standing still"),
    ("a red dog moving left", "unknown shape 'dog'"),
    ("a pink circle falling", "unknown colour 'pink'"),
    ("a red circle", "is an image prompt"),
    ("a red circle left of a blue square", "is an image prompt"),
    ("a red circle and a blue square moving up", "names no motion for 'a red circle'"),
    ("a red circle falling and a blue square moving up", "each object of a pair moves left, right, up or down"),
    ("a red circle moving up and a red circle moving left", "names the same object twice"),
    ("circles moving", "not in the video grammar"),
])
def test_bad_video_prompts_are_one_line_errors(prompt, message):
    with pytest.raises(ValueError, match=message) as err:
        C.parse_video_prompt(prompt)
    assert "\n" not in str(err.value)


def test_the_image_grammar_rejects_video_prompts_and_files_are_checked(tmp_path):
    with pytest.raises(ValueError, match="is a video prompt") as err:
        parse_prompt("a green triangle standing still")
    assert "\n" not in str(err.value)
    f = tmp_path / "p.txt"
    f.write_text("# mine\na red circle falling\n")
    assert C.video_prompt_set(str(f)) == ["a red circle falling"]
    f.write_text("a red circle\n")
    with pytest.raises(ValueError, match="is an image prompt"):
        C.video_prompt_set(str(f))
    with pytest.raises(ValueError, match="at least 2 frames"):
        C.random_clips(2, seed=0, num_frames=1)


def test_perpendicular_movers_are_placed_where_a_thousand_tries_were_not_enough():
    # Training batch 7875 of seed 0 (the training script's mix) holds a left mover and an up mover whose layout
    # took more than 1000 rejection tries; the cap used to stop the run there.
    mix = {"direction": 0.3, "pair": 0.3, "falling": 0.15, "bouncing": 0.15, "static": 0.1}
    rng = np.random.default_rng(7875)
    prompts = C.random_video_prompts(32, rng, mix)
    assert "a blue circle moving left and a white circle moving up" in prompts
    clips = [C.clip_for_prompt(p, rng, 8) for p in prompts]
    for clip in clips:
        if len(clip.objects) == 2:
            assert C._apart(*clip.objects)
