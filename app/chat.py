"""The Chat tab: a conversation about one image, answered by `blip2lab.chat` (earlier
turns in the reference's history format, fitted to the LLM's context), with LAVIS's
decoding controls, retry, undo and clear. Every answer names the model that gave it and
what that model cannot know (a photo answered by mini-real, a held-out colour-shape pair).

A session's conversation is {"image": path, "turns": [[question, answer, model name], ...]}.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import gradio as gr

from app import server
from app.server import UserError, friendly, gpu, on_page
from blip2lab import routing
from blip2lab.chat import reply
from blip2lab.pipeline import lavis_decoding, no_loops
from blip2lab.worlds.shapes import world

STRATEGIES = ("beam search", "nucleus sampling")
DEFAULTS = dict(decoding="beam search", beams=5, max_new_tokens=10, min_length=0, temperature=1.0, top_p=0.9,
                length_penalty=-1.0, repetition_penalty=1.0, seed=0)  # LAVIS's VQA decoding


def new_chat() -> dict:
    return {"image": None, "turns": []}


def decoding_options(decoding: str = "beam search", beams: float = 5, max_new_tokens: float = 10,
                     min_length: float = 0, temperature: float = 1.0, top_p: float = 0.9,
                     length_penalty: float = -1.0, repetition_penalty: float = 1.0, seed: float = 0) -> dict:
    """The decoding controls (sliders hand out floats) -> blip2lab decoding options."""
    if decoding not in STRATEGIES:
        raise UserError(f"decoding must be one of {STRATEGIES}, got {decoding!r}")
    return lavis_decoding(decoding == "nucleus sampling", int(beams), int(max_new_tokens), int(min_length),
                          float(temperature), float(top_p), float(length_penalty), float(repetition_penalty),
                          int(seed))


def decoding_interactivity(strategy: str) -> list:
    """Grey out what does not apply: beams and length penalty are beam search's; temperature,
    top-p and seed are sampling's."""
    beam = strategy == "beam search"
    return [gr.update(interactive=beam), gr.update(interactive=beam), gr.update(interactive=not beam),
            gr.update(interactive=not beam), gr.update(interactive=not beam)]


# ---------------------------------------------------------------------------------------
# Who answered, and what it cannot know
# ---------------------------------------------------------------------------------------


def answer_note(model_name: str, question: str, is_shapes: bool, photo_for: str = "", cut_at: int = 0) -> str:
    """The line under an answer: the model that gave it, and what it cannot know; `cut_at`:
    the answer ran into that many new tokens (the Max new tokens control)."""
    parts = [f"answered by {model_name}"]
    if cut_at:
        parts.append(f"cut at {cut_at} new tokens: raise Max new tokens (Decoding) for more")
    if photo_for:
        parts.append(f"this looks like a photo, so {model_name} answered instead of {photo_for}")
    if model_name == routing.PHOTO_MODEL:
        parts.append("a clip-art model: it may name the main object of a simple picture; it cannot count, read, "
                     "or say where things are, and it has never seen a photo")
    held = world.held_out_mentions(question) if is_shapes else []
    if held:
        pairs = " or ".join(f"a {c} {s}" for c, s in held)
        parts.append(f"{model_name} never saw {pairs} in training (a held-out pair): this answer is a guess")
    return " · ".join(parts)


def chat_messages(state: dict) -> list[dict]:
    """The conversation for gr.Chatbot: each answer with its note in small print."""
    messages: list[dict] = []
    if state.get("image"):
        messages.append({"role": "user", "content": {"path": state["image"]}})
    for question, answer, *note in state["turns"]:
        text = answer or "(an empty answer)"
        if note and note[0]:
            text += f"\n\n<sub>{note[0]}</sub>"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    return messages


