"""The openai backend against a real `transformers serve` of the embedded model, on loopback."""

import shutil
import subprocess
import time
import urllib.request

import pytest

from common.llm import LLMBackendError, OpenAIChat
from common.models import resolve_model_path
from tests.conftest import free_port


@pytest.fixture(scope="module")
def server():
    if shutil.which("transformers") is None:
        pytest.skip("the transformers CLI is not installed")
    model_dir = resolve_model_path("smollm2-135m")
    port = free_port()
    process = subprocess.Popen(
        ["transformers", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", model_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail("transformers serve exited during start-up")
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("transformers serve did not become healthy in 180 s")
    yield f"http://127.0.0.1:{port}/v1", model_dir
    process.terminate()
    process.wait(timeout=30)


def test_chat_against_transformers_serve(server):
    base_url, model = server
    llm = OpenAIChat(model, base_url=base_url, max_retries=1)
    outputs = llm.chat(
        [[{"role": "user", "content": "Say hello."}], [{"role": "user", "content": "Name a color."}]],
        n=2,
        max_tokens=12,
    )
    assert [len(o) for o in outputs] == [2, 2]
    assert all(isinstance(t, str) and t for o in outputs for t in o)
    assert outputs[0][0] == outputs[0][1]  # temperature 0 is greedy
    assert llm.usage.calls == 4 and llm.usage.prompt_tokens > 0 and 0 < llm.usage.completion_tokens <= 4 * 12


def test_choice_probs_needs_logprobs(server):
    base_url, model = server
    llm = OpenAIChat(model, base_url=base_url, max_retries=0)
    with pytest.raises(LLMBackendError, match="returned no logprobs"):
        llm.choice_probs([[{"role": "user", "content": "Yes or No?"}]])
