"""Build the built-in default model end to end on the shapes world (docs/default_model.md):

    python stages/build_default_model.py [--root runs/default] [--install]

1. the shapes data set (64 px, training and held-out splits)
2. stage 0: the VQ image tokenizer (configs/default/vq.yaml)
3. a sentencepiece text tokenizer trained on the training split's text
4. a freshly initialised model around them (configs/models/shapes.yaml): the stage-0 export
5. the VQ codes of every generation image (`janus tokenize-images`)
6. stages 1, 2 and 3 (configs/default/run.yaml)
7. phase 2 (configs/default/refit.yaml): the understanding encoder pretrained on each patch's shape and
   colour (stage 0, configs/default/vit.yaml) replaces the model's own, which stages 1-2 kept random
   and frozen; a stage-1 run realigns the adaptors to it, and stage 3 continues on 60,000 more scenes
8. phase 3: stage 3 continues twice more, each time with a fresh warm-up and decay and 60,000 more
   scenes (configs/default/extend.yaml, then configs/default/extend2.yaml)
9. phase 4: stage 3 continues once more on 60,000 more scenes, with each scene's questions asked in
   one multi-turn conversation (configs/default/extend3.yaml)
10. phase 5 (configs/default/position.yaml): phase 4's encoder trained further to also tell where each
   object's centre is (stage 0, configs/default/vit_centre.yaml) replaces its own; a stage-1 run
   realigns the adaptors; then two rounds (PHASE5_ROUNDS) of two drills (configs/default/drill.yaml:
   shape-of-colour, then relation questions alone; position, then relation questions alone), each
   followed by stage 3 on the whole mixture, with 60,000 more scenes and the binding questions
11. phase 6 (configs/default/raster.yaml): rounds (PHASE6_ROUNDS) of 60,000 new scenes whose
   captions name objects in the order the 8 x 8 token image draws them (`write_dataset(raster=8)`),
   each followed by stage 3 on all such scenes so far and the binding questions
12. phase 7 (configs/default/vq_decoder.yaml): the VQ's decoder refitted on phase 6's last scenes, its
   encoder and codebook frozen so that every image keeps its codes, and put into the model; the
   model's image sampling defaults (GUIDANCE_SCALE, TEMPERATURE) go to its generation_config.json
13. phase 8 (configs/default/self_train.yaml): the model draws SELF_CANDIDATES pictures for each of
   SELF_CAPTIONS captions of new scenes, its own answers to each caption's clause questions keep the
   best (janus.train.self_generate), and stage 3 trains on the confident picks, with 60,000 new
   scenes' conversations (a question of every type each) and the binding questions
14. phase 9: drills of the binding questions that name an object with a same-shape look-alike
   (LOOKALIKE_DRILLS, `write_lookalike_questions`), then the mixture with them
   (configs/default/lookalike_mix.yaml), understanding alone (lookalike_recover.yaml), the mixture
   again with 20,000 fresh rendered scenes as generation data (lookalike_regen.yaml), and the result
   averaged with phase 8, weight for weight (LOOKALIKE_WEIGHT, `interpolate_models`)
15. phase 10 (configs/default/counting.yaml): phase 9's mixture again with count conversations
   (`write_count_questions`) on the scenes of three earlier sets, averaged with phase 9
   (COUNTING_WEIGHT)
16. `janus eval shapes` on the result, with the sampling defaults
17. with --install: copy the result into janus/default_model, where `janus.load(None)` finds it

A step whose output exists is skipped and an interrupted stage resumes from its last checkpoint, so
running the command again continues a build. Wall time per step goes to ROOT/timings.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENES = 60_000
MORE_SCENES = 60_000  # new scenes (another seed) for each later step: phase 2, both steps of phase 3, phases 4, 5 and 6
BINDING_SCENES = 40_000  # scenes of two shapes or more, with the questions of phase 5's drills
# Phase 5's two rounds, each in its own working directory: drills (configs/default/drill.yaml: their
# directory, the data_bind questions they train on, the seed), then stage 3 on the whole mixture
# (configs/default/position.yaml, with these overrides).
PHASE5_ROUNDS = (
    ("position", (("drill_shape", "shape_questions", 21), ("drill_relation", "relation_questions", 22)), ()),
    ("position2", (("drill_position", "position_questions", 31), ("drill_relation", "relation_questions", 32)),
     ("train.steps=3000", "optim.decay_steps=1500", "train.seed=33")),
)
# Phase 6's rounds: the working directory (its scenes go to data_<name>, their codes to codes_<name>),
# the scenes' seed, and stage 3's steps and seed, on every round's scenes so far.
PHASE6_ROUNDS = (("raster", 12, 3000, 40), ("raster2", 13, 4000, 41), ("raster3", 14, 5000, 42),
                 ("raster4", 15, 5000, 43), ("raster5", 16, 5000, 44))
RASTER = 8  # image tokens per side (64 px, the VQ's 8x downsampling)
# CFG 5 over-sharpens this small model; 2 and temperature 0.7 measured best (docs/default_model.md,
# "Sampling defaults").
GUIDANCE_SCALE = 2.0
TEMPERATURE = 0.7
TOKENIZER_VOCAB = 512
# Phase 8: captions drawn, candidates per caption, and the judge score a pick needs to be trained on:
# log(1/2), the model at least even odds that every clause of the caption holds.
SELF_CAPTIONS = 6_000
SELF_CANDIDATES = 4
SELF_MIN_SCORE = math.log(0.5)
# Phase 9's drills of look-alike questions (configs/default/drill.yaml), one after the other: their
# directory, steps, steps of decay, seed, and how many more times the position questions are listed
# (a sixth of the look-alike questions, which the first two drills did not teach).
LOOKALIKE_DRILLS = (("lookalike_drill1", 1000, 300, 73, 0), ("lookalike_drill2", 2000, 700, 74, 0), ("lookalike_drill3", 5000, 1000, 76, 3))
RASTER9_SCENES = 20_000  # fresh rendered scenes for phase 9's last training run
# Phase 9's result: phase 8 + LOOKALIKE_WEIGHT * (the look-alike model - phase 8), weight for weight.
# 0.7 / 0.8 / 0.9 gave generation 0.915 / 0.907 / 0.893, VQA 0.947 / 0.947 / 0.950 and POPE accuracy
# 0.827 / 0.883 / 0.917 (seed 1000): 0.8 keeps generation above 0.90 with POPE well above 0.7's.
LOOKALIKE_WEIGHT = 0.8
# Phase 10's result: phase 9 + COUNTING_WEIGHT * (the counting run - phase 9). 0.7 / 0.85 / 1.0 gave
# generation 0.908 / 0.914 / 0.900 and VQA 0.953 / 0.960 / 0.970 on seed 1000, and over seeds 1000,
# 2000 and 3000 a mean generation of 0.916 / 0.911 / 0.907: 0.7 keeps phase 9's generation.
COUNTING_WEIGHT = 0.7
STAGE_SCRIPTS = {1: "stage1_adaptors.py", 2: "stage2_pretrain.py", 3: "stage3_sft.py"}


def training_texts(data: Path, roles: tuple[str, str]):
    """Every string the model reads or writes in training, rendered as the data pipeline renders it
    (chat template, system prompt), so the roles and the system prompt get pieces of their own."""
    from janus.processing.chat import DEFAULT_SYSTEM_PROMPT, generation_prompt, render_chat

    for kind in ("generation", "understanding", "text"):
        with open(data / "train" / f"{kind}.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if kind == "generation":
                    yield generation_prompt(record["caption"], roles)
                elif kind == "text":
                    yield record["text"]
                else:
                    yield render_chat(record["conversation"], roles, DEFAULT_SYSTEM_PROMPT)


def listed(paths: list[Path]) -> str:
    """A list of paths as a `--set` value."""
    return "[" + ",".join(map(str, paths)) + "]"


def overrides(settings: list[str] | tuple[str, ...]) -> list[str]:
    """`--set` arguments for config settings "key=value"."""
    return [arg for item in settings for arg in ("--set", item)]


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the built-in default model on the shapes world")
    parser.add_argument("--root", default="runs/default", help="working directory of the build (default runs/default)")
    parser.add_argument("--install", action="store_true", help="copy the result into janus/default_model")
    args = parser.parse_args()
    root = (REPO / args.root).resolve()
    root_setting = ["--set", f"root={root}"]
    timings_file = root / "timings.json"
    root.mkdir(parents=True, exist_ok=True)
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def step(name: str, output: Path, action) -> None:
        if output.exists():
            print(f"[{name}] done already: {output}")
            return
        print(f"[{name}] ...", flush=True)
        started = time.perf_counter()
        action()
        timings[name] = round(time.perf_counter() - started, 1)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")

    import janus
    from janus.data.shapes import merge_conversations, write_binding_dataset, write_count_questions, write_dataset, write_lookalike_questions
    from janus.models.config import JanusConfig
    from janus.pipeline import DEFAULT_MODEL_DIR, GENERATION_CONFIG
    from janus.processing.tokenizer import train_sentencepiece
    from janus.train.assemble import assemble_model, interpolate_models, refit_encoder, refit_vq_decoder
    from janus.train.self_generate import keep_confident, write_judged_generations

    cfg = JanusConfig.preset("shapes")
    data = root / "data"
    step("data", data / "heldout" / "scenes.jsonl", lambda: write_dataset(data, SCENES, seed=0, resolution=64, splits={"train": 0.95, "heldout": 0.05}))
    vq = root / "vq"
    step("stage0_vq", vq / "vq.safetensors", lambda: run(sys.executable, "stages/stage0_vq.py", "--config", "configs/default/vq.yaml", "--set", f"out={vq}",
                                                          "--set", f"train_data=[{data}/train/generation.jsonl]", "--set", f"heldout_data=[{data}/heldout/generation.jsonl]"))
    tokenizer = root / "tokenizer"
    step("tokenizer", tokenizer / "tokenizer.model", lambda: train_sentencepiece(training_texts(data, cfg.roles), tokenizer, TOKENIZER_VOCAB))
    stage0 = root / "stage0" / "export"
    step("assemble", stage0, lambda: assemble_model(cfg, vq / "vq.safetensors", tokenizer, stage0))
    codes = root / "codes"
    step("tokenize_images", codes, lambda: run(sys.executable, "-m", "janus.cli", "tokenize-images", str(data / "train" / "generation.jsonl"),
                                               "--model", str(stage0), "--out", str(codes)))
    for stage, script in STAGE_SCRIPTS.items():
        step(f"stage{stage}", root / f"stage{stage}" / "export",
             lambda script=script: run(sys.executable, f"stages/{script}", "--config", "configs/default/run.yaml", "--resume", *root_setting))
    # Phase 2. (The encoder pretraining came after phase 1 had run; refitting cost 45 min where a
    # rebuild from stage 1 with the pretrained encoder would cost 3 h on this CPU.)
    vit = root / "vit"
    step("stage0_vit", vit / "vit.safetensors", lambda: run(sys.executable, "stages/stage0_vit.py", "--config", "configs/default/vit.yaml", "--set", f"out={vit}",
                                                            "--set", f"train_scenes=[{data}/train/scenes.jsonl]", "--set", f"heldout_scenes=[{data}/heldout/scenes.jsonl]"))

    def new_scenes(name: str, codes_dir: str, seed: int, raster: int | None = None) -> None:
        """MORE_SCENES training scenes in root/name and their generation images' codes in root/codes_dir
        (`raster`: as `write_dataset`'s)."""
        out = root / name
        step(name, out / "train" / "scenes.jsonl", lambda: write_dataset(out, MORE_SCENES, seed=seed, resolution=64, splits={"train": 1.0}, raster=raster))
        step(f"tokenize_{name}", root / codes_dir, lambda: run(sys.executable, "-m", "janus.cli", "tokenize-images", str(out / "train" / "generation.jsonl"),
                                                               "--model", str(stage0), "--out", str(root / codes_dir)))

    def continue_stage3(name: str, config: str | None = None, settings: list[str] | tuple[str, ...] = ()) -> None:
        """Stage 3 in root/name, run by configs/default/{config or name}.yaml with `settings` ("key=value")."""
        step(name, root / name / "stage3" / "export", lambda: run(
            sys.executable, "stages/stage3_sft.py", "--config", f"configs/default/{config or name}.yaml", "--resume", "--set", f"root={root / name}",
            *overrides(settings)))

    new_scenes("data_more", "codes_more", seed=1)
    refit = root / "refit"
    step("refit_encoder", refit / "stage0" / "export", lambda: refit_encoder(root / "stage3" / "export", vit / "vit.safetensors", refit / "stage0" / "export"))
    for stage in (1, 3):
        step(f"refit_stage{stage}", refit / f"stage{stage}" / "export",
             lambda stage=stage: run(sys.executable, f"stages/{STAGE_SCRIPTS[stage]}", "--config", "configs/default/refit.yaml", "--resume", "--set", f"root={refit}"))
    # Phase 3.
    for name, scenes, codes_dir, seed in (("extend", "data_extra", "codes_extra", 2), ("extend2", "data_extra2", "codes_extra2", 3)):
        new_scenes(scenes, codes_dir, seed=seed)
        continue_stage3(name)
    # Phase 4.
    new_scenes("data_extra3", "codes_extra3", seed=4)

    def conversations(name: str) -> None:
        split = root / name / "train"
        step(f"conversations_{name}", split / "conversations.jsonl",
             lambda: merge_conversations(split / "understanding.jsonl", split / "conversations.jsonl"))

    for name in ("data", "data_more", "data_extra", "data_extra2", "data_extra3"):
        conversations(name)
    continue_stage3("extend3")
    # Phase 5.
    phase4 = root / "extend3" / "stage3" / "export"
    vit_centre = root / "vit_centre"
    step("stage0_vit_centre", vit_centre / "vit.safetensors", lambda: run(sys.executable, "stages/stage0_vit.py", "--config", "configs/default/vit_centre.yaml",
                                                                          "--set", f"out={vit_centre}", "--set", f"init_from={phase4}",
                                                                          "--set", f"train_scenes=[{data}/train/scenes.jsonl]", "--set", f"heldout_scenes=[{data}/heldout/scenes.jsonl]"))
    new_scenes("data_qa2", "codes_qa2", seed=11)
    conversations("data_qa2")
    bind = root / "data_bind"
    step("data_bind", bind / "shape_questions.jsonl", lambda: write_binding_dataset(bind, BINDING_SCENES, seed=9, resolution=64))
    position = root / "position"
    step("position_refit", position / "stage0" / "export", lambda: refit_encoder(phase4, vit_centre / "vit.safetensors", position / "stage0" / "export"))
    step("position_stage1", position / "stage1" / "export",
         lambda: run(sys.executable, "stages/stage1_adaptors.py", "--config", "configs/default/position.yaml", "--resume", "--set", f"root={position}"))
    final = position / "stage1" / "export"
    for name, drills, mix in PHASE5_ROUNDS:
        directory = root / name
        for drill, questions, seed in drills:
            step(f"{name}_{drill}", directory / drill / "stage3" / "export",
                 lambda drill=drill, questions=questions, seed=seed, start=final, directory=directory: run(
                     sys.executable, "stages/stage3_sft.py", "--config", "configs/default/drill.yaml", "--resume", "--set", f"root={directory / drill}",
                     "--set", f"init_from={start}", "--set", f"data.sources.understanding=[{bind / questions}.jsonl]", "--set", f"train.seed={seed}"))
            final = directory / drill / "stage3" / "export"
        step(f"{name}_stage3", directory / "stage3" / "export",
             lambda directory=directory, start=final, mix=mix: run(
                 sys.executable, "stages/stage3_sft.py", "--config", "configs/default/position.yaml", "--resume", "--set", f"root={directory}",
                 "--set", f"init_from={start}", *overrides(mix)))
        final = directory / "stage3" / "export"
    # Phase 6.
    raster_rounds: list[str] = []
    for name, seed, steps, train_seed in PHASE6_ROUNDS:
        new_scenes(f"data_{name}", f"codes_{name}", seed=seed, raster=RASTER)
        conversations(f"data_{name}")
        raster_rounds.append(name)
        files = {kind: [root / f"data_{r}" / "train" / f"{kind}.jsonl" for r in raster_rounds] for kind in ("conversations", "text", "generation")}
        settings = [
            f"init_from={final}",
            f"data.sources.understanding={listed([*files['conversations'], bind / 'understanding.jsonl'])}",
            f"data.sources.text={listed(files['text'])}", f"data.sources.generation={listed(files['generation'])}",
            f"data.code_cache={listed([root / f'codes_{r}' for r in raster_rounds])}", f"train.steps={steps}", f"train.seed={train_seed}",
        ]
        continue_stage3(name, "raster", settings)
        final = root / name / "stage3" / "export"
    # Phase 7.
    vq_decoder = root / "vq_decoder"
    step("stage0_vq_decoder", vq_decoder / "vq.safetensors", lambda: run(
        sys.executable, "stages/stage0_vq.py", "--config", "configs/default/vq_decoder.yaml", "--set", f"out={vq_decoder}", "--set", f"init_from={final}",
        "--set", f"train_data=[{root / f'data_{raster_rounds[-1]}' / 'train' / 'generation.jsonl'}]", "--set", f"heldout_data=[{data}/heldout/generation.jsonl]"))
    sharp = root / "sharp" / "export"
    step("refit_vq_decoder", sharp, lambda: refit_vq_decoder(final, vq_decoder / "vq.safetensors", sharp))
    # Always written: an export inherits the generation_config.json of the checkpoint it started from,
    # and phase 8 samples with these defaults.
    defaults = {"guidance_scale": GUIDANCE_SCALE, "temperature": TEMPERATURE}
    (sharp / GENERATION_CONFIG).write_text(json.dumps(defaults, indent=2) + "\n")
    # Phase 8.
    und = root / "data_und"
    step("data_und", und / "train" / "scenes.jsonl", lambda: write_dataset(und, MORE_SCENES, seed=17, resolution=64, splits={"train": 1.0}, questions_per_scene=7))
    conversations("data_und")
    judged = root / "data_self" / "judged.jsonl"
    step("data_self", judged, lambda: write_judged_generations(janus.load(sharp), judged.parent, SELF_CAPTIONS, seed=18, candidates=SELF_CANDIDATES))
    confident = judged.with_name("confident.jsonl")
    step("confident", confident, lambda: keep_confident(judged, confident, SELF_MIN_SCORE))
    continue_stage3("self_train")
    final = root / "self_train" / "stage3" / "export"
    # Phase 9.
    phase8 = final
    step("lookalike_questions", bind / "lookalike_position.jsonl", lambda: write_lookalike_questions(bind))
    for name, steps, decay, seed, position_repeats in LOOKALIKE_DRILLS:
        questions = [bind / "lookalike_questions.jsonl"] + [bind / "lookalike_position.jsonl"] * position_repeats
        continue_stage3(name, "drill", [f"init_from={final}", f"data.sources.understanding={listed(questions)}",
                                        f"train.steps={steps}", f"optim.decay_steps={decay}", f"train.seed={seed}"])
        final = root / name / "stage3" / "export"
    continue_stage3("lookalike_mix")
    continue_stage3("lookalike_recover")
    raster9 = root / "data_raster9"
    step("data_raster9", raster9 / "train" / "scenes.jsonl",
         lambda: write_dataset(raster9, RASTER9_SCENES, seed=21, resolution=64, splits={"train": 1.0}, raster=RASTER))
    continue_stage3("lookalike_regen")
    final = root / "lookalike" / "export"
    step("lookalike_average", final, lambda: interpolate_models(phase8, root / "lookalike_regen" / "stage3" / "export", LOOKALIKE_WEIGHT, final))
    # Phase 10.
    for name, scenes, seed in (("count_und", und / "train", 5), ("count_bind", bind, 6), ("count_raster9", raster9 / "train", 7)):
        step(name, scenes / "count_conversations.jsonl", lambda scenes=scenes, seed=seed: write_count_questions(scenes, seed))
    phase9 = final
    continue_stage3("counting")
    final = root / "counting_average" / "export"
    step("counting_average", final, lambda: interpolate_models(phase9, root / "counting" / "stage3" / "export", COUNTING_WEIGHT, final))
    # Beside the model it measures, so that a build continued with a later phase evaluates the new one.
    evaluation = final.parent / "eval.json"
    step("eval", evaluation, lambda: run(sys.executable, "-m", "janus.cli", "eval", "shapes", "--model", str(final), "--json", str(evaluation)))
    if args.install:
        staging = DEFAULT_MODEL_DIR.with_name(".default_model.new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(final, staging)
        report = json.loads(evaluation.read_text())
        report["settings"]["model"] = "built-in default model"  # not the build machine's path
        (staging / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(DEFAULT_MODEL_DIR, ignore_errors=True)
        staging.rename(DEFAULT_MODEL_DIR)
        print(f"installed {final} as {DEFAULT_MODEL_DIR}")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
