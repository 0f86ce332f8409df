"""The one writer of every file: atomic, never over an input, a special file, a link or a file of another kind, and
no command that fails changes a file it was given."""

import errno
import hashlib
import json
import os
import shutil
import stat
import threading
import time

import pytest

from oatoplan import files
from oatoplan.errors import OutputError
from oatoplan.files import Output, check_output, companion, file_kind, write_file
from oatoplan.inventory import read_inventory
from oatoplan.plan import cpu_only_plan
from oatoplan.artifacts import read_json, write_json
from oatoplan.schema import Plan
from profiles import synthetic_profile


@pytest.fixture
def work(tmp_path, tiny_model):
    """A model, a GPU profile and an existing plan in one directory (copies: the tests try to destroy them)."""
    model = shutil.copy(tiny_model, tmp_path / "tiny.gguf")
    profile = write_json(synthetic_profile(), tmp_path / "profile.json")
    plan = write_json(cpu_only_plan(read_inventory(model)), tmp_path / "plan.json")
    return tmp_path, model, profile, plan


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oatoplan: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# --- the defects of issue 16, item 1 -----------------------------------------------------------------------------

def test_plan_output_over_its_model_is_refused(work, cli):
    tmp, model, profile, _ = work
    before = _digest(model)
    result = cli(["plan", model, "--vram", "1GiB", "--profile", profile, "-o", model])
    _one_line_error(result, "is a file this command also reads or writes")
    assert _digest(model) == before
    # by another name for the same file (a hard link) too, and --force does not change that
    os.link(model, tmp / "other-name.gguf")
    result = cli(["plan", model, "--vram", "1GiB", "--profile", profile, "-o", tmp / "other-name.gguf", "--force"])
    _one_line_error(result, f"the same file as {model}")
    assert _digest(model) == before


def test_write_lp_over_the_model_is_refused(work, cli):
    tmp, model, profile, _ = work
    before = _digest(model)
    result = cli(["plan", model, "--vram", "1GiB", "--profile", profile, "-o", tmp / "p.json", "--write-lp", model])
    _one_line_error(result, "choose another --write-lp path")
    assert _digest(model) == before and not (tmp / "p.json").exists()


def test_write_lp_and_output_cannot_be_one_file(work, cli):
    tmp, model, profile, _ = work
    result = cli(["plan", model, "--vram", "1GiB", "--profile", profile, "-o", tmp / "x", "--write-lp", tmp / "x"])
    _one_line_error(result, "also reads or writes")
    assert not (tmp / "x").exists()


def test_output_over_a_fifo_is_refused_without_waiting(work, cli):
    tmp, model, profile, _ = work
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    for force in ([], ["--force"]):
        result = cli(["plan", model, "--vram", "1GiB", "--profile", profile, "-o", fifo, *force])
        _one_line_error(result, "is a FIFO")
    assert time.monotonic() - started < 30 and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("what", ["symlink", "profile"])
def test_output_over_a_link_or_another_kind_needs_force(work, cli, what):
    tmp, model, profile, plan = work
    if what == "symlink":
        out, victim, expected = tmp / "link.json", plan, "is a symbolic link (to plan.json)"
        out.symlink_to(plan.name)
    else:
        out = victim = write_json(synthetic_profile(), tmp / "other-profile.json")
        expected = "is a profile, not a plan; choose another -o path or add --force"
    before = _digest(victim)
    args = ["plan", model, "--vram", "1GiB", "--profile", profile, "-o", out]
    _one_line_error(cli(args), expected)
    assert _digest(victim) == before
    result = cli(args + ["--force"])
    assert result.exit_code == 0, result.stderr
    assert read_json(Plan, victim).budget_bytes == 1 << 30
    assert out.is_symlink() == (what == "symlink")     # a link stays a link: the file it points to was replaced


def test_a_preplaced_temp_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "plan.json"
    (tmp_path / "plan.json.tmp").symlink_to(victim)
    write_json({"a": 1}, out)
    assert victim.read_text() == "precious\n" and json.loads(out.read_text()) == {"a": 1}
    assert (tmp_path / "plan.json.tmp").is_symlink()


def test_concurrent_writers_of_one_path(tmp_path):
    out = tmp_path / "plan.json"
    errors, written = [], set()

    def writer(i: int) -> None:
        for j in range(20):
            doc = {"writer": i, "n": j, "pad": "x" * (1000 * (i + 1))}
            written.add(json.dumps(doc, sort_keys=True))
            try:
                write_file(out, json.dumps(doc), "json")
            except Exception as exc:    # any failure at all is what this test looks for
                errors.append(exc)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.dumps(json.loads(out.read_text()), sort_keys=True) in written
    assert os.listdir(tmp_path) == ["plan.json"]          # no temp file left behind


