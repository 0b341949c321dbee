"""The Chat tab: a conversation about one image, answered by `blip2lab.chat` (earlier
turns in the reference's history format, fitted to the LLM's context), with LAVIS's
decoding controls, retry, undo and clear.

A session's conversation is {"image": path, "turns": [[question, answer], ...]}.
"""

from __future__ import annotations

from typing import Optional

import gradio as gr

from app import server
from app.server import friendly, gpu
from blip2lab import routing
from blip2lab.chat import reply
from blip2lab.pipeline import lavis_decoding

STRATEGIES = ("beam search", "nucleus sampling")


def new_chat() -> dict:
    return {"image": None, "turns": []}


def decoding_options(strategy: str, beams: float, max_new_tokens: float, min_length: float, temperature: float,
                     top_p: float, length_penalty: float, repetition_penalty: float, seed: float) -> dict:
    """The decoding controls (sliders hand out floats) -> blip2lab decoding options."""
    if strategy not in STRATEGIES:
        raise gr.Error(f"decoding must be one of {STRATEGIES}, got {strategy!r}")
    return lavis_decoding(strategy == "nucleus sampling", int(beams), int(max_new_tokens), int(min_length),
                          float(temperature), float(top_p), float(length_penalty), float(repetition_penalty),
                          int(seed))


def decoding_interactivity(strategy: str) -> list:
    """Grey out what does not apply: beams and length penalty are beam search's; temperature,
    top-p and seed are sampling's."""
    beam = strategy == "beam search"
    return [gr.update(interactive=beam), gr.update(interactive=beam), gr.update(interactive=not beam),
            gr.update(interactive=not beam), gr.update(interactive=not beam)]


def chat_messages(state: dict) -> list[dict]:
    messages: list[dict] = []
    if state.get("image"):
        messages.append({"role": "user", "content": {"path": state["image"]}})
    for q, a in state["turns"]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a or "(an empty answer)"}]
    return messages


