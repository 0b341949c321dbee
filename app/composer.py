"""The Scene composer tab: a shapes-world scene from a seed, from its six cells, or from a
description in the world's words (`blip2lab.worlds.shapes.world`), with its true caption
and record; a scene can be sent to the Chat, Caption and Search tabs."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app import server
from app.search import DIRECTIONS
from app.server import friendly
from blip2lab.worlds.shapes import world

CELLS = [(r, c) for r in world.ROWS for c in world.COLUMNS]


def _scene_outputs(scene: world.Scene) -> tuple[str, str, str]:
    return server.save_png(world.render(scene)), world.caption(scene), scene.to_json()


@friendly
def random_scene(seed: float = 0, novel: bool = False) -> tuple:
    """A random scene of 1-3 shapes; `novel` forces one held-out pair (purple triangle or
    orange square), which the model never saw in training."""
    scene = world.sample_scene(int(seed), allow_held_out=bool(novel), require_held_out=bool(novel))
    return _scene_outputs(scene)


@friendly
def compose_scene(*cells: Any) -> tuple:
    """18 values, three per cell in reading order (top left ... bottom right): shape (or
    "" / "none" for an empty cell), color, size."""
    if len(cells) != 3 * len(CELLS):
        raise gr.Error(f"compose_scene takes {3 * len(CELLS)} values (shape, color, size per cell)")
    objects = []
    for (row, column), (shape, color, size) in zip(CELLS, zip(cells[0::3], cells[1::3], cells[2::3])):
        if not shape or shape == "none":
            continue
        objects.append(world.place_object(shape, color or "red", size or "large", row, column))
    if not objects:
        raise gr.Error("Put at least one shape in a cell.")
    return _scene_outputs(world.Scene(objects=objects))


@friendly
def scene_from_text(text: str) -> tuple:
    """A scene from a description in the world's words, e.g. "a large red circle on the top
    left and a small blue square on the bottom right"."""
    found = world.parse_caption(text or "")
    if not found:
        raise gr.Error("Describe each shape fully: size, color, shape and place, e.g. "
                       "'a large red circle on the top left'.")
    cells = [(row, column) for *_, row, column in found]
    if len(set(cells)) != len(cells):
        raise gr.Error("Two shapes in the same cell: each cell holds one shape.")
    return _scene_outputs(world.Scene(objects=[world.place_object(shape, color, size, row, column)
                                               for size, color, shape, row, column in found]))


# ---------------------------------------------------------------------------------------
# The tab
# ---------------------------------------------------------------------------------------


def _cells() -> list:
    """Shape, color and size for each cell of the 2x3 grid, in reading order."""
    inputs = []
    for row in world.ROWS:
        with gr.Row():
            for column in world.COLUMNS:
                with gr.Group():
                    with gr.Row():
                        shape = gr.Dropdown(["none", *world.SHAPES], value="none", min_width=90,
                                            label=f"{row} {column}")
                        color = gr.Dropdown(list(world.COLORS), value="red", label="color", min_width=90)
                    size = gr.Radio(list(world.SIZES), value="large", show_label=False)
                    inputs += [shape, color, size]
    return inputs


def build(tabs: gr.Tabs, chat_in: gr.MultimodalTextbox, caption_image: gr.Image, search_image: gr.Image,
          direction: gr.Radio) -> None:
    """The tab; its Send buttons put the scene into the other tabs' inputs and switch to them."""
    with gr.Tab("Scene composer", id="composer"):
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    novel = gr.Checkbox(label="Include a held-out pair (purple triangle / orange square)")
                    random_btn = gr.Button("Random scene")
                cell_inputs = _cells()
                compose_btn = gr.Button("Compose", variant="primary")
                describe = gr.Textbox(label="…or describe it", placeholder="a large red circle on the top left "
                                                                           "and a small blue square on the bottom right")
                describe_btn = gr.Button("Compose from description")
                gr.Examples([["a large red circle on the top left"],
                             ["a small purple triangle on the bottom middle and a large green square on the top right"]],
                            inputs=[describe], label="Examples")
            with gr.Column(scale=1):
                scene_image = gr.Image(type="filepath", label="Scene", interactive=False, height=256,
                                       elem_id="scene-image", elem_classes="pixelated")
                scene_caption = gr.Textbox(label="Its true caption", interactive=False)
                scene_json = gr.Code(label="Scene record", language="json", interactive=False)
                with gr.Row():
                    to_chat = gr.Button("Send to Chat")
                    to_caption = gr.Button("Send to Caption & attention")
                    to_search = gr.Button("Send to Search")
        outputs = [scene_image, scene_caption, scene_json]
        random_btn.click(random_scene, [seed, novel], outputs, api_name="random_scene")
        compose_btn.click(compose_scene, cell_inputs, outputs, api_name="compose_scene")
        describe_btn.click(scene_from_text, [describe], outputs, api_name="scene_from_text")
        to_chat.click(lambda p: ({"text": "", "files": [p]} if p else None, gr.Tabs(selected="chat")),
                      [scene_image], [chat_in, tabs], api_visibility="private")
        to_caption.click(lambda p: (p, gr.Tabs(selected="caption")), [scene_image], [caption_image, tabs],
                         api_visibility="private")
        to_search.click(lambda p: (p, DIRECTIONS[1], gr.Tabs(selected="search")), [scene_image],
                        [search_image, direction, tabs], api_visibility="private")