def check_question(loaded: server.Loaded, text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise UserError("Type a question about the image.")
    limit = loaded.pipe.processor.max_question_chars
    if len(text) > limit:
        gr.Warning(f"Your question is {len(text):,} characters long; only the first {limit:,} are used.")
        text = text[:limit]
    return text


class Answer(NamedTuple):
    text: str
    prompt: str
    note: str  # answer_note: who answered, what it cannot know


def _answer(state: dict, question: str, decoding: dict, model: Optional[str]) -> Answer:
    """The answer to `question` after the state's earlier turns, by the session's model (or
    mini-real for a photo sent to a shapes model), the prompt it saw and its note."""
    loaded = server.model(model)
    image = server.open_image(state["image"], loaded.pipe.processor.image_size)
    photo = server.photo_model_for(loaded, image)
    answering = photo or loaded
    if answering.pipe.model.llm is None:
        raise UserError(f"{answering.name} has no language model: it can caption (Q-Former decoder) and match, "
                        "not chat. Pick another model in the Model tab.")
    question = check_question(answering, question)
    with answering.lock:
        out = reply(answering.pipe, image, [tuple(t[:2]) for t in state["turns"]], question,
                    **no_loops(answering.pipe.processor, decoding))
    if out.fitted.dropped_turns:
        gr.Warning(f"The conversation is longer than the model can read: the oldest {out.fitted.dropped_turns} "
                   "turn(s) are left out of the prompt.")
    if out.fitted.question_cut:
        gr.Warning(f"The question is too long for the model's context: only its first {len(out.fitted.question)} "
                   "characters are used.")
    limit = int(decoding.get("max_new_tokens", 10))
    cut = answering.pipe.processor.chat_template and _tokens(answering, out.answer) >= limit - 1
    note = answer_note(answering.name, question, answering.is_shapes, loaded.name if photo else "", limit if cut else 0)
    return Answer(out.answer, out.fitted.prompt, note)


def _tokens(loaded: server.Loaded, text: str) -> int:
    """The LLM tokens of an answer (as decoded, give or take one)."""
    return len(loaded.pipe.processor.llm_tokenizer(text, add_special_tokens=False)["input_ids"])


def _new_image(path: str, model: Optional[str]) -> None:
    """Check a new image now (a bad file is refused before it replaces the conversation) and
    say what will answer it: mini-real for a photo, else the session's model."""
    loaded = server.model(model)
    image = server.open_image(path, loaded.pipe.processor.image_size)
    photo = server.photo_model_for(loaded, image)
    if photo is not None:
        gr.Warning(f"This looks like a photo, not a shapes-world scene: {photo.name} answers it. "
                   + server.MINIREAL_NOTE)
    else:
        server.warn_if_not_scene(loaded, image)


def _turn(message: Optional[dict], state: Optional[dict], model: Optional[str], decoding: dict) -> tuple[dict, str]:
    """The state after one turn (an image alone only starts a conversation), and the prompt."""
    state = state or new_chat()
    message = message or {"text": "", "files": []}
    files = [f for f in (message.get("files") or []) if f]
    if files:
        _new_image(str(files[-1]), model)
        state = {"image": str(files[-1]), "turns": []}
    text = (message.get("text") or "").strip()
    if not state["image"]:
        raise UserError("Add an image first (drop one into the box, or pick an example).")
    if not text:
        if files:
            return state, ""
        raise UserError("Type a question about the image.")
    out = _answer(state, text, decoding, model)
    return {"image": state["image"], "turns": state["turns"] + [[text, out.text, out.note]]}, out.prompt


@friendly
@gpu
def chat(message: Optional[dict] = None, state: Optional[dict] = None, model: Optional[str] = None,
         decoding: str = "beam search", beams: float = 5, max_new_tokens: float = 10, min_length: float = 0,
         temperature: float = 1.0, top_p: float = 0.9, length_penalty: float = -1.0,
         repetition_penalty: float = 1.0, seed: float = 0) -> tuple:
    """One chat turn about an image, by this session's model (a photo sent to a shapes model is
    answered by mini-real). A new image starts a new conversation; earlier turns go into the prompt
    in the reference's history format ("Question: q Answer: a." before the new question).

    Parameters:
        message: {"text": the question, "files": [an image]}; an image starts a new conversation
        decoding: "beam search" or "nucleus sampling"
        beams: beams of beam search (1: greedy)
        max_new_tokens: the answer's length limit, in new tokens
        min_length: the answer's shortest length, in new tokens
        temperature: nucleus sampling only
        top_p: nucleus sampling only
        length_penalty: beam search only (-1, LAVIS's VQA setting, prefers short answers)
        repetition_penalty: 1 is off (mini-real answers with at least 1.5 and no repeated 3-gram)
        seed: nucleus sampling only
    Returns:
        the answer, the model that answered and what it cannot know, the prompt the LLM saw, the conversation
    """
    options = decoding_options(decoding, beams, max_new_tokens, min_length, temperature, top_p, length_penalty,
                               repetition_penalty, seed)
    state, prompt = _turn(message, state, model, options)
    last = state["turns"][-1] if state["turns"] else ["", "", ""]
    return last[1], last[2], prompt, chat_messages(state), state


@friendly
@gpu
def chat_retry(state: Optional[dict] = None, model: Optional[str] = None, decoding: str = "beam search",
               beams: float = 5, max_new_tokens: float = 10, min_length: float = 0, temperature: float = 1.0,
               top_p: float = 0.9, length_penalty: float = -1.0, repetition_penalty: float = 1.0,
               seed: float = 0) -> tuple:
    """Answer the last question again with these decoding settings (with sampling, the seed moves
    on by one so the draw differs).

    Returns:
        the conversation, the prompt the LLM saw, the new seed
    """
    state = state or new_chat()
    if not state["turns"]:
        raise UserError("Nothing to retry yet.")
    seed = int(seed) + (decoding == "nucleus sampling")
    options = decoding_options(decoding, beams, max_new_tokens, min_length, temperature, top_p, length_penalty,
                               repetition_penalty, seed)
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    out = _answer(state, question, options, model)
    state["turns"] = state["turns"] + [[question, out.text, out.note]]
    return chat_messages(state), out.prompt, state, seed


@friendly
def chat_undo(state: Optional[dict] = None) -> tuple:
    """Drop the last turn; its question goes back into the box.

    Returns:
        the conversation, the input box
    """
    state = state or new_chat()
    if not state["turns"]:
        return chat_messages(state), None, state
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    return chat_messages(state), {"text": question, "files": []}, state


def chat_clear() -> tuple:
    """Start over: no image, no turns."""
    return [], None, "", new_chat()


# ---------------------------------------------------------------------------------------
# The page's handlers: a refusal is a toast, and the conversation and inputs stay usable
# ---------------------------------------------------------------------------------------


def chat_on_page(message: Optional[dict], state: Optional[dict], model: Optional[str], *controls: Any) -> tuple:
    """`chat` for the page: the conversation, the box (emptied), the prompt, the state. A
    refused turn leaves the conversation as it was and the question in the box; a refused
    image is dropped from the box, so the attach button comes back."""
    text = (message or {}).get("text") or ""

    def refused(error: gr.Error) -> tuple:
        box = {"text": text, "files": []} if getattr(error, "image", False) else gr.skip()
        return gr.skip(), box, gr.skip(), gr.skip()

    def turn(*args: Any) -> tuple:
        _, _, prompt, messages, new_state = chat(*args)
        return messages, None, prompt, new_state

    return on_page(turn, 4, refused)(message, state, model, *controls)


# ---------------------------------------------------------------------------------------
# The tab
# ---------------------------------------------------------------------------------------


def _decoding_controls() -> list:
    """LAVIS's generate() knobs, VQA defaults; the order decoding_options takes them in."""
    d = DEFAULTS
    with gr.Accordion("Decoding", open=False):
        strategy = gr.Radio(list(STRATEGIES), value=d["decoding"], label="Decoding")
        with gr.Row():
            beams = gr.Slider(1, 10, value=d["beams"], step=1, label="Beams")
            max_new = gr.Slider(1, 60, value=d["max_new_tokens"], step=1, label="Max new tokens")
            min_len = gr.Slider(0, 20, value=d["min_length"], step=1, label="Min length (new tokens)")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=d["temperature"], step=0.05, label="Temperature",
                                    interactive=False)
            top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p", interactive=False)
            seed = gr.Number(value=d["seed"], precision=0, label="Seed", interactive=False)
        with gr.Row():
            length_penalty = gr.Slider(-2.0, 2.0, value=d["length_penalty"], step=0.1, label="Length penalty")
            repetition_penalty = gr.Slider(1.0, 2.0, value=d["repetition_penalty"], step=0.05,
                                           label="Repetition penalty")
        gr.Markdown("mini-real (photos) answers in sentences: it always decodes with a repetition penalty of at "
                    "least 1.5, no repeated 3-gram and a length penalty of at least 1, so it neither loops nor "
                    "stops short; raise *Max new tokens* for longer answers.")
    strategy.change(decoding_interactivity, strategy, [beams, length_penalty, temperature, top_p, seed],
                    api_visibility="private")
    return [strategy, beams, max_new, min_len, temperature, top_p, length_penalty, repetition_penalty, seed]


