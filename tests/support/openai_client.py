"""Calls a Harness node's HTTP inference routes with OpenAI's own `openai` package.

Used by tests/http_inference.rs:

    python openai_client.py SPEC_JSON

SPEC_JSON is `{"base_url": "http://127.0.0.1:PORT/v1", "api_key": "...", "ops": [...]}`;
each op is a dict with "op" (models, embeddings, chat, completion, disconnect) and
the call's parameters. The script runs the ops in order and prints one JSON list on
stdout, one result per op: the response as the client parsed it (`to_dict()`, the
fields the server sent), or, for a streamed call, every chunk and whether the stream
ended by itself; an API error is a result too, `{"error": {"class", "status", "body",
"headers"}}`. The Rust test does every assertion.
"""

import json
import sys
import threading
import time
import urllib.request

import openai

# What each op passes through to the client's create() when present.
PASSED = (
    "model",
    "input",
    "encoding_format",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
)


def client(spec, op):
    # trust_env=False: no proxy from the environment between us and loopback.
    # max_retries=0: the test sees each answer as the server gave it.
    return openai.OpenAI(
        base_url=spec["base_url"],
        api_key=op.get("api_key", spec["api_key"]),
        max_retries=0,
        timeout=op.get("timeout", 120.0),
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def params(op):
    return {k: op[k] for k in PASSED if k in op}


def answer(result):
    """A response, or every chunk of a stream and whether it ended by itself."""
    if isinstance(result, openai.Stream):
        chunks = [chunk.to_dict() for chunk in result]
        return {"chunks": chunks, "ended": True}
    return result.to_dict()


def status_json(spec, path):
    root = spec["base_url"].rsplit("/v1", 1)[0]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(root + path, timeout=10) as response:
        return json.loads(response.read())


def disconnect(spec, op, c):
    """Client A streams a chat with a huge max_tokens and closes its stream after
    a few chunks of text; client B, sent while A streams (so it waits for the one
    slot), must then complete. The result says what each got."""
    a = c.chat.completions.create(**params(op["a"]))
    texts = []
    for chunk in a:
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
        if len(texts) >= op.get("a_chunks", 3):
            break
    b_result = {}

    def run_b():
        try:
            b_result["answer"] = client(spec, op["b"]).completions.create(**params(op["b"])).to_dict()
        except Exception as e:  # reported, asserted by the test
            b_result["exception"] = repr(e)

    b = threading.Thread(target=run_b)
    b.start()
    # B waits behind A: the node shows it queued (up to 30 s; if never seen, B
    # may still have been sent after A's close, which proves the same).
    queued = False
    until = time.monotonic() + 30
    while time.monotonic() < until and b.is_alive():
        if status_json(spec, "/status").get("queue_depth") == 1:
            queued = True
            break
        time.sleep(0.02)
    a_status_before_close = status_json(spec, "/status")
    a.close()
    closed_at = time.monotonic()
    b.join(timeout=op.get("b_within", 300))
    return {
        "a_texts": texts,
        "b_queued_behind_a": queued,
        "status_before_close": a_status_before_close,
        "b_alive": b.is_alive(),
        "b_seconds_after_close": time.monotonic() - closed_at,
        **b_result,
    }


def run(spec, op):
    c = client(spec, op)
    kind = op["op"]
    try:
        if kind == "models":
            page = c.models.list()
            return {"ids": [m.id for m in page.data], "data": [m.to_dict() for m in page.data]}
        if kind == "embeddings":
            return answer(c.embeddings.create(**params(op)))
        if kind == "chat":
            return answer(c.chat.completions.create(**params(op)))
        if kind == "completion":
            return answer(c.completions.create(**params(op)))
        if kind == "disconnect":
            return disconnect(spec, op, c)
        raise ValueError(f"unknown op {kind!r}")
    except openai.APIStatusError as e:
        headers = {k.lower(): v for k, v in e.response.headers.items()}
        return {"error": {"class": type(e).__name__, "status": e.status_code, "body": e.body, "headers": headers}}
    except openai.APIError as e:  # an error event in a stream
        return {"error": {"class": type(e).__name__, "status": None, "body": e.body, "message": e.message}}


def main():
    spec = json.loads(sys.argv[1])
    results = [run(spec, op) for op in spec["ops"]]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