@pytest.mark.parametrize("fail", ["replace", "write"])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, fail):
    out = tmp_path / "plan.json"
    out.write_text('{"old": true}\n')

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "replace" if fail == "replace" else "fsync", no_space)
    with pytest.raises(OutputError, match="No space left on device.*free some space"):
        write_file(out, json.dumps({"new": True}), "json")
    assert out.read_text() == '{"old": true}\n' and os.listdir(tmp_path) == ["plan.json"]


def test_an_interrupt_mid_write_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "plan.json"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_file(out, "{}", "json")
    assert os.listdir(tmp_path) == []


def test_bench_companions_are_never_its_json():
    for name in ("x.md", "x.png", "x", "x.json", "dir/x.md.json", "x.tar.gz"):
        assert len({name, str(companion(name, ".md")), str(companion(name, ".png"))}) == 3, name
    assert str(companion("out/b.json", ".md")) == "out/b.md" and str(companion("b.md", ".md")) == "b.md.md"


def test_bench_refuses_before_measuring(work, cli):
    tmp, model, profile, _ = work
    notes = tmp / "b.md"
    notes.write_text("# my notes\n")
    result = cli(["bench", model, "--vram", "1GiB", "--profile", profile, "-o", tmp / "b.json", "--reps", "1"])
    _one_line_error(result, "b.md: is a file oatoplan did not write, not a markdown table")
    assert notes.read_text() == "# my notes\n" and not (tmp / "b.json").exists()


# --- what the writer accepts and how it leaves the file ----------------------------------------------------------

def test_same_kind_and_empty_files_are_replaced(work):
    tmp, model, _, plan = work
    other = cpu_only_plan(read_inventory(model), n_ctx=256)
    assert read_json(Plan, write_json(other, plan)).n_ctx == 256
    empty = tmp / "empty.json"
    empty.write_bytes(b"")
    assert read_json(Plan, write_json(other, empty)).n_ctx == 256


def test_new_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_file(tmp_path / "a.json", "{}", "json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(path, 0o600)
    write_file(path, "{}", "json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600      # a replaced file keeps its permissions


def test_parent_directories_and_unwritable_places(tmp_path):
    assert write_file(tmp_path / "a" / "b" / "p.json", "{}", "json").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"cannot write \(Not a directory\)"):
        write_file(tmp_path / "file" / "p.json", "{}", "json")
    with pytest.raises(OutputError, match="is a directory"):
        write_file(tmp_path / "a", "{}", "json")


def test_file_kinds(tmp_path, tiny_model, work):
    _, _, profile, plan = work
    cases = {"x.png": files.PNG_MAGIC + b"rest", "x.lp": b"\\* placement *\\\nMinimize\n", "x.md": b"| arm | flags |\n",
             "x.txt": b"hello\n", "x.json": b'{"a": 1}', "deep.json": b"[" * 100_000, "bad.json": b"{\xff\xfe}",
             "e": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert [file_kind(tmp_path / n) for n in cases] == ["png", "lp", "markdown", "other", "json", "other", "other",
                                                        "empty"]
    assert (file_kind(tiny_model), file_kind(profile), file_kind(plan)) == ("gguf", "profile", "plan")


def test_check_output_names_the_option(tmp_path, tiny_model):
    with pytest.raises(OutputError, match=r"is a GGUF model, not an LP file; choose another --write-lp path or add "
                                          r"--force"):
        check_output(Output(tiny_model, option="--write-lp"), "lp")


# --- no failing command changes what it was given ----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["plan", "{model}", "--vram", "lots", "--profile", "{profile}", "-o", "{plan}"],
    ["plan", "{model}", "--vram", "1KiB", "--profile", "{profile}", "-o", "{plan}"],
    ["plan", "{model}", "--vram", "1GiB", "--profile", "{profile}", "-o", "{profile}"],
    ["plan", "{model}", "--vram", "1GiB", "--profile", "{profile}", "-o", "{model}", "--force"],
    ["plan", "{model}", "--vram", "1GiB", "--profile", "{plan}", "-o", "{plan}"],
    ["plan", "{plan}", "--vram", "1GiB", "--profile", "{profile}", "-o", "{plan}"],
    ["bench", "{model}", "--vram", "1GiB", "--profile", "{profile}", "--objective", "fast", "-o", "{plan}"],
    ["bench", "{model}", "--vram", "1GiB", "--profile", "{profile}", "-o", "{model}"],
    ["run", "{model}", "--plan", "{profile}", "-p", "Hi"],
    ["inspect", "{plan}"],
    ["profile", "show", "{model}"],
    ["profile", "run", "--cpu", "-o", "{model}"],
    ["profile", "run", "--cpu", "--model", "{model}", "-o", "{model}", "--force"],
])
def test_failing_commands_leave_their_files_alone(work, cli, args):
    tmp, model, profile, plan = work
    names = {"model": model, "profile": profile, "plan": plan}
    before = {name: _digest(path) for name, path in names.items()}
    result = cli([a.format(**names) for a in args])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {name: _digest(path) for name, path in names.items()} == before
    assert sorted(os.listdir(tmp)) == ["plan.json", "profile.json", "tiny.gguf"]
