"""oatoplan serve: a real server process (`python -m oatoplan serve`) on 127.0.0.1 serving the real Gemma 3 270M with
a plan, driven by the official openai client; bad plans refused before any port opens."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from llama_cpp.server import app as server_app
from llama_cpp.server.model import LlamaProxy

from oatoplan.errors import PlanMismatchError
from oatoplan.inventory import read_inventory
from oatoplan.load import gpu_devices
from oatoplan.plan import cpu_only_plan, make_plan
from oatoplan.serve import make_app, refusal, serving_plan
from oatoplan.artifacts import write_json

REPO = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE_S = 90     # python + llama.cpp + fastapi imports and the model load, on 2 busy cores
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _oatoplan(args: list, out_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`python -m oatoplan ARGS` from the repository root (so that this checkout is imported), output in files."""
    out, err = out_dir / "stdout", out_dir / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "oatoplan", *map(str, args)], cwd=REPO, stdout=stdout,
                                stderr=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out, err


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(gemma_model, tmp_path_factory):
    """A served Gemma 3 270M with an all-CPU plan that keeps one logit row per ubatch (n_outputs_max 1)."""
    tmp = tmp_path_factory.mktemp("serve")
    plan = cpu_only_plan(read_inventory(gemma_model), n_ctx=1024, n_outputs_max=1, n_threads=1)
    plan_path = write_json(plan, tmp / "plan.json")
    port = _free_port()
    # this Gemma GGUF carries no chat template; llama-cpp-python's "gemma" format is its template
    proc, out, err = _oatoplan(["serve", gemma_model, "--plan", plan_path, "--port", port, "--chat-format", "gemma"],
                               tmp)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}: {err.read_text()}"
            assert time.monotonic() < deadline, f"no answer on /v1/models in {STARTUP_DEADLINE_S} s: {err.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        yield dict(client=client, port=port, plan_path=plan_path, stdout=out, alias=gemma_model.stem)
    finally:
        _stop(proc)


def test_models_and_the_line_it_prints(server):
    assert [m.id for m in server["client"].models.list()] == [server["alias"]]
    line = server["stdout"].read_text()
    assert line.count("\n") == 1 and f"http://127.0.0.1:{server['port']}/v1" in line
    assert str(server["plan_path"]) in line and server["alias"] in line


def test_chat_completion_uses_the_chat_template(server):
    client = server["client"]
    question = "Name a colour."
    reply = client.chat.completions.create(model=server["alias"], messages=[{"role": "user", "content": question}],
                                           max_tokens=MAX_TOKENS, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= MAX_TOKENS
    request = urllib.request.Request(f"http://127.0.0.1:{server['port']}/extras/tokenize", method="POST",
                                     data=json.dumps({"input": question}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        bare = json.load(response)["tokens"]
    # Gemma's template wraps the message: <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
    assert reply.usage.prompt_tokens >= len(bare) + 6


def test_streamed_chat_completion(server):
    stream = server["client"].chat.completions.create(
        model=server["alias"], messages=[{"role": "user", "content": "Count to five."}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion(server):
    reply = server["client"].completions.create(model=server["alias"], prompt="The capital of France is",
                                                max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text.strip() and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= MAX_TOKENS


def test_what_the_plan_cannot_serve_is_a_clean_400(server):
    client, alias = server["client"], server["alias"]
    with pytest.raises(openai.BadRequestError, match="n_outputs_max") as refused:
        client.completions.create(model=alias, prompt="Hi", max_tokens=2, logprobs=2)
    assert refused.value.status_code == 400 and refused.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError, match="logprobs"):      # refused before a stream starts
        client.chat.completions.create(model=alias, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.embeddings.create(model=alias, input="Hi")
    # echo needs no logits of the prompt; the server still answers after the refusals
    reply = client.completions.create(model=alias, prompt="Hi", max_tokens=2, temperature=0, echo=True)
    assert reply.choices[0].text.startswith("Hi")


def test_bad_plan_is_refused_before_the_port_opens(gemma_model, tiny_model, tmp_path):
    plan_path = write_json(cpu_only_plan(read_inventory(tiny_model)), tmp_path / "tiny-plan.json")
    port = _free_port()
    proc, out, err = _oatoplan(["serve", gemma_model, "--plan", plan_path, "--port", port], tmp_path)
    try:
        while proc.poll() is None:
            assert not _accepts(port), "the port opened for a plan made for another model"
            time.sleep(0.05)
    finally:
        _stop(proc)
    lines = err.read_text().splitlines()
    assert proc.returncode == 1 and out.read_text() == "" and not _accepts(port)
    assert len(lines) == 1 and lines[0].startswith("oatoplan: error: ") and "was made for tiny-llama.gguf" in lines[0]


def test_unreadable_or_unplaceable_plans_exit_1_in_one_line(cli, gemma_model, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    result = cli(["serve", gemma_model, "--plan", broken, "--port", _free_port()])
    assert result.exit_code == 1 and "not valid JSON" in result.stderr and result.stderr.count("\n") == 1
    if not gpu_devices():
        gpu_plan = make_plan(read_inventory(gemma_model), {}, n_gpu_layers=4, gpu_devices=("CUDA0",))
        result = cli(["serve", gemma_model, "--plan", write_json(gpu_plan, tmp_path / "gpu.json"), "--port",
                      _free_port()])
        assert result.exit_code == 1 and "gpu.json places tensors on CUDA0" in result.stderr
        assert result.stderr.count("\n") == 1


def test_the_proxy_serves_the_llama_that_oatoplan_loaded(tiny_model, caplog):
    app = make_app(tiny_model, cpu_only_plan(read_inventory(tiny_model), n_ctx=256, n_outputs_max=1))
    assert app.state.oatoplan_alias == "tiny-llama" and server_app.LlamaProxy is LlamaProxy
    assert server_app._llama_proxy() is app.state.oatoplan_llm and app.state.oatoplan_llm.n_ctx() == 256
    assert "has no chat template" in caplog.text and "--chat-format" in caplog.text


def test_n_ctx_only_where_the_plan_allows_it(tiny_model):
    inv = read_inventory(tiny_model)
    cpu = cpu_only_plan(inv, n_ctx=256)
    larger = serving_plan(tiny_model, cpu, 1024)
    assert larger.n_ctx == 1024 and sum(larger.memory.kv_bytes.values()) == 4 * sum(cpu.memory.kv_bytes.values())
    assert serving_plan(tiny_model, None, 512).n_ctx == 512 and serving_plan(tiny_model, None) is None
    assert serving_plan(tiny_model, cpu) is cpu and serving_plan(tiny_model, cpu, 256) is cpu
    gpu = make_plan(inv, {}, n_gpu_layers=3, gpu_devices=("CUDA0",), n_ctx=256)
    assert serving_plan(tiny_model, gpu, 128).n_ctx == 128
    with pytest.raises(PlanMismatchError, match="context of 256 tokens"):
        serving_plan(tiny_model, gpu, 257)


def test_refusal_rules():
    reason = "a reason"
    assert refusal("/v1/completions", json.dumps({"prompt": "x", "logprobs": 0}).encode(), reason)[0] == "logprobs"
    assert refusal("/v1/completions", json.dumps({"prompt": "x", "logprobs": None}).encode(), reason) is None
    assert refusal("/v1/chat/completions", json.dumps({"messages": [], "logprobs": False}).encode(), reason) is None
    assert refusal("/v1/chat/completions", b"not json", reason) is None
    assert refusal("/v1/embeddings", b"{}", reason)[0] == "input"