def check_question(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a question about the image.")
    limit = server.current().pipe.processor.max_question_chars
    if len(text) > limit:
        gr.Warning(f"Your question is {len(text):,} characters long; only the first {limit:,} are used.")
        text = text[:limit]
    return text


def _answer(state: dict, question: str, decoding: dict) -> tuple[str, str]:
    """The model's answer to `question` after the state's earlier turns, and the prompt it saw."""
    loaded = server.current()
    image = server.open_image(state["image"])
    pipe = server.photo_model_for(image) or loaded.pipe
    with loaded.lock:
        out = reply(pipe, image, [tuple(t) for t in state["turns"]], question, **decoding)
    if out.fitted.dropped_turns:
        gr.Warning(f"The conversation is longer than the model can read: the oldest {out.fitted.dropped_turns} "
                   "turn(s) are left out of the prompt.")
    if out.fitted.question_cut:
        gr.Warning(f"The question is too long for the model's context: only its first {len(out.fitted.question)} "
                   "characters are used.")
    return out.answer, out.fitted.prompt


def _new_image(path: str) -> None:
    """Warn about what will answer a new image: mini-real for a photo, else the loaded model."""
    image = server.open_image(path)
    if server.photo_model_for(image) is not None:
        gr.Warning(f"This looks like a photo, not a shapes-world scene: {routing.PHOTO_MODEL} answers it. "
                   + server.MINIREAL_NOTE)
    else:
        server.warn_if_not_scene(image)


@friendly
@gpu
def chat(message: Optional[dict], state: Optional[dict], *controls) -> tuple:
    """One chat turn. `message`: {"text": str, "files": [paths]}; an image among the files
    starts a new conversation about it (the reference's history format: earlier turns as
    "Question: q Answer: a." before the new question)."""
    state = state or new_chat()
    message = message or {"text": "", "files": []}
    files = [f for f in (message.get("files") or []) if f]
    if files:
        _new_image(files[-1])
        state = {"image": str(files[-1]), "turns": []}
    text = (message.get("text") or "").strip()
    if not state["image"]:
        raise gr.Error("Add an image first (drop one into the box, or pick an example).")
    if not text:
        if files:
            return chat_messages(state), None, "", state
        raise gr.Error("Type a question about the image.")
    loaded = server.current()
    if loaded.pipe.model.llm is None:
        raise gr.Error(f"{loaded.name} has no language model: it can caption (Q-Former decoder) and match, not chat.")
    question = check_question(text)
    answer, prompt = _answer(state, question, decoding_options(*controls))
    state = {"image": state["image"], "turns": state["turns"] + [[question, answer]]}
    return chat_messages(state), None, prompt, state


@friendly
@gpu
def chat_retry(state: Optional[dict], *controls) -> tuple:
    """Answer the last question again with the current decoding settings (with sampling,
    the seed moves on by one so the draw differs)."""
    state = state or new_chat()
    if not state["turns"]:
        raise gr.Error("Nothing to retry yet.")
    options = decoding_options(*controls)
    seed = int(controls[-1])
    if options.get("use_nucleus_sampling"):
        seed += 1
        options["seed"] = seed
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    answer, prompt = _answer(state, question, options)
    state["turns"] = state["turns"] + [[question, answer]]
    return chat_messages(state), prompt, state, seed


@friendly
def chat_undo(state: Optional[dict]) -> tuple:
    """Drop the last turn; its question goes back into the box."""
    state = state or new_chat()
    if not state["turns"]:
        return chat_messages(state), None, state
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    return chat_messages(state), {"text": question, "files": []}, state


def chat_clear() -> tuple:
    return [], None, "", new_chat()


# ---------------------------------------------------------------------------------------
# The tab
# ---------------------------------------------------------------------------------------


def _decoding_controls() -> list:
    """LAVIS's generate() knobs, VQA defaults; the order decoding_options takes them in."""
    with gr.Accordion("Decoding", open=False):
        strategy = gr.Radio(list(STRATEGIES), value="beam search", label="Decoding")
        with gr.Row():
            beams = gr.Slider(1, 10, value=5, step=1, label="Beams")
            max_new = gr.Slider(1, 60, value=10, step=1, label="Max new tokens")
            min_len = gr.Slider(0, 20, value=0, step=1, label="Min length (new tokens)")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", interactive=False)
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", interactive=False)
            seed = gr.Number(value=0, precision=0, label="Seed", interactive=False)
        with gr.Row():
            length_penalty = gr.Slider(-2.0, 2.0, value=-1.0, step=0.1, label="Length penalty")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
    strategy.change(decoding_interactivity, strategy, [beams, length_penalty, temperature, top_p, seed],
                    api_visibility="private")
    return [strategy, beams, max_new, min_len, temperature, top_p, length_penalty, repetition_penalty, seed]


def _examples(chat_in: gr.MultimodalTextbox) -> None:
    ex = {n: str(server.ASSETS / n) for n in server.EXAMPLES}
    gr.Examples([[{"text": "what color is the circle?", "files": [ex["red-circle.png"]]}],
                 [{"text": "how many shapes are there?", "files": [ex["three-shapes.png"]]}],
                 [{"text": "where is the yellow triangle?", "files": [ex["blue-square-yellow-triangle.png"]]}],
                 [{"text": "is there a purple triangle?", "files": [ex["novel-purple-triangle.png"]]}]],
                inputs=[chat_in], label="Examples")


def build() -> gr.MultimodalTextbox:
    """The Chat tab; returns its input box (the scene composer sends scenes to it)."""
    with gr.Tab("Chat", id="chat"):
        chat_state = gr.State(new_chat())
        chatbot = gr.Chatbot(label="Chat about one image", height=380, elem_id="chatbot", elem_classes="pixelated")
        chat_in = gr.MultimodalTextbox(file_types=["image"], file_count="single", show_label=False,
                                       elem_id="chat-input", placeholder="Drop an image, then ask about it "
                                                                         "(a new image starts a new conversation)")
        with gr.Row():
            retry_btn = gr.Button("Retry", size="sm")
            undo_btn = gr.Button("Undo", size="sm")
            clear_btn = gr.Button("Clear", size="sm")
        prompt_box = gr.Textbox(label="Prompt the LLM saw", interactive=False, lines=2)
        controls = _decoding_controls()
        seed = controls[-1]
        _examples(chat_in)
        chat_in.submit(chat, [chat_in, chat_state] + controls, [chatbot, chat_in, prompt_box, chat_state],
                       api_name="chat")
        retry_btn.click(chat_retry, [chat_state] + controls, [chatbot, prompt_box, chat_state, seed],
                        api_name="chat_retry")
        chatbot.retry(chat_retry, [chat_state] + controls, [chatbot, prompt_box, chat_state, seed],
                      api_visibility="private")
        undo_btn.click(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_name="chat_undo")
        chatbot.undo(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_visibility="private")
        clear_btn.click(chat_clear, None, [chatbot, chat_in, prompt_box, chat_state], api_name="chat_clear")
    return chat_in
