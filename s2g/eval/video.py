"""The video evaluator: reads each frame with the scene evaluator, tracks the prompt's objects across frames, and
scores a clip against its prompt's motion. Exact definitions: s2g/eval/README_video.md.

Per frame, the shipped scene evaluator (`evaluator.py`, trained on 32x32 scenes of the same shapes, colours and
sizes) gives the objects' colours, shapes and centroids; frames of another size are resampled to 32x32 first.
Each object the prompt names is tracked by its colour and shape (several candidates: the nearest to its last
position; none: the nearest object of its colour, whatever its shape, so one misread shape does not break the
track). From the track: direction, displacement against the law's range, a least-squares fit of the law, and
stability of identity, colour and shape. Positions are in reference px and times in reference frames
(`s2g.data.clips`: 1/32 of the side, 1/7 of the clip), so thresholds mean the same at any frame count or size.

The Fréchet distance's clip features (an FVD analog) are the scene evaluator's own: its 128-d image features
averaged over frames (appearance), and per frame and palette colour the soft mass and first moments of that
colour's probability map (where each colour is, frame by frame: motion), 18 numbers per frame.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.clips import (DIRECTIONS, LAWS, REF_SIZE, T_END, displacement_range, frame_times, parse_video_prompt,
                          vertical_extent, video_family)
from .evaluator import COLOR_NAMES, IMAGE_SIZE, SceneEvaluator
from .stats import frechet_distance

# Thresholds (reference px and frames); README_video.md gives the reasons.
MISS_FRACTION = 1 / 8  # "(almost) every frame": at most this share of frames may miss an object (1 of 8)
MIN_DIRECTION_PX = 1.0  # below this net displacement a direction is not read
DIRECTION_COSINE = 0.5  # the displacement lies within 60° of the named direction (GenEval's relation rule)
TOO_STATIC, TOO_FAST = 0.5, 1.25  # dynamic degree: right within [0.5 lo, 1.25 hi] of the law's range
STILL_PX = 1.5  # "standing still" allows this much wander
LAW_RESIDUAL_PX = 0.75  # RMS distance of the track from the fitted law
MIN_ACCELERATION = 0.2  # px/frame², falling (the sampler's gravity is ≥ 0.45; fitted within 0.09 of the truth)
MIN_BOUNCE_G = 0.1  # px/frame², bouncing: its gravity trades off against the rebound in 8 frames (fitted 0.18-0.82
                    # for a true 0.4-0.6), so only a V without gravity is rejected
MAX_RESTITUTION = 1.05  # a bounce may not gain energy (the sampler's is 0.8; a clip reversed in time has 1.25)
FLOOR_PX = 2.0  # a bounce's lowest point lies within this of the bottom edge
JUMP_PX = 8.0  # identity: no track moves more than this per frame (the sampler's fastest is 4.7 px/frame)
FLICKER_MAX = 0.02  # mean absolute change of background pixels between frames, intensities in [0, 1]
MOTION_SCALE = 10.0  # the motion block's weight in the clip features, so both blocks have a similar spread

ATTRIBUTES: tuple[str, ...] = ("found", "count_stable", "color", "object_class", "multiple_objects", "direction",
                               "dynamic_degree", "motion_smoothness", "subject_consistency", "temporal_flickering",
                               "all")
_BOUNCE_TIMES = np.arange(0.5, 6.5 + 1e-9, 0.05)
_BOUNCE_E = np.arange(0.3, 1.5 + 1e-9, 0.025)


@dataclass
class Track:
    """One named object across the frames: `exact` where found with its colour and shape, `seen` where found
    with its colour (exact included); position (reference px, NaN where unseen), shape read and box height."""
    color: str
    shape: str
    motion: str
    exact: np.ndarray  # [F] bool
    seen: np.ndarray  # [F] bool
    pos: np.ndarray  # [F, 2]
    shapes: list  # [F] str or None
    height: np.ndarray  # [F] px


# ------------------------------------------------------------------------------------------------ law fits


def _rms(residual: np.ndarray) -> float:
    """RMS length of 2-D residuals [K, 2]."""
    return float(np.sqrt((residual ** 2).sum(1).mean()))


def _poly_fit(t: np.ndarray, v: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients of v(t) on [1, t, t²/2][:degree + 1] and the residual."""
    basis = np.stack([np.ones_like(t), t, t * t / 2][:degree + 1], 1)
    coef = np.linalg.lstsq(basis, v, rcond=None)[0]
    return coef, v - basis @ coef