def _examples(chat_in: gr.MultimodalTextbox) -> None:
    ex = {n: str(server.ASSETS / n) for n in server.EXAMPLES}
    gr.Examples([[{"text": "what color is the circle?", "files": [ex["red-circle.png"]]}],
                 [{"text": "how many shapes are there?", "files": [ex["three-shapes.png"]]}],
                 [{"text": "where is the yellow triangle?", "files": [ex["blue-square-yellow-triangle.png"]]}],
                 [{"text": "is there a purple triangle?", "files": [ex["novel-purple-triangle.png"]]}]],
                inputs=[chat_in], label="Examples: click one, then press Enter", elem_id="chat-examples")


def build(model_state: gr.State) -> gr.MultimodalTextbox:
    """The Chat tab; returns its input box (the scene composer sends scenes to it)."""
    with gr.Tab("Chat", id="chat"):
        chat_state = gr.State(new_chat())
        chatbot = gr.Chatbot(label="Chat about one image", height=300, elem_id="chatbot", elem_classes="pixelated")
        chat_in = gr.MultimodalTextbox(file_types=["image"], file_count="single", show_label=False,
                                       elem_id="chat-input", placeholder="Drop an image, then ask about it "
                                                                         "(a new image starts a new conversation)")
        _examples(chat_in)
        with gr.Row():
            retry_btn = gr.Button("Retry", size="sm")
            undo_btn = gr.Button("Undo", size="sm")
            clear_btn = gr.Button("Clear", size="sm")
        prompt_box = gr.Textbox(label="Prompt the LLM saw", interactive=False, lines=2, elem_id="chat-prompt")
        controls = _decoding_controls()
        seed = controls[-1]
        answer = gr.Textbox(visible=False, label="answer")  # the API's outputs
        answered_by = gr.Textbox(visible=False, label="answered by")
        inputs = [chat_in, chat_state, model_state] + controls
        # The API's endpoints first (they take the functions' names), then the page's listeners.
        gr.on([], chat, inputs, [answer, answered_by, prompt_box, chatbot, chat_state], api_name="chat")
        retry_outputs = [chatbot, prompt_box, chat_state, seed]
        gr.on([], chat_retry, [chat_state, model_state] + controls, retry_outputs, api_name="chat_retry")
        chat_in.submit(chat_on_page, inputs, [chatbot, chat_in, prompt_box, chat_state], api_visibility="private")
        retry = on_page(chat_retry, 4)
        retry_btn.click(retry, [chat_state, model_state] + controls, retry_outputs, api_visibility="private")
        chatbot.retry(retry, [chat_state, model_state] + controls, retry_outputs, api_visibility="private")
        undo_btn.click(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_name="chat_undo")
        chatbot.undo(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_visibility="private")
        clear_btn.click(chat_clear, None, [chatbot, chat_in, prompt_box, chat_state], api_name="chat_clear")
    return chat_in
