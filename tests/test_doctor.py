"""doctor's advice: a missing GPU backend points to oatoplan's own CUDA build (a stock llama-cpp-python would drop
the patches), with this machine's CUDA architectures when nvidia-smi names them; profiles found where plan finds
them."""

import json
from types import SimpleNamespace

import pytest

from oatoplan import doctor, profile
from oatoplan.build import check_cuda_arch
from oatoplan.paths import SHIPPED_PROFILES_DIR
from oatoplan.artifacts import read_json
from oatoplan.schema import Profile

# where each module looks the device list up (raising=True below: a rename fails the test, not silently patches
# nothing)
DEVICES_IN = (doctor,)
GPU_DEVICES_IN = (profile,)


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine as llama.cpp's registry shows it: the CPU only."""
    cpu = [SimpleNamespace(name="CPU", description="a CPU", type="CPU", free_bytes=2 << 30, total_bytes=4 << 30)]
    for module in DEVICES_IN:
        monkeypatch.setattr(module, "devices", lambda: cpu)
    for module in GPU_DEVICES_IN:
        monkeypatch.setattr(module, "gpu_devices", lambda: [])


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch):
    """A fake nvidia-smi on PATH that prints the given compute capabilities, one line per GPU."""
    def install(*caps: str) -> None:
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text("#!/bin/sh\n" + "".join(f"echo {c}\n" for c in caps))
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    return install


def test_cuda_arch_hint_from_nvidia_smi(nvidia_smi):
    nvidia_smi("9.0", "8.6", "9.0")
    assert doctor.cuda_arch_hint() == "86;90"
    nvidia_smi("No devices were found")
    assert doctor.cuda_arch_hint() is None


def test_no_nvidia_smi_no_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.cuda_arch_hint() is None


@pytest.mark.parametrize("arch", ["90", "86;90", None])
def test_gpu_backend_fix_is_oatoplans_cuda_build(arch):
    fix = doctor.gpu_backend_fix(arch)
    assert "oatoplan build --cuda --cuda-arch" in fix and "pip install" not in fix
    if arch:    # the value given is one `oatoplan build` accepts, quoted for the shell where it has a ';'
        assert check_cuda_arch(arch) and (f"'{arch}'" if ";" in arch else f"--cuda-arch {arch} ") in fix


def test_doctor_without_a_gpu_backend(cli, cpu_only, nvidia_smi):
    nvidia_smi("8.9")
    result = cli(["doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    gpu = checks["GPU backend"]
    assert not gpu["ok"] and "oatoplan build --cuda --cuda-arch 89" in gpu["fix"]
    assert all("pip install" not in c["fix"] for c in checks.values())
    # the shipped CPU profile, found from the package, not from ./profiles
    shipped = read_json(Profile, SHIPPED_PROFILES_DIR / "cpu-devbox-2core.json")
    assert checks["profile"]["ok"] and checks["profile"]["detail"] == shipped.profile_id


def test_doctor_without_a_profile_says_where_profile_writes(cpu_only, monkeypatch, user_profile_dir):
    unknown = [SimpleNamespace(name="CUDA0", description="Some Unprofiled GPU", type="GPU")]
    for module in GPU_DEVICES_IN:
        monkeypatch.setattr(module, "gpu_devices", lambda: unknown)
    checks = {c.name: c for c in doctor.diagnose().checks}
    assert not checks["profile"].ok and "Some Unprofiled GPU" in checks["profile"].detail
    assert f"oatoplan profile run --model MODEL.gguf (writes to {user_profile_dir})" in checks["profile"].fix


def test_doctor_says_whether_weight_streaming_is_there_and_on(monkeypatch):
    monkeypatch.delenv("OATO_STREAM", raising=False)
    check = {c.name: c for c in doctor.diagnose().checks}["weight streaming"]
    assert check.ok and "on for plans" in check.detail           # this suite runs on oatoplan's build
    monkeypatch.setenv("OATO_STREAM", "0")
    assert "off: OATO_STREAM=0" in {c.name: c for c in doctor.diagnose().checks}["weight streaming"].detail