def _fit_bounce(t: np.ndarray, y: np.ndarray) -> dict:
    """y(t) = y_b + v_b s + g s²/2 before the impact (s = t - t_b), y_b - e v_b s + g s²/2 after: linear in
    (y_b, v_b, g) for fixed (t_b, e), so a grid over t_b (0.05 frames) and e (0.025) with least squares at each."""
    tb, e = np.meshgrid(_BOUNCE_TIMES, _BOUNCE_E, indexing="ij")
    tb, e = tb.ravel()[:, None], e.ravel()[:, None]
    s = t[None] - tb  # [G, K]
    basis = np.stack([np.ones_like(s), np.where(s > 0, -e * s, s), s * s / 2], -1)  # [G, K, 3]
    gram = basis.transpose(0, 2, 1) @ basis + 1e-9 * np.eye(3)
    coef = np.linalg.solve(gram, (basis.transpose(0, 2, 1) @ y)[..., None])[..., 0]  # [G, 3]
    sse = ((basis @ coef[..., None])[..., 0] - y[None]) ** 2
    best = int(sse.sum(1).argmin())
    yb, vb, g = coef[best]
    return {"t_bounce": float(tb[best, 0]), "restitution": float(e[best, 0]), "y_floor": float(yb),
            "impact_speed": float(vb), "g": float(g), "residual_y": y - (basis[best] @ coef[best])}


def fit_law(motion: str, t: np.ndarray, pos: np.ndarray, height: float | None = None, shape: str = "circle") -> dict:
    """Fit the motion's law to a track (times [K] in reference frames, positions [K, 2] in reference px).

    Returns {"law", "residual_px" (RMS over the frames, both coordinates), "ok", and the fitted parameters}:
    - rest: x, y constant;
    - constant velocity (left/right/up/down): x, y linear in t; `velocity` px/frame;
    - constant acceleration (falling): x constant, y quadratic; ok also needs acceleration ≥ MIN_ACCELERATION;
    - reflection (bouncing): x constant, y the bounce above; ok also needs g ≥ MIN_BOUNCE_G, an impact
      speed ≥ 0.5 px/frame, restitution ≤ MAX_RESTITUTION, the impact inside [1, 6] and, with the object's box
      height, its lowest point at impact within FLOOR_PX of the bottom edge."""
    law = LAWS[motion]
    out = {"law": law}
    if law == "rest":
        res = pos - pos.mean(0)
    elif law == "constant velocity":
        coef, res = _poly_fit(t, pos, 1)
        out["velocity"] = coef[1].tolist()
    elif law == "constant acceleration":
        coef, ry = _poly_fit(t, pos[:, 1], 2)
        res = np.stack([pos[:, 0] - pos[:, 0].mean(), ry], 1)
        out["acceleration"] = float(coef[2])
    else:
        fit = _fit_bounce(t, pos[:, 1])
        res = np.stack([pos[:, 0] - pos[:, 0].mean(), fit.pop("residual_y")], 1)
        out.update(fit)
    out["residual_px"] = _rms(res)
    ok = out["residual_px"] <= LAW_RESIDUAL_PX
    if law == "constant acceleration":
        ok = ok and out["acceleration"] >= MIN_ACCELERATION
    if law == "reflection":
        up, down = vertical_extent(shape, 1.0)
        below = (height if height is not None else 0.0) * down / (up + down)  # centre to lowest point
        out["floor_gap_px"] = float(REF_SIZE - (out["y_floor"] + below))
        ok = (ok and out["g"] >= MIN_BOUNCE_G and out["impact_speed"] >= 0.5
              and out["restitution"] <= MAX_RESTITUTION and 1.0 <= out["t_bounce"] <= 6.0
              and out["floor_gap_px"] <= FLOOR_PX)
    out["ok"] = bool(ok)
    return out


# ------------------------------------------------------------------------------------------ one object, one clip


def _direction(motion: str, t: np.ndarray, pos: np.ndarray) -> bool | None:
    if motion == "still":
        return None
    if motion == "bouncing":  # down, then up: the lowest point is inside the clip with a clear drop and rise
        y = pos[:, 1]
        k = int(y.argmax())
        return bool(0 < k < len(y) - 1 and y[k] - y[0] >= MIN_DIRECTION_PX and y[k] - y[-1] >= MIN_DIRECTION_PX)
    u = np.array(DIRECTIONS["down" if motion == "falling" else motion], dtype=np.float64)
    d = _poly_fit(t, pos, 1)[0][1] * T_END  # the straight-line fit's displacement over the clip
    norm = float(np.hypot(*d))
    return bool(norm >= MIN_DIRECTION_PX and d @ u > DIRECTION_COSINE * norm)


