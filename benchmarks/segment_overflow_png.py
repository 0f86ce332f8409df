"""Prefill of a chat past the segment KV cache's first segment, as a PNG: one panel per depth, one bar group per
result file of `benchmarks/segment_overflow.py` (a build), one bar per arm (the mean of its repetitions, each
repetition a dot).

    python -m benchmarks.segment_overflow_png F1.json F2.json ... --out F.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(f).read_text()) for f in args.results]
    builds = [re.search(r"patches ([0-9a-f]{8})", r["llama_cpp_build"])[1] for r in runs]
    arms = list(dict.fromkeys(a["name"] for r in runs for a in r["arms"]))
    depths = sorted({d["depth"] for r in runs for a in r["arms"] for d in a["depths"]} - {runs[0]["workload"]["plan_depth"]})
    fig, axes = plt.subplots(1, len(depths), figsize=(6 * len(depths), 4.5), sharey=True, squeeze=False)
    width, labelled = 0.8 / len(arms), set()
    for ax, depth in zip(axes[0], depths):
        for j, arm in enumerate(arms):
            for i, run in enumerate(runs):
                rows = [d for a in run["arms"] if a["name"] == arm for d in a["depths"] if d["depth"] == depth]
                if not rows:
                    continue
                samples = rows[0]["prefill_tokens_per_s"]
                x = i + (j - (len(arms) - 1) / 2) * width
                ax.bar(x, sum(samples) / len(samples), width, color=f"C{j}", label=None if arm in labelled else arm)
                labelled.add(arm)
                ax.plot([x] * len(samples), samples, "k.", markersize=4)
        ax.set_xticks(range(len(runs)), builds)
        ax.set_title(f"chat filled to depth {depth} + {runs[0]['workload']['prompt']}")
        ax.set_xlabel("oatoplan series")
    axes[0][0].set_ylabel("prefill tokens/s (whole chat)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{Path(runs[0]['command'].split()[1]).name}: prefill with the segment KV cache past its first "
                 f"segment ({runs[0]['workload']['plan_depth']}-token plan), {runs[0]['budget_bytes'] / 2**30:.1f} "
                 f"GiB", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
