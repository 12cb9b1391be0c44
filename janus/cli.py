"""The `janus` command: generate, chat, convert, info, serve, eval."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from .pipeline import ChatStream

CFG_HELP = "classifier-free guidance weight (default: the checkpoint's guidance_scale in generation_config.json, else 5)"
TEMPERATURE_HELP = "image sampling temperature, 0 greedy (default: the checkpoint's temperature in generation_config.json, else 1)"
CANDIDATES_HELP = "draw this many images for each one kept, keeping the best by --rank-by (default 1)"
RANK_CHOICES = ("likelihood", "match", "questions")  # janus.eval.clause_judge.RANK_CHOICES; not imported, as the CLI loads torch lazily
RANK_HELP = (
    "how candidates are ranked: likelihood (of their codes under the model; the default), match (the model's yes/no judgement "
    "that the image shows the prompt, for models trained to give it) or questions (the model's answers to questions that check "
    "each clause of a shapes-world prompt)"
)


def make_grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _load(args: argparse.Namespace):
    import janus

    return janus.load(args.model, device=args.device, dtype=args.dtype)


def cmd_generate(args: argparse.Namespace) -> None:
    from .eval.clause_judge import check_prompt, ranking

    check_prompt(args.rank_by, args.prompt)
    model = _load(args)
    images = model.generate_image(
        args.prompt, n=args.n, cfg_weight=args.cfg, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, progress=True, batch_size=args.batch_size, candidates=args.candidates,
        rank_by=ranking(model, args.rank_by),
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(out / f"{i:03d}.png")
    make_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")


def _print_answer(stream: ChatStream) -> str:
    """Print an answer as it comes; say on stderr when --max-new-tokens (or the context) cut it short."""
    answer = ""
    for piece in stream:
        answer += piece
        print(piece, end="", flush=True)
    print()
    if stream.finish_reason == "length":
        print(f"[cut short after {stream.completion_tokens} tokens]", file=sys.stderr)
    return answer


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.question:
        _print_answer(model.chat(args.question, images=args.image, stream=True, **options))
        return
    # Interactive: the --image files go with the first question; an empty line or EOF ends the chat.
    history, images = [], list(args.image)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return
        if not question:
            return
        print("janus> ", end="", flush=True)
        answer = _print_answer(model.chat(question, images=images, history=history, stream=True, **options))
        history += [{"role": "user", "content": question, "images": images}, {"role": "assistant", "content": answer}]
        images = []


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import convert

    print(f"wrote {convert(args.src, args.dst, args.to)} ({args.to} layout)")


def cmd_tokenize_images(args: argparse.Namespace) -> None:
    from .data.codes import tokenize_images

    tokenize_images(args.data, args.model, args.out, device=args.device)
    print(f"wrote the VQ code cache to {args.out}")


def cmd_eval_shapes(args: argparse.Namespace) -> None:
    import json

    from .eval.shapes_eval import EVAL_SEED, evaluate, format_report

    seed = EVAL_SEED if args.seed is None else args.seed
    results = evaluate(
        _load(args), per_category=args.per_category, k=args.k, seed=seed, progress=True, cfg_weight=args.cfg,
        temperature=args.temperature, candidates=args.candidates, rank_by=args.rank_by,
    )
    results["settings"]["model"] = args.model
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))
    print(f"wrote {out}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import WeightFiles, read_config
    from .models.unified import JanusModel

    cfg, layout = read_config(args.path)
    files = WeightFiles(Path(args.path))
    with torch.device("meta"):
        model = JanusModel(cfg)
    print(f"{args.path}: {layout} layout, {len(set(files.sources.values()))} weight file(s)")
    d, v, q = cfg.decoder, cfg.vision, cfg.vq
    print(f"decoder  {d.n_layers} layers, width {d.dim}, {d.n_heads} heads ({d.n_kv_heads} kv), mlp {d.intermediate_size}, vocab {d.vocab_size}")
    print(f"vision   SigLIP {v.depth} blocks, width {v.width}, {v.image_size}px / {v.patch_size} = {v.num_patches} tokens")
    print(f"vq       codebook {q.codebook_size} x {q.codebook_dim}, {q.image_size}px -> {q.grid_size}x{q.grid_size} = {q.num_tokens} codes")
    print(f"roles    {cfg.roles[0]!r} / {cfg.roles[1]!r}")
    for part, module in model.named_children():
        n = sum(p.numel() for p in module.parameters())
        print(f"  {part:<12} {n / 1e6:10.2f} M parameters")
    dtypes = sorted({str(files.get(name).dtype).replace("torch.", "") for name in files.sources})
    print(f"stored dtypes: {', '.join(dtypes)}")


def cmd_serve(args: argparse.Namespace) -> None:
    model = _load(args)  # first, so that a missing model fails before the slow web imports
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as e:
        raise SystemExit(f"janus: error: serving needs {e.name}: pip install 'janus-unified[serve]'") from None
    name = Path(args.model).resolve().name if args.model else "janus"
    app = create_app(
        model, model_name=name, api_only=args.api_only, concurrency=args.concurrency, max_batch_images=args.max_batch_images
    )
    uvicorn.run(app, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus", description="Janus-style unified multimodal models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="checkpoint directory (default: $JANUS_MODEL or the built-in model)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
        p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: auto)")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    g.add_argument("-n", type=int, default=4, help="images to generate (default 4)")
    g.add_argument("-o", "--output", default="out", help="output directory (default ./out)")
    g.add_argument("--cfg", type=float, default=None, help=CFG_HELP)
    g.add_argument("--temperature", type=float, default=None, help=TEMPERATURE_HELP)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="images per batch (default: as many as fit)")
    g.add_argument("--candidates", type=int, default=1, help=CANDIDATES_HELP)
    g.add_argument("--rank-by", choices=RANK_CHOICES, default="likelihood", help=RANK_HELP)
    model_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="ask about images; interactive when no question is given")
    c.add_argument("question", nargs="?")
    c.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0)
    model_options(c)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("convert", help="rewrite a checkpoint in another layout")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--to", required=True, choices=("native", "official", "transformers"))
    v.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize-images", help="VQ-encode the generation images of a data set once, for training")
    t.add_argument("data", nargs="+", help="JSONL manifests or tar shards")
    t.add_argument("--model", required=True, help="checkpoint whose VQ tokenizer encodes the images")
    t.add_argument("--out", required=True, help="code cache directory (data.code_cache in a run config)")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_tokenize_images)

    s = sub.add_parser("serve", help="Gradio demo and HTTP API (OpenAI-style /v1/chat/completions, /v1/images/generations)")
    s.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    s.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: auto)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--api-only", action="store_true", help="serve the HTTP API without the Gradio demo")
    s.add_argument("--concurrency", type=int, default=4, help="requests admitted to the model queue at once (default 4)")
    s.add_argument("--max-batch-images", type=int, default=16, help="images drawn (candidates included) per merged batch of seedless requests (1: no merging)")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="benchmark", required=True)
    shapes = e.add_parser("shapes", help="exact generation, VQA, POPE and perplexity metrics on the shapes world")
    shapes.add_argument("--model", default=None, help="checkpoint directory (default: $JANUS_MODEL or the built-in model)")
    shapes.add_argument("--json", required=True, help="file to write the results to")
    shapes.add_argument("--seed", type=int, default=None, help="evaluation seed (default 1000; see docs/shapes.md)")
    shapes.add_argument("--k", type=int, default=4, help="images per generation prompt (default 4)")
    shapes.add_argument("--per-category", type=int, default=50, help="prompts / questions per category (default 50)")
    shapes.add_argument("--cfg", type=float, default=None, help=CFG_HELP)
    shapes.add_argument("--temperature", type=float, default=None, help=TEMPERATURE_HELP)
    shapes.add_argument("--candidates", type=int, default=1, help=CANDIDATES_HELP)
    shapes.add_argument("--rank-by", choices=RANK_CHOICES, default="likelihood", help=RANK_HELP)
    shapes.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    shapes.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: auto)")
    shapes.set_defaults(func=cmd_eval_shapes)

    i = sub.add_parser("info", help="describe a checkpoint directory")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"janus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
