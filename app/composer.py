"""The Scene composer tab: a shapes-world scene from a seed, from its six cells, or from a
description in the world's words (`blip2lab.worlds.shapes.world`), with its true caption
and record; a scene can be sent to the Chat, Caption and Search tabs."""

from __future__ import annotations

import gradio as gr

from app import server
from app.search import DIRECTIONS
from app.server import UserError, friendly, on_page
from blip2lab.worlds.shapes import world

CELLS = [(r, c) for r in world.ROWS for c in world.COLUMNS]


def _scene_outputs(scene: world.Scene) -> tuple[str, str, str]:
    return server.save_png(world.render(scene)), world.caption(scene), scene.to_json()


@friendly
def random_scene(seed: float = 0, novel: bool = False) -> tuple:
    """A random scene of 1-3 shapes.

    Parameters:
        seed: the same seed, the same scene
        novel: force one held-out pair (a purple triangle or an orange square), which no model saw in training
    Returns:
        the scene's image, its true caption, its record (JSON)
    """
    scene = world.sample_scene(int(seed), allow_held_out=bool(novel), require_held_out=bool(novel))
    return _scene_outputs(scene)


def _compose(cells: list) -> tuple:
    """18 values, three per cell in reading order: shape (or "" / "none"), color, size."""
    objects = []
    for (row, column), (shape, color, size) in zip(CELLS, zip(cells[0::3], cells[1::3], cells[2::3])):
        if not shape or shape == "none":
            continue
        objects.append(world.place_object(shape, color or "red", size or "large", row, column))
    if not objects:
        raise UserError("Put at least one shape in a cell.")
    return _scene_outputs(world.Scene(objects=objects))


@friendly
def compose_scene(top_left_shape: str = "none", top_left_color: str = "red", top_left_size: str = "large",
                  top_middle_shape: str = "none", top_middle_color: str = "red", top_middle_size: str = "large",
                  top_right_shape: str = "none", top_right_color: str = "red", top_right_size: str = "large",
                  bottom_left_shape: str = "none", bottom_left_color: str = "red", bottom_left_size: str = "large",
                  bottom_middle_shape: str = "none", bottom_middle_color: str = "red",
                  bottom_middle_size: str = "large", bottom_right_shape: str = "none",
                  bottom_right_color: str = "red", bottom_right_size: str = "large") -> tuple:
    """A shapes-world scene from its six cells (2 rows x 3 columns): in each, a shape or none.

    Parameters:
        top_left_shape: "circle", "square", "triangle", or "none" (an empty cell); likewise every *_shape
        top_left_color: red, green, blue, yellow, purple or orange; likewise every *_color
        top_left_size: "small" or "large"; likewise every *_size
    Returns:
        the scene's image, its true caption, its record (JSON)
    """
    return _compose([top_left_shape, top_left_color, top_left_size, top_middle_shape, top_middle_color,
                     top_middle_size, top_right_shape, top_right_color, top_right_size, bottom_left_shape,
                     bottom_left_color, bottom_left_size, bottom_middle_shape, bottom_middle_color,
                     bottom_middle_size, bottom_right_shape, bottom_right_color, bottom_right_size])


@friendly
def scene_from_text(text: str = "a large red circle on the top left") -> tuple:
    """A scene from a description in the world's words.

    Parameters:
        text: each shape fully described, e.g. "a large red circle on the top left and a small blue square on the
              bottom right"
    Returns:
        the scene's image, its true caption, its record (JSON)
    """
    found = world.parse_caption(text or "")
    if not found:
        raise UserError("Describe each shape fully: size, color, shape and place, e.g. "
                       "'a large red circle on the top left'.")
    cells = [(row, column) for *_, row, column in found]
    if len(set(cells)) != len(cells):
        raise UserError("Two shapes in the same cell: each cell holds one shape.")
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
                describe = gr.Textbox(value="", label="…or describe it", placeholder="a large red circle on the top left "
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
        for button, fn, inputs in ((random_btn, random_scene, [seed, novel]), (compose_btn, compose_scene, cell_inputs),
                                   (describe_btn, scene_from_text, [describe])):
            gr.on([], fn, inputs, outputs, api_name=fn.__name__)  # the API's, then the page's
            button.click(on_page(fn, 3), inputs, outputs, api_visibility="private")
        to_chat.click(lambda p: ({"text": "", "files": [p]} if p else None, gr.Tabs(selected="chat")),
                      [scene_image], [chat_in, tabs], api_visibility="private")
        to_caption.click(lambda p: (p, gr.Tabs(selected="caption")), [scene_image], [caption_image, tabs],
                         api_visibility="private")
        to_search.click(lambda p: (p, DIRECTIONS[1], gr.Tabs(selected="search")), [scene_image],
                        [search_image, direction, tabs], api_visibility="private")
