"""GET /v1/models, and the model name every OpenAI-shaped request must send."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..embeddings import EmbeddingService
from ..engine import Engine
from ..errors import NotFound


def model_id(request: Request) -> str:
    return str(request.app.state.model_id)


def check_model(request: Request, asked: str | None) -> None:
    """Clients must send some model name; any name is served by the one model this node has,
    except a name that is plainly another model's file."""
    if asked and asked.endswith(".gguf") and asked != model_id(request) + ".gguf":
        raise NotFound(
            f"model {asked!r} is not served here; this node serves {model_id(request)!r}"
        )


async def models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    data: list[dict[str, object]] = []
    card = {
        "object": "model",
        "created": int(request.app.state.started_at),
        "owned_by": "gguf-appliance",
    }
    if engine.ready and engine.model is not None:
        # Extra fields (clients ignore them): which chat template, and where it came from, and
        # its tool-call syntax; the context of a request and its longest prompt (the chat page
        # drops old turns by them).
        room = engine.slot_context
        limit = request.app.state.settings.max_prompt_tokens
        data.append(
            {
                "id": model_id(request),
                **card,
                "chat_template": engine.model.chat_template,
                "tool_call_syntax": engine.tool_syntax.name,
                "context_length": room,
                "max_prompt_tokens": room - 1 if limit is None else min(limit, room - 1),
            }
        )
    embedding: EmbeddingService = request.app.state.embeddings
    if engine.ready and embedding.model_id is not None:  # a model of its own for /v1/embeddings
        data.append({"id": embedding.model_id, **card})
    return JSONResponse({"object": "list", "data": data})
