"""Call the serving example's models with the openai client: list them, chat (plain and streamed), classify.

    .venv/bin/python examples/expert/serving/client.py [--url http://127.0.0.1:8000] [--key tl-...]
"""

from __future__ import annotations

import argparse
import json

import httpx
from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default="none", help="an API key, when the server was started with --api-keys")
    args = ap.parse_args()

    client = OpenAI(base_url=args.url + "/v1", api_key=args.key, max_retries=0)
    print("models:", ", ".join(m.id for m in client.models.list().data))

    ask = [{"role": "user", "content": "Give me one tip for writing clear emails."}]
    plain = client.chat.completions.create(model="assistant", messages=ask, max_tokens=48, temperature=0)
    print("\nassistant:", plain.choices[0].message.content)
    print(f"  finish_reason={plain.choices[0].finish_reason}, usage={plain.usage.model_dump()}")

    print("\nassistant, streamed: ", end="")
    pieces = []
    for chunk in client.chat.completions.create(model="assistant", messages=ask, max_tokens=48, temperature=0,
                                                stream=True):
        piece = chunk.choices[0].delta.content or "" if chunk.choices else ""
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(f"\n  streamed text == plain text: {''.join(pieces) == plain.choices[0].message.content}")

    # /v1/classify is tunelab's own route (OpenAI has none for classifiers): plain HTTP
    headers = {"Authorization": f"Bearer {args.key}"}
    for model, texts in (("sentiment", ["a gorgeous, moving film", "two hours I will never get back"]),
                         ("spam", ["WINNER! Claim your free prize now, text 80082", "running late, see you at 7"])):
        res = httpx.post(args.url + "/v1/classify", json={"model": model, "input": texts}, headers=headers).json()
        for text, row in zip(texts, res["data"]):
            print(f"\n{model}: {text!r} -> {row['label']} ({row['score']:.3f})", end="")
    print()
    print(json.dumps(httpx.get(args.url + "/readyz").json()))


if __name__ == "__main__":
    main()
