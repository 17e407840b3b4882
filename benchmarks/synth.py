"""Rendering speed of synthetic slides: the ``camelyon`` difficulty against ``easy``.

    .venv/bin/python benchmarks/synth.py [--repeats 5] [--size 8192]

Renders every 256 px level-0 tile of one tumor slide of each kind (easy;
camelyon at Radboud and at Utrecht, whose optics blur costs a Gaussian per
tile), in this process on one core, and prints ms per tile (all tiles, glass
included) and the ratio to ``easy`` measured in the same run. Medians over
``--repeats`` slides (seeds).
"""

from __future__ import annotations

import argparse
import statistics
import time

from pipeline.config import HardCohortConfig
from pipeline.synth.centres import CENTRES
from pipeline.synth.painting import make_camelyon_scene
from pipeline.synth.scene import make_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=8192, help="level-0 slide side, px")
    args = parser.parse_args()
    kinds = {
        "easy": lambda seed: make_scene(args.size, args.size, 0.243, seed, tumor=True),
        **{
            f"camelyon {name}": (
                lambda seed, c=centre: make_camelyon_scene(
                    args.size, args.size, seed, tumor=True, centre=c, params=HardCohortConfig()
                )
            )
            for name, centre in CENTRES.items()
        },
    }
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    for seed in range(args.repeats):
        for kind, make in kinds.items():  # interleaved: the machine's noise hits all alike
            scene = make(seed)
            tiles = 0
            started = time.perf_counter()
            for y in range(0, args.size, 256):
                for x in range(0, args.size, 256):
                    scene.render(x, y, 256, 256)
                    tiles += 1
            results[kind].append((time.perf_counter() - started) / tiles * 1000)
    easy = statistics.median(results["easy"])
    print(f"{'slide':<18} {'ms/tile':>8} {'range':>13} {'vs easy':>8}")
    for kind, values in results.items():
        median = statistics.median(values)
        print(
            f"{kind:<18} {median:8.1f} {min(values):6.1f}-{max(values):<6.1f} {median / easy:8.2f}"
        )


if __name__ == "__main__":
    main()
