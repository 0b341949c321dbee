"""blip2lab.chat: a conversation fitted to the LLM's positions (oldest turns out first, then
the question cut, each as much as needed and no more), its prompt in the reference's
history format, and `Chat` remembering turns. Tiny random pipelines from test_pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import _pipeline

from blip2lab.chat import Chat, context_budget, fit_to_context, reply

torch.set_num_threads(1)
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
DECODING = dict(num_beams=1, max_new_tokens=4)


@pytest.fixture(scope="module")
def pipe():
    return _pipeline("decoder")


def prompt_tokens(pipe, prompt: str) -> int:
    return pipe.processor.generation_batch([prompt])["llm_ids"].shape[1]


def test_a_short_chat_is_kept_whole_in_the_reference_format(pipe):
    history = [("what is it?", "a dog"), ("what color?", "brown")]
    fitted = fit_to_context(pipe, history, "where is it?", 10)
    assert fitted.history == history and fitted.question == "where is it?"
    assert fitted.dropped_turns == 0 and not fitted.question_cut
    assert fitted.prompt == ("Question: what is it? Answer: a dog. Question: what color? Answer: brown. "
                             "Question: where is it? Answer:")
    assert fit_to_context(pipe, [], "where is it?", 10).prompt == pipe.processor.vqa_prompt("where is it?")


def test_the_budget_counts_visual_and_new_tokens(pipe):
    limit = pipe.model.llm.model.config.max_position_embeddings
    assert context_budget(pipe, 10) == limit - pipe.model.config.qformer.num_queries - 10


def test_a_long_chat_loses_its_oldest_turns_only_as_many_as_needed(pipe):
    history = [(f"how many dogs are on the table number {i}?", "two") for i in range(60)]
    budget = context_budget(pipe, 10)
    fitted = fit_to_context(pipe, history, "what color is it?", 10)
    kept = len(fitted.history)
    assert 0 < kept < len(history) and fitted.history == history[-kept:]
    assert fitted.dropped_turns == len(history) - kept and not fitted.question_cut
    assert fitted.question == "what color is it?" and prompt_tokens(pipe, fitted.prompt) <= budget
    one_more = pipe.processor.chat_prompt(history[-kept - 1:], "what color is it?")
    assert prompt_tokens(pipe, one_more) > budget  # the turn left out would not have fitted


def test_a_long_question_is_cut_to_its_longest_prefix_that_fits(pipe):
    question = "zq xj kv " * 100  # under max_question_chars (1000), far over the context in tokens
    budget = context_budget(pipe, 10)
    fitted = fit_to_context(pipe, [("what is it?", "a dog")], question, 10)
    assert fitted.history == [] and fitted.dropped_turns == 1 and fitted.question_cut
    assert question.startswith(fitted.question) and 0 < len(fitted.question) < len(question)
    assert prompt_tokens(pipe, fitted.prompt) <= budget
    rest = question[len(fitted.question):]  # the cut question lost its trailing spaces: add them and one character
    longer = question[:len(question) - len(rest.lstrip()) + 1]
    assert prompt_tokens(pipe, pipe.processor.chat_prompt([], longer)) > budget


def test_nothing_fits_when_the_new_tokens_take_the_whole_context(pipe):
    limit = pipe.model.llm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="one-character question"):
        fit_to_context(pipe, [], "what is it?", limit - pipe.model.config.qformer.num_queries)


def test_an_llm_without_position_limit_keeps_everything():
    t5 = _pipeline("encoder_decoder")
    history = [("what is it?", "a dog")] * 100
    fitted = fit_to_context(t5, history, "where is it?", 10)
    assert context_budget(t5, 10) is None and fitted.history == history and fitted.dropped_turns == 0


def test_reply_answers_the_fitted_prompt_and_chat_remembers(pipe):
    history = [("what is it?", "a dog")]
    out = reply(pipe, IMAGE, history, "where is it?", **DECODING)
    assert out.answer == pipe.answer(IMAGE, "where is it?", history=[history], **DECODING)[0]
    assert out.fitted.prompt == pipe.processor.chat_prompt(history, "where is it?")

    chat = Chat(pipe, IMAGE)
    first = chat.ask("what is it?", **DECODING)
    assert first.fitted.prompt == "Question: what is it? Answer:"
    second = chat.ask("where is it?", **DECODING)
    assert second.fitted.history == [("what is it?", first.answer)]
    assert chat.turns == [("what is it?", first.answer), ("where is it?", second.answer)]
