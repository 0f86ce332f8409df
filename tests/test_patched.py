"""The running llama.cpp is the patched build that `oatoplan build` makes from oatoplan/patches/series (README's set-up
commands install it)."""

from oatoplan.build import series, series_hash
from oatoplan.machine import llama_cpp_build, loaded_series


def test_running_library_carries_our_series():
    carried = loaded_series()
    assert carried is not None, "stock llama-cpp-python: run `oatoplan build --cpu` (scripts/env.sh does)"
    digest, names = carried.split(":", 1)
    assert digest == series_hash(series())
    assert names.split(",") == [p.stem for p in series()]
    assert carried in llama_cpp_build()