def _dynamic(motion: str, pos: np.ndarray) -> tuple[str, float]:
    """("too_static" | "right" | "too_fast", the largest distance from the first position in px)."""
    d = float(np.hypot(*(pos - pos[0]).T).max())
    if motion == "still":
        return ("right" if d <= STILL_PX else "too_fast"), d
    lo, hi = displacement_range(motion)
    return ("too_static" if d < TOO_STATIC * lo else "too_fast" if d > TOO_FAST * hi else "right"), d


def analyse_track(track: Track, t: np.ndarray) -> dict:
    """Direction, dynamic degree, law fit and stability of one object; None/failing where it is seen in fewer
    than (1 - MISS_FRACTION) of the frames (its motion cannot be read)."""
    n = len(t)
    need = n - int(np.floor(n * MISS_FRACTION))
    m = track.seen
    out = {"color": track.color, "shape": track.shape, "motion": track.motion,
           "found_frames": int(track.exact.sum()), "seen_frames": int(m.sum())}
    out["found"] = bool(track.exact.sum() >= need)
    steps = np.hypot(*np.diff(track.pos, axis=0).T) / np.diff(t)  # px per reference frame; NaN around gaps
    read = [s for s, k in zip(track.shapes, m) if k]
    out["subject_consistency"] = bool(m.all() and len(set(read)) == 1 and (steps <= JUMP_PX).all())
    if m.sum() < max(need, 3):
        out.update(direction=False if track.motion != "still" else None, dynamic="lost", displacement_px=None,
                   law={"law": LAWS[track.motion], "ok": False, "residual_px": None})
        return out
    tt, pos = t[m], track.pos[m]
    out["direction"] = _direction(track.motion, tt, pos)
    out["dynamic"], out["displacement_px"] = _dynamic(track.motion, pos)
    height = float(np.median(track.height[m]))
    out["law"] = fit_law(track.motion, tt, pos, height, track.shape)
    return out


def _track(spec, frames) -> list[Track]:
    """Follow each named (colour, shape, motion) through per-frame detections (lists of `Detection`)."""
    n = len(frames)
    tracks = [Track(c, s, mo, np.zeros(n, bool), np.zeros(n, bool), np.full((n, 2), np.nan), [None] * n,
                    np.full(n, np.nan)) for c, s, mo in spec]
    for k, dets in enumerate(frames):
        claimed = set()

        def take(tr: Track, candidates: list[int]) -> int | None:
            if not candidates:
                return None
            seen = np.flatnonzero(tr.seen[:k])
            if len(seen):  # nearest to the last position
                last = tr.pos[seen[-1]] / REF_SIZE
                return min(candidates, key=lambda j: (dets[j].x - last[0]) ** 2 + (dets[j].y - last[1]) ** 2)
            return max(candidates, key=lambda j: dets[j].area)

        pending = []
        for tr in tracks:  # colour and shape first: the named objects are distinct, so these never collide
            j = take(tr, [j for j, d in enumerate(dets) if (d.color, d.shape) == (tr.color, tr.shape)])
            if j is None:
                pending.append(tr)
            else:
                claimed.add(j)
                tr.exact[k] = True
                _place(tr, k, dets[j])
        for tr in pending:  # then its colour alone, among what is left
            j = take(tr, [j for j, d in enumerate(dets) if d.color == tr.color and j not in claimed])
            if j is not None:
                claimed.add(j)
                _place(tr, k, dets[j])
    return tracks


def _place(tr: Track, k: int, det) -> None:
    """Record detection `det` as the track's position in frame k."""
    tr.seen[k] = True
    tr.pos[k] = (det.x * REF_SIZE, det.y * REF_SIZE)
    tr.shapes[k] = det.shape
    tr.height[k] = det.h * REF_SIZE


