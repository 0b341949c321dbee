"""A tiny, randomly initialised shapes-world pipeline for the app's tests, saved as a
blip2lab folder: the shipped model's layout (64 px images, a Q-Former with ITC/ITM heads,
an OPT-like LLM) at a fraction of its size, built in about a second with no download.
Its answers are noise; tests that check real answers use the shipped `shapes-opt`.

    python tests/app_fixture.py /tmp/shapes-tiny-random     # build a folder by hand
"""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes-opt"


def shipped_model_available() -> bool:
    return (SHIPPED / "config.json").is_file() and (SHIPPED / "model.safetensors").is_file()


def _sentences() -> list[str]:
    from blip2lab.worlds.shapes import world

    rng = random.Random(0)
    out = []
    for scene in world.make_split("train", 300, seed=0):
        out.append("a photo of " + world.caption(scene) + "\n")
        for q, a, _ in world.questions(scene, rng):
            out.append(f"Question: {q} Answer: {a}\n")
    return out


def _tokenizers():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from blip2lab.processor import make_qformer_tokenizer
    from blip2lab.worlds.shapes import world

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(world.VOCABULARY) + list(world.PUNCTUATION)
    ids = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    wp = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    wp.decoder = decoders.WordPiece()
    qtok = make_qformer_tokenizer(PreTrainedTokenizerFast(
        tokenizer_object=wp, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        mask_token="[MASK]"))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_sentences(), trainer)
    ltok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    return qtok, ltok


def build_tiny_shapes_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a random shapes-like pipeline folder at `path` (`blip2lab.load` opens it)."""
    from transformers import OPTConfig, OPTForCausalLM

    from blip2lab.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
    from blip2lab.model.blip2 import Blip2
    from blip2lab.pipeline import Blip2Pipeline
    from blip2lab.processor import Blip2Processor

    qtok, ltok = _tokenizers()
    torch.manual_seed(seed)
    lm = OPTForCausalLM(OPTConfig(vocab_size=len(ltok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                  num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                  bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id,
                                  pad_token_id=ltok.pad_token_id))
    cfg = Blip2Config(
        vision=VisionConfig(image_size=64, patch_size=8, width=32, layers=2, heads=4, layer_index=-1),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=8,
                              cross_attention_freq=1, vocab_size=len(qtok), max_position_embeddings=64,
                              max_text_len=32, cls_token_id=qtok.cls_token_id, sep_token_id=qtok.sep_token_id,
                              pad_token_id=qtok.pad_token_id, dec_token_id=qtok.bos_token_id, init_std=0.15),
        llm=LLMConfig(kind="decoder", name_or_path="(random, tests/app_fixture.py)"),
        embed_dim=16)
    model = Blip2(cfg, language_model=lm)
    pipe = Blip2Pipeline(model, Blip2Processor.from_config(cfg, qtok, ltok), name=Path(path).name)
    return pipe.save(path)


if __name__ == "__main__":
    print(build_tiny_shapes_pipeline(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shapes-tiny-random"))


# ---------------------------------------------------------------------------------------
# The app in a subprocess, for the gradio_client and browser tests
# ---------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def model_for_tests(tmp_dir: Path) -> str:
    """The shipped shapes-opt when it is there, else a tiny random pipeline built in tmp_dir."""
    if shipped_model_available():
        return "shapes-opt"
    return str(build_tiny_shapes_pipeline(Path(tmp_dir) / "shapes-tiny-random"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py` on 127.0.0.1 and a free port, one torch thread; stopped by its pid."""

    def __init__(self, model: str, log: Path, gallery_size: int = 300, **env: str):
        import os
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        full_env = {**os.environ, "BLIP2LAB_MODEL": model, "BLIP2LAB_PORT": str(self.port),
                    "BLIP2LAB_HOST": "127.0.0.1", "BLIP2LAB_THREADS": "1", "BLIP2LAB_DEVICE": "cpu",
                    "BLIP2LAB_GALLERY_SIZE": str(gallery_size), "GRADIO_ANALYTICS_ENABLED": "False",
                    "OMP_NUM_THREADS": "1", **env}
        if "SPACE_ID" not in env:
            full_env.pop("SPACE_ID", None)  # local unless the test asks for hosted
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120) -> "AppProcess":
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "gradio_api/info", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"app.py did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
        self._log_file.close()


@contextmanager
def running_app(tmp_dir: Path, gallery_size: int = 300, **env: str):
    """The app on the test model (model_for_tests), serving until the block ends."""
    app = AppProcess(model_for_tests(tmp_dir), tmp_dir / "app.log", gallery_size=gallery_size, **env)
    try:
        yield app.wait()
    finally:
        app.stop()
