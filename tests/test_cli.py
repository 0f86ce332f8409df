"""The CLI as a user meets it: inspect's table, subcommands not built yet, version."""

import pytest


def test_inspect_table(tiny_model, cli):
    result = cli(["inspect", tiny_model])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "llama, 4 layers, 39 tensors" in out
    for row in ("input", "blk.0", "blk.3", "output"):
        assert f"\n{row} " in out
    assert "attn_q" in out and "ffn_down" in out
    assert "tied output" not in out


def test_inspect_tied_model_says_so(tiny_tied_model, cli):
    result = cli(["inspect", tiny_tied_model])
    assert result.exit_code == 0
    assert "tied output: no output.weight" in result.stdout


def test_inspect_gemma(gemma_model, cli):
    result = cli(["inspect", gemma_model])
    assert result.exit_code == 0
    assert "gemma3, 18 layers, 236 tensors" in result.stdout
    assert "n_swa 512 on 15 layers" in result.stdout


@pytest.mark.parametrize("command", ["profile", "plan", "bench", "build", "doctor"])
def test_unbuilt_commands_say_so(cli, command):
    result = cli([command])
    assert result.exit_code == 1
    assert "is not built yet" in result.stderr


def test_version(cli):
    result = cli(["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("oatoplan ")