def score_tracks(prompt: str, frames, tracks: list[Track], flicker: float, details: bool = False) -> dict:
    """One clip's row: every attribute of ATTRIBUTES (1/0, or None where it does not apply), the per-frame
    counts, each object's displacement and law residual, the flicker. `details` adds each object's analysis
    and track."""
    spec = parse_video_prompt(prompt)
    n = len(frames)
    t = frame_times(n)
    need = n - int(np.floor(n * MISS_FRACTION))
    per = [analyse_track(tr, t) for tr in tracks]
    counts = [len(d) for d in frames]
    want_c, want_s = Counter(c for c, _, _ in spec), Counter(s for _, s, _ in spec)
    color_frames = sum(Counter(d.color for d in dets) == want_c for dets in frames)
    shape_frames = sum(Counter(d.shape for d in dets) == want_s for dets in frames)
    dirs = [p["direction"] for p in per]
    dyn = [p["dynamic"] for p in per]
    row = {
        "prompt": prompt,
        "family": video_family(prompt),
        "found": int(all(p["found"] for p in per)),
        "count_stable": int(all(c == len(spec) for c in counts)),
        "color": int(color_frames >= need),
        "object_class": int(shape_frames >= need),
        "multiple_objects": int(all(p["found"] for p in per)) if len(spec) > 1 else None,
        "direction": None if all(d is None for d in dirs) else int(all(bool(d) for d in dirs)),
        "dynamic_degree": int(all(d == "right" for d in dyn)),
        "motion_smoothness": int(all(p["law"]["ok"] for p in per)),
        "subject_consistency": int(all(p["subject_consistency"] for p in per)),
        "temporal_flickering": int(flicker <= FLICKER_MAX),
        "dynamic": next((d for d in dyn if d != "right"), "right"),
        "counts": counts,
        "displacement_px": [None if p["displacement_px"] is None else round(p["displacement_px"], 3) for p in per],
        "law_residual_px": [None if p["law"]["residual_px"] is None else round(p["law"]["residual_px"], 3)
                            for p in per],
        "flicker": round(float(flicker), 5),
    }
    row["all"] = int(row["found"] and row["count_stable"] and row["direction"] in (None, 1)
                     and row["dynamic_degree"] and row["motion_smoothness"])
    if details:  # each object's analysis and its track (reference px, None where unseen)
        row["objects"] = [{**a, "track": [None if np.isnan(q).any() else q.tolist() for q in tr.pos]}
                          for a, tr in zip(per, tracks)]
    return row


# ---------------------------------------------------------------------------------------------- the evaluator


