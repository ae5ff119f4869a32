"""POST /tokenize and /detokenize (vLLM's shapes) and /v1/embeddings (a 400: the model does not embed),
against a real server on the tiny random Llama (its word-level tokenizer spells "w3".."w383", <s>=1).
The round trip of real text with a byte-level BPE is in test_responses.py (SmolLM2)."""
from __future__ import annotations

import httpx
import openai
import pytest

from server_fixture import SEED_MODEL_NAME, start_server, tiny_engine

MODEL = SEED_MODEL_NAME
KEY = "sk-test-tokenize"
MESSAGES = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w6 w7"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tiny_engine(tmp_path_factory.mktemp("ck")), api_key=KEY)
    yield s
    s.__exit__()


def post(server, path, body, key=KEY):
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})


def test_tokenize_a_prompt_and_back(server):
    r = post(server, "/tokenize", {"model": MODEL, "prompt": "w5 w6 w7", "return_token_strs": True}).json()
    assert r == {"count": 3, "max_model_len": 512, "tokens": [5, 6, 7], "token_strs": ["w5", "w6", "w7"]}
    assert post(server, "/tokenize", {"prompt": "w5 w6 w7"}).json()["token_strs"] is None
    assert post(server, "/detokenize", {"model": MODEL, "tokens": [5, 6, 7]}).json() == {"prompt": "w5 w6 w7"}
    assert post(server, "/detokenize", {"tokens": [1, 5, 2]}).json() == {"prompt": "<s> w5 </s>"}  # specials kept


def test_tokenize_a_chat_counts_what_a_chat_completion_reads(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    r = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()
    assert r["count"] == chat.usage.prompt_tokens == len(r["tokens"])
    assert r["tokens"] == server.engine.tokenizer.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "w5", "messages": MESSAGES}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "w5"}]}, 400, "messages[0].role"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"model": "gpt-5", "prompt": "w5"}, 404, "model"),
    ("/detokenize", {"tokens": [5, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "w5"}, 400, "tokens"),
])
def test_bad_requests_name_the_field(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_behind_the_api_key(server):
    for path in ("/tokenize", "/detokenize", "/v1/embeddings"):
        r = post(server, path, {"prompt": "w5", "tokens": [5], "input": "w5"}, key="wrong")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)


def test_embeddings_say_the_model_does_not_embed(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="w5 w6")
    error = e.value.body
    assert "does not embed" in error["message"] and error["code"] == "model_not_supported" and error["param"] == "model"
    assert post(server, "/v1/openai/embeddings", {"input": "w5"}).status_code == 400
