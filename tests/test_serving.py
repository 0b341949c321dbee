"""`choose_photo_model`: which model answers photos in the app, for each kind of machine. The
hub and the GPU are given, so nothing here reaches a network."""

import pytest

from blip2lab.pipeline import PRESETS
from blip2lab.serving import DEFAULT_PHOTO_MODEL, MINIREAL, choose_photo_model, gpu_present, hub_reachable


@pytest.mark.parametrize("env, hub, gpu, expect", [
    ({}, True, True, (DEFAULT_PHOTO_MODEL, "cuda", "float16", True, None)),  # a GPU Space
    ({"SPACES_ZERO_GPU": "true"}, True, None, (DEFAULT_PHOTO_MODEL, "cuda", "float16", True, None)),  # ZeroGPU
    ({}, True, False, (MINIREAL, "cpu", None, False, DEFAULT_PHOTO_MODEL)),  # CPU Space: a note, an opt-in
    ({"BLIP2LAB_PHOTO_ON_CPU": "1"}, True, False, (DEFAULT_PHOTO_MODEL, "cpu", "auto", True, None)),  # opted in
    ({}, False, True, (MINIREAL, "cuda", None, False, None)),  # no hub: mini-real, wherever it runs
    ({"BLIP2LAB_PHOTO_MODEL": "Salesforce/blip2-flan-t5-xl"}, None, True,
     ("Salesforce/blip2-flan-t5-xl", "cuda", "bfloat16", True, None)),  # the variable wins; T5 never fp16
    ({"BLIP2LAB_PHOTO_MODEL": MINIREAL}, None, True, (MINIREAL, "cuda", None, False, None)),
])
def test_the_choice_per_machine(env, hub, gpu, expect):
    choice = choose_photo_model(env, hub=hub, gpu=gpu)
    assert (choice.source, choice.device, choice.llm_dtype, choice.official, choice.opt_in) == expect
    assert choice.reason
    if choice.opt_in:
        assert "BLIP2LAB_PHOTO_ON_CPU=1" in choice.note and "no GPU" in choice.note


def test_the_variable_is_honoured_on_a_cpu_with_a_warning():
    choice = choose_photo_model({"BLIP2LAB_PHOTO_MODEL": DEFAULT_PHOTO_MODEL}, hub=None, gpu=False)
    assert (choice.source, choice.device, choice.llm_dtype) == (DEFAULT_PHOTO_MODEL, "cpu", "auto")
    assert "minutes per answer" in choice.note


def test_detection_without_a_network():
    assert not hub_reachable({"HF_HUB_OFFLINE": "1"})
    assert hub_reachable({"SPACE_ID": "someone/blip2lab"})
    assert gpu_present({"SPACES_ZERO_GPU": "true"})
    assert MINIREAL in PRESETS  # the fallback is shipped
