"""Frame-to-frame change of sampled clips, within a 2-frame token and across token boundaries.

    python experiments/tiny_video/token_jumps.py CHECKPOINT [--scale 4]

16 val prompts, seed 0, CFG at `--scale`, 20 Euler steps; the mean absolute pixel change between consecutive
frames (7 numbers for 8 frames), for the samples and for rendered clips of the same prompts. With a temporal
patch of 2, changes 0→1, 2→3, 4→5, 6→7 happen inside a token and 1→2, 3→4, 5→6 across tokens: a model whose
tokens do not agree in time jumps at the boundaries, where rendered clips move evenly.
"""
from __future__ import annotations

from s2g import cli  # noqa: F401 - first: sets the thread defaults before torch is imported (s2g/cli.py)

import argparse  # noqa: E402

import torch  # noqa: E402

from s2g.data.clips import render_prompts, video_prompt_set  # noqa: E402
from s2g.guidance import CFG  # noqa: E402
from s2g.tiny_video import load_tiny_video  # noqa: E402


def jumps(videos: torch.Tensor) -> list[float]:
    return [round(x, 4) for x in (videos[:, 1:] - videos[:, :-1]).abs().mean((0, 2, 3, 4)).tolist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--scale", type=float, default=4.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_tiny_video(args.checkpoint, weak_checkpoint=None)
    prompts = video_prompt_set("val", 16)
    print("samples ", jumps(pipe(prompts, CFG(scale=args.scale), seed=0, steps=20, batch_size=16)))
    print("rendered", jumps(render_prompts(prompts, 0).videos))


if __name__ == "__main__":
    main()
