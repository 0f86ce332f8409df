"""Where oatoplan's files live: data shipped inside the package (the patch series, the native sources it compiles,
measured profiles), and per-user directories (profiles measured on this machine, the build cache).

Package data is found next to this file, so an installed wheel and a source checkout behave the same.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

PACKAGE_DIR = Path(__file__).resolve().parent
# patches/series lists the patches applied to llama-cpp-python's vendored llama.cpp, in order
PATCHES_DIR = PACKAGE_DIR / "patches"
# our own sources: native/X is copied to vendor/llama.cpp/ggml/src/X before the series is applied
NATIVE_DIR = PACKAGE_DIR / "native"
# profiles measured on reference machines, searched after the user's own
SHIPPED_PROFILES_DIR = PACKAGE_DIR / "profiles"

PROFILE_DIR_ENV = "OATOPLAN_PROFILE_DIR"
CACHE_DIR_ENV = "OATOPLAN_CACHE"


def user_profile_dir() -> Path:
    """Where `oatoplan profile run` writes and where profiles are searched first: $OATOPLAN_PROFILE_DIR, else
    platformdirs' user data directory + /profiles (~/.local/share/oatoplan/profiles on Linux)."""
    return Path(os.environ.get(PROFILE_DIR_ENV) or Path(user_data_dir("oatoplan")) / "profiles")


def profile_dirs() -> tuple[Path, ...]:
    """Directories searched for a profile of this machine, in order: the user's, then the shipped ones."""
    return (user_profile_dir(), SHIPPED_PROFILES_DIR)


def build_cache_dir() -> Path:
    """The build cache (sdist, patched wheels): $OATOPLAN_CACHE, else ~/.cache/oatoplan."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "oatoplan")