class VideoEvaluator:
    """`score(videos, prompts)` -> one row per clip; `features(videos)` -> [N, 128 + 18 F] for the Fréchet
    distance; `read` does both in one pass. Videos are [N, F, 3, H, W] in [0, 1], any H = W (resampled to 32)."""

    def __init__(self, scene: SceneEvaluator | None = None, clips_per_batch: int = 64):
        self.scene = scene if scene is not None else SceneEvaluator.load()
        self.clips_per_batch = int(clips_per_batch)

    @classmethod
    def load(cls, **kwargs) -> "VideoEvaluator":
        return cls(SceneEvaluator.load(), **kwargs)

    def feature_dim(self, num_frames: int) -> int:
        return self.scene.feature_dim + 3 * len(COLOR_NAMES) * int(num_frames)

    @staticmethod
    def _check(videos: torch.Tensor) -> None:
        if videos.ndim != 5 or videos.shape[2] != 3 or videos.shape[3] != videos.shape[4]:
            raise ValueError(f"the video evaluator reads [N, F, 3, H, W] clips with H = W, got "
                             f"{tuple(videos.shape)}")
        frame_times(videos.shape[1])

    def _frames(self, videos: torch.Tensor) -> torch.Tensor:
        self._check(videos)
        x = videos.float().clamp(0, 1).flatten(0, 1)
        if x.shape[-1] != IMAGE_SIZE:  # the scene evaluator was trained at 32x32
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True).clamp(0, 1)
        return x

    def read(self, videos: torch.Tensor, prompts: list[str], details: bool = False) -> tuple[list[dict], np.ndarray]:
        """(rows, features [N, D]) for clips and their prompts."""
        self._check(videos)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} clips but {len(prompts)} prompts")
        specs = [parse_video_prompt(p) for p in prompts]  # fail on a bad prompt before any work
        rows, feats = [], []
        for i in range(0, len(videos), self.clips_per_batch):
            chunk = videos[i:i + self.clips_per_batch]
            r, f = self._read(chunk, prompts[i:i + len(chunk)], specs[i:i + len(chunk)], details)
            rows += r
            feats.append(f)
        return rows, (np.concatenate(feats) if feats else np.zeros((0, self.feature_dim(videos.shape[1]))))

    def score(self, videos: torch.Tensor, prompts: list[str], details: bool = False) -> list[dict]:
        return self.read(videos, prompts, details)[0]

    def features(self, videos: torch.Tensor) -> np.ndarray:
        self._check(videos)
        feats = [np.zeros((0, self.feature_dim(videos.shape[1])))]
        for i in range(0, len(videos), self.clips_per_batch):
            chunk = videos[i:i + self.clips_per_batch]
            col, _, feat = self.scene.predict(self._frames(chunk))
            feats.append(self._clip_features(col, feat, len(chunk)))
        return np.concatenate(feats)

    def _clip_features(self, col: torch.Tensor, feat: torch.Tensor, n: int) -> np.ndarray:
        """Appearance: the image features averaged over frames. Motion: per frame and palette colour, the mean of
        that colour's probability map and its first moments about the frame centre (x and y in fractions)."""
        appearance = feat.view(n, -1, feat.shape[-1]).mean(1)
        p = col[:, 1:]  # [N F, 6, H, W]
        grid = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE - 0.5
        mass = p.mean((2, 3))
        mx, my = (p * grid.view(1, 1, 1, -1)).mean((2, 3)), (p * grid.view(1, 1, -1, 1)).mean((2, 3))
        motion = torch.stack([mass, mx, my], -1).reshape(n, -1) * MOTION_SCALE
        return torch.cat([appearance, motion], 1).double().numpy()

    def _read(self, videos, prompts, specs, details):
        n, n_f = videos.shape[:2]
        x = self._frames(videos)
        col, shp, feat = self.scene.predict(x)
        frames = [self.scene._objects(c, s) for c, s in zip(col.numpy(), shp.numpy())]
        flicker = _flicker(x.view(n, n_f, 3, IMAGE_SIZE, IMAGE_SIZE), col[:, 0].view(n, n_f, IMAGE_SIZE, IMAGE_SIZE))
        rows = []
        for i, (prompt, spec) in enumerate(zip(prompts, specs)):
            per_frame = frames[i * n_f:(i + 1) * n_f]
            rows.append(score_tracks(prompt, per_frame, _track(spec, per_frame), float(flicker[i]), details))
        return rows, self._clip_features(col, feat, n)


def _flicker(frames: torch.Tensor, background: torch.Tensor) -> np.ndarray:
    """Per clip: the mean absolute change between consecutive frames (mean over channels) of the pixels that are
    background in both frames, objects grown by 1 px so that their moving edges do not count. Where fewer than a
    quarter of the pixels qualify (a frame full of "objects", e.g. noise), all pixels count. [N]."""
    objects = F.max_pool2d((background < 0.5).float(), 3, 1, 1) > 0  # [N, F, H, W]
    still = (~objects[:, 1:] & ~objects[:, :-1]).float()
    change = (frames[:, 1:] - frames[:, :-1]).abs().mean(2)
    few = still.mean((1, 2, 3)) < 0.25
    still[few] = 1.0
    return ((change * still).sum((1, 2, 3)) / still.sum((1, 2, 3))).numpy()


_DEFAULT: VideoEvaluator | None = None


def _default() -> VideoEvaluator:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VideoEvaluator.load()
    return _DEFAULT


def score_clips(videos: torch.Tensor, prompts: list[str], evaluator: VideoEvaluator | None = None,
                details: bool = False) -> list[dict]:
    """Rows (one per clip) scoring clips [N, F, 3, H, W] against their video prompts; see ATTRIBUTES."""
    return (evaluator or _default()).score(videos, prompts, details)


def clip_features(videos: torch.Tensor, evaluator: VideoEvaluator | None = None) -> np.ndarray:
    """[N, 128 + 18 F] spatio-temporal features for the Fréchet video distance."""
    return (evaluator or _default()).features(videos)


def frechet_video_distance(real, fake, appearance_dim: int = 128) -> dict:
    """The Fréchet distance between Gaussians fitted to two sets of clip features, in all and per block
    (appearance: the first `appearance_dim` columns; motion: the rest)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return {"fvd": frechet_distance(real, fake),
            "appearance": frechet_distance(real[:, :appearance_dim], fake[:, :appearance_dim]),
            "motion": frechet_distance(real[:, appearance_dim:], fake[:, appearance_dim:])}
