"""The Gradio demo: a Chat tab (images + multi-turn, streamed answers) and a Generate tab (text to image).

Both tabs go through the shared `ModelWorker`, and Gradio's queue admits at most `concurrency` events
at once, so any number of browser users share the one model safely.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import AsyncIterator

import gradio as gr
from fastapi import FastAPI
from PIL import Image

from ..data.shapes import Scene, SceneObject, render
from ..eval.clause_judge import RANK_CHOICES
from .worker import ImageSettings, ModelWorker

# Prompts, pictures and questions of the shapes world (docs/shapes.md), so that the built-in model, the
# demo's default, can draw and answer them.
GENERATE_EXAMPLES = ["a red circle above a blue square", "three yellow stars", "a green triangle left of a purple cross"]
EXAMPLE_SCENES = {
    "circle-and-square.png": Scene((SceneObject("circle", "red", "large", 0.5, 0.28), SceneObject("square", "blue", "large", 0.5, 0.72))),
    "three-squares.png": Scene(tuple(SceneObject("square", "yellow", "large", x, y) for x, y in ((0.25, 0.3), (0.5, 0.5), (0.75, 0.3)))),
}
CHAT_EXAMPLES = [("What colour is the circle?", "circle-and-square.png"), ("How many squares are there?", "three-squares.png")]


def write_example_images(directory: Path) -> dict[str, Path]:
    """The chat examples' pictures by name, rendered here so that the package ships no binaries."""
    paths = {name: directory / name for name in EXAMPLE_SCENES}
    for name, scene in EXAMPLE_SCENES.items():
        render(scene).save(paths[name])
    return paths


def chat_messages(turns: list[dict]) -> list[dict]:
    """Janus history turns -> Chatbot messages, each turn's images shown before its text."""
    return [{"role": t["role"], "content": [*({"path": p} for p in t.get("images", [])), t["content"]]} for t in turns]


def build_demo(worker: ModelWorker, example_images: dict[str, Path]) -> gr.Blocks:
    async def answer(
        message: dict, turns: list[dict], temperature: float, top_p: float, max_tokens: float, seed: float
    ) -> AsyncIterator[tuple]:
        if not message["text"].strip():
            raise gr.Error("Type a question first.")
        question = {"role": "user", "content": message["text"], "images": list(message["files"])}
        options = dict(
            max_new_tokens=int(max_tokens), temperature=temperature, top_p=None if top_p >= 1 else top_p,
            seed=None if seed < 0 else int(seed),
        )
        reply = {"role": "assistant", "content": ""}
        yield chat_messages([*turns, question, reply]), turns, None  # show the question, clear the box
        try:
            async for piece in worker.chat(question["content"], question["images"], turns, **options):
                reply["content"] += piece
                yield chat_messages([*turns, question, reply]), turns, None
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from None
        yield chat_messages([*turns, question, reply]), [*turns, question, reply], None

    async def generate(
        prompt: str, n: float, cfg_weight: float, temperature: float, seed: float, candidates: float, rank_by: str,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # follows the pipeline's tqdm bar
    ) -> list[Image.Image]:
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        progress(0, desc="waiting for the model")
        settings = ImageSettings(cfg_weight=cfg_weight, temperature=temperature, candidates=int(candidates), rank_by=rank_by)
        try:
            return await worker.generate_images(
                prompt, int(n), settings, seed=None if seed < 0 else int(seed), progress=True
            )
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="Janus", analytics_enabled=False) as demo:
        gr.Markdown("# Janus\nAsk about images, or generate them from text. Requests share one model queue.")
        with gr.Tab("Chat"):
            turns = gr.State([])
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
            box = gr.MultimodalTextbox(
                placeholder="Attach images and ask about them", file_types=["image"], file_count="multiple",
                sources=["upload"], show_label=False, elem_id="chat-input",
            )
            with gr.Accordion("Sampling", open=False):
                chat_temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (1 = off)")
                max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                chat_seed = gr.Number(-1, precision=0, minimum=-1, label="Seed (-1 = random)")
            new_chat = gr.Button("New conversation")
            gr.Examples([[{"text": question, "files": [str(example_images[name])]}] for question, name in CHAT_EXAMPLES], inputs=[box])
            box.submit(answer, [box, turns, chat_temperature, top_p, max_tokens, chat_seed], [chatbot, turns, box])
            new_chat.click(lambda: ([], []), None, [chatbot, turns], queue=False)
        with gr.Tab("Generate"):
            prompt = gr.Textbox(label="Prompt", placeholder="a red circle above a blue square", elem_id="prompt")
            with gr.Row():
                n = gr.Slider(1, 8, value=4, step=1, label="Number of images")
                cfg_weight = gr.Slider(0, 20, value=worker.model.default_cfg_weight, step=0.5, label="CFG weight")
                temperature = gr.Slider(0, 2, value=worker.model.default_temperature, step=0.05, label="Temperature")
                seed = gr.Number(-1, precision=0, minimum=-1, label="Seed (-1 = random)")
                candidates = gr.Slider(1, 8, value=1, step=1, label="Candidates per image (the best is kept)")
                rank_by = gr.Dropdown(list(RANK_CHOICES), value="likelihood", label="Best by (questions: shapes-world prompts)")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(
                label="Images", format="png", columns=4, buttons=["download", "fullscreen"], elem_id="gallery"
            )
            gr.Examples([[p] for p in GENERATE_EXAMPLES], inputs=[prompt])
            inputs = [prompt, n, cfg_weight, temperature, seed, candidates, rank_by]
            button.click(generate, inputs, gallery)
            prompt.submit(generate, inputs, gallery)
    return demo


def mount_demo(app: FastAPI, worker: ModelWorker, concurrency: int) -> None:
    """Serve the demo at / of `app`, its queue running `concurrency` events at once."""
    examples_dir = Path(tempfile.mkdtemp(prefix="janus-serve-"))
    demo = build_demo(worker, write_example_images(examples_dir))
    demo.queue(default_concurrency_limit=concurrency)
    gr.mount_gradio_app(app, demo, path="/", ssr_mode=False, allowed_paths=[str(examples_dir)])
