"""The official `openai` Python client against `parallelformers serve`, unchanged.

Run by tests/serve.rs (`openai_python_client_works_unchanged`) with the server's address:

    python tests/clients/openai_client.py http://127.0.0.1:PORT [http://127.0.0.1:EMBEDDING_PORT]

The second server, when given, serves an encoder checkpoint for the embeddings check.

Exits non-zero with a message on the first check that fails.
"""

import sys

from openai import OpenAI


def main() -> None:
    client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert len(models) == 1, models
    model = models[0]

    whole = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = whole.choices[0].text
    assert text and whole.usage.completion_tokens == 8, whole
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        )
    )
    assert streamed == text, (streamed, text)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer, answer
    assert chat.choices[0].message.role == "assistant"
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == answer, (pieces, answer)

    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
    except Exception as error:  # the client raises NotFoundError for a 404
        assert getattr(error, "status_code", None) == 404, error
    else:
        raise AssertionError("an unknown model was accepted")
    if len(sys.argv) > 2:
        encoder = OpenAI(base_url=sys.argv[2] + "/v1", api_key="unused")
        name = encoder.models.list().data[0].id
        result = encoder.embeddings.create(model=name, input=["the cat runs fast", "dog"])
        vectors = [item.embedding for item in result.data]
        assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0, result
        norm = sum(v * v for v in vectors[0]) ** 0.5
        assert abs(norm - 1.0) < 1e-4, norm
    print("openai client: ok")


if __name__ == "__main__":
    main()
