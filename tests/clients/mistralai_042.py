"""Run by the mistralai==0.4.2 virtualenv (it cannot share one with mistralai 3.x):
python mistralai_042.py URL -> one JSON line with what the 0.4.2 client saw."""

import json
import os
import sys

from mistralai.client import MistralClient
from mistralai.exceptions import MistralAPIException
from mistralai.models.chat_completion import ChatMessage

url = sys.argv[1]
client = MistralClient(api_key=os.environ["MISTRAL_API_KEY"], endpoint=url, max_retries=0,
                       timeout=60)
messages = [ChatMessage(role="system", content="You are a helpful code assistant."),
            ChatMessage(role="user", content="Create a Python function to convert Celsius.")]
out = {}
r = client.chat(model="mistral-small", messages=messages, max_tokens=5, random_seed=1,
                safe_prompt=True)
out["complete"] = {"content": r.choices[0].message.content,
                   "finish_reason": str(r.choices[0].finish_reason.value),
                   "usage": [r.usage.prompt_tokens, r.usage.completion_tokens,
                             r.usage.total_tokens]}
chunks = list(client.chat_stream(model="mistral-small", messages=messages, max_tokens=5,
                                 random_seed=1, safe_prompt=True))
out["stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["stream_finish"] = str(chunks[-1].choices[0].finish_reason.value)
out["models"] = [m.id for m in client.list_models().data]
try:
    MistralClient(api_key="wrong", endpoint=url, max_retries=0).list_models()
except MistralAPIException as e:
    out["auth_error"] = e.http_status
try:
    client.chat(model="mistral-small", messages=[ChatMessage(role="user", content="x")],
                temperature=9.0)
except MistralAPIException as e:
    out["validation_error"] = e.http_status
print(json.dumps(out))
