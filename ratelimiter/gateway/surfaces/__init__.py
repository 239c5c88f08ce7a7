"""API surfaces: what differs between OpenAI's chat/completions/embeddings, OpenAI's Responses
and Anthropic's Messages, and nothing else.

A surface says how to read the model, the end user and the estimate from a body, which
upstream path to call and with what headers, how to take usage out of an answer or out of
each SSE event of a stream, and how to write errors and rate-limit headers in its API's own
form. The one request path (proxy.py: authenticate, resolve, admit, forward, settle) serves
every surface; adding a surface adds a module here, never a second copy of that path.
"""

from __future__ import annotations

from .base import StreamTally, Surface
from .messages import COUNT_TOKENS, MESSAGES
from .openai import CHAT, COMPLETION, EMBEDDING
from .responses import RESPONSES

__all__ = ["SURFACES", "StreamTally", "Surface"]

# Our route (after /v1 or nothing) -> its surface.
SURFACES: dict[str, Surface] = {
    "chat/completions": CHAT,
    "completions": COMPLETION,
    "embeddings": EMBEDDING,
    "responses": RESPONSES,
    "messages": MESSAGES,
    "messages/count_tokens": COUNT_TOKENS,
}
