"""Rewrite the markdown tables (and PNG charts) of recorded bench results, with each arm's decode bound under the
profile the runs used. Reads only committed JSON and the model's header.

    python -m benchmarks.report PROFILE.json MODEL.gguf RESULT.json...
"""

from __future__ import annotations

import sys

from oatoplan.bench import decode_bounds
from oatoplan.files import Output, companion, write_file
from oatoplan.inventory import read_inventory
from oatoplan.report import markdown, plot
from oatoplan.artifacts import read_json
from oatoplan.schema import BenchResult, Profile


def main(argv: list[str]) -> int:
    profile, model, *results = argv
    prof, inv = read_json(Profile, profile), read_inventory(model)
    for name in results:
        result = read_json(BenchResult, name)
        table = markdown(result, decode_bounds(inv, prof, result))
        write_file(Output(companion(name, ".md"), (name, profile, model)), table, "markdown")
        if len(result.arms) > 3:
            plot([result], Output(companion(name, ".png"), (name, profile, model)))
        print(f"== {name}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
