"""Real clients against a real server on 127.0.0.1: the openai package, schemathesis fuzzing the OpenAPI
schema, and the playground page in Debian's chromium driven by Playwright."""

import os
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from serve_helpers import LiveServer, post
from tunelab.serve.auth import add_key
from tunelab.serve.state import ServeSettings

CHROMIUM = "/usr/bin/chromium"
# What a headless browser needs in a container without a display or network (see docs/10-deployment.md).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(serve_runs, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    key = add_key(keys, "alice")
    names = ["chat-prompt", "chat-lora", "text-lora", "sentiment-lora"]
    settings = ServeSettings(sources=[(n, serve_runs[n]) for n in names], api_keys=keys, batch_window_ms=5)
    with LiveServer(settings) as srv:
        srv.key = key
        yield srv


def test_openai_client_lists_chats_streams_and_completes(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    assert {"chat-prompt", "sentiment-lora"} <= {m.id for m in client.models.list().data}
    messages = [{"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model="chat-prompt", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens > 0
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="chat-prompt", messages=messages, max_tokens=12, temperature=0, stream=True) if chunk.choices]
    assert len(pieces) > 2, "the answer did not arrive in pieces"
    assert "".join(pieces) == plain.choices[0].message.content
    done = client.completions.create(model="text-lora", prompt="The film was", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="text-lora", prompt="The film was", max_tokens=6, temperature=0, stream=True))
    assert done.choices[0].text and streamed == done.choices[0].text
    from openai import AuthenticationError, BadRequestError

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="tl-wrong", max_retries=0).models.list()
    with pytest.raises(BadRequestError, match="context"):
        client.chat.completions.create(model="chat-prompt", messages=messages, max_tokens=100_000)


def test_fuzzed_requests_never_get_a_5xx(serve_runs):
    """schemathesis generates requests from /openapi.json for every route; none may get a 5xx."""
    from hypothesis import given

    # No keys, so the fuzzer reaches the model routes; admin routes then answer 403, which is fine here.
    names = ["chat-prefix", "text-lora", "sentiment-lora"]
    with LiveServer(ServeSettings(sources=[(n, serve_runs[n]) for n in names], batch_window_ms=1)) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/classify"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case):
                if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                    case.body["max_tokens"] = min(case.body["max_tokens"], 64)  # bounded generation; 400s remain
                case.call_and_validate(checks=[not_a_server_error], timeout=120)

            fuzz()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium for this test")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_playground_streams_chat_and_classifies_in_a_real_browser(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#status.error")  # without the key the model list is refused
    assert "401" in page.inner_text("#status")
    page.fill("#key", server.key)
    page.dispatch_event("#key", "change")
    page.wait_for_function("document.querySelectorAll('#model option').length === 4")

    page.select_option("#model", "chat-prompt")
    page.fill("#maxtokens", "10")
    page.fill("#prompt", "Name a colour.")
    page.click("#send")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
    shown = page.inner_text(".msg.assistant")
    expected = post(server.url + "/v1/chat/completions", {"model": "chat-prompt", "max_tokens": 10, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Name a colour."}]},
                    server.key).json()["choices"][0]["message"]["content"]
    assert shown.strip() == expected.strip() and shown.strip()

    page.select_option("#model", "sentiment-lora")
    page.fill("#text", "a wonderful, moving film")
    page.click("#classifybtn")
    page.wait_for_selector("#scores tr:nth-child(3)")
    answer = post(server.url + "/v1/classify", {"model": "sentiment-lora", "input": "a wonderful, moving film"},
                  server.key).json()["data"][0]
    assert f"label: {answer['label']}" == page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    assert httpx.get(server.url + "/").headers["content-type"].startswith("text/html")
