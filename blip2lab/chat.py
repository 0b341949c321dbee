"""Chatting about one image: the paper's multi-turn demos (Figure 4-6) on top of
`Blip2Pipeline.answer`, with the one thing a long conversation adds: it must fit the
frozen LLM's positions.

    chat = Chat(pipe, "scene.png")
    chat.ask("what color is the circle?").answer
    chat.ask("where is it?")          # earlier turns go into the prompt as the reference writes them

The prompt is the processor's `chat_prompt` (with no history it is `vqa_prompt`, what
`Blip2Pipeline.answer` builds). A decoder-only LLM reads the visual tokens, the prompt and
every new token within `max_position_embeddings`; when they do not fit, the oldest turns
are left out first, then the question is cut. An LLM without absolute positions (T5) has
no such limit. Nothing is truncated silently: `Fitted` says what was left out, and the
caller decides how to tell the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from blip2lab.pipeline import VQA_DECODING, Blip2Pipeline, decoding_config

Turn = tuple[str, str]  # (question, answer)


@dataclass(frozen=True)
class Fitted:
    """A conversation cut to the LLM's context: what the prompt holds and what it lost."""

    history: list[Turn]  # the turns kept, the most recent ones
    question: str  # the question, cut to its longest prefix that fits when needed
    prompt: str  # what the LLM reads after the visual tokens
    dropped_turns: int = 0  # oldest turns left out of the prompt
    question_cut: bool = False  # the question lost its tail


@dataclass(frozen=True)
class Reply:
    answer: str
    fitted: Fitted  # the prompt it answers, and what had to be left out of it


def context_budget(pipe: Blip2Pipeline, max_new_tokens: int) -> Optional[int]:
    """Prompt tokens the LLM can read beside the visual tokens (and, decoder-only, the new
    tokens it writes after them); None when its positions have no limit."""
    limit = getattr(pipe.model.llm.model.config, "max_position_embeddings", None)
    if limit is None:
        return None
    new_tokens = max_new_tokens if pipe.processor.llm_kind == "decoder" else 0
    return limit - pipe.model.config.qformer.num_queries - new_tokens


def fit_to_context(pipe: Blip2Pipeline, history: Sequence[Turn], question: str, max_new_tokens: int) -> Fitted:
    """Keep the prompt inside the LLM's positions: drop the oldest turns first, then cut the
    question to its longest prefix that fits. ValueError when not even one character does."""
    proc = pipe.processor
    history = [tuple(turn) for turn in history]
    budget = context_budget(pipe, max_new_tokens)
    if budget is None:
        return Fitted(history, question, proc.chat_prompt(history, question))

    def fits(h: Sequence[Turn], q: str) -> bool:
        return proc.generation_batch([proc.chat_prompt(h, q)])["llm_ids"].shape[1] <= budget

    kept = history
    while kept and not fits(kept, question):
        kept = kept[1:]
    cut = not fits(kept, question)
    if cut:
        lo, hi = 1, len(question)  # the longest prefix that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(kept, question[:mid]) else (lo, mid - 1)
        if not fits(kept, question[:lo]):
            raise ValueError(f"Even a one-character question does not fit this model's context with "
                             f"{max_new_tokens} new tokens; ask for fewer new tokens.")
        question = question[:lo].rstrip() or question[:lo]
    return Fitted(kept, question, proc.chat_prompt(kept, question), len(history) - len(kept), cut)


def reply(pipe: Blip2Pipeline, image: Any, history: Sequence[Turn], question: str, **decoding: Any) -> Reply:
    """The answer to `question` about `image` after the earlier `history` turns, fitted to
    the context first. `decoding`: `Blip2Pipeline.answer`'s options (VQA defaults)."""
    max_new_tokens = decoding_config(VQA_DECODING, **decoding).max_new_tokens
    fitted = fit_to_context(pipe, history, question, max_new_tokens)
    answer = pipe.answer(image, fitted.question, history=[fitted.history], **decoding)[0]
    return Reply(answer, fitted)


@dataclass
class Chat:
    """One conversation about one image; each `ask` answers and remembers the turn."""

    pipe: Blip2Pipeline
    image: Any  # anything `load_image` takes
    turns: list[Turn] = field(default_factory=list)

    def ask(self, question: str, **decoding: Any) -> Reply:
        out = reply(self.pipe, self.image, self.turns, question, **decoding)
        self.turns.append((question, out.answer))  # as asked: a later turn fits it again
        return out
