"""The `janus` command, run in-process through its main()."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from janus.cli import main
from janus.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def test_generate_writes_pngs_and_grid(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a red circle", "-n", "3", "-o", str(out), "--model", str(ckpt), "--seed", "1", "--candidates", "2"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["000.png", "001.png", "002.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 64)  # 2 x 2 cells of 32 px
    assert "wrote 3 images" in capsys.readouterr().out
    judged = tmp_path / "judged"
    args = ["-n", "2", "-o", str(judged), "--model", str(ckpt), "--seed", "1", "--candidates", "2", "--rank-by", "questions"]
    assert main(["generate", "a red circle above a blue square", *args]) == 0
    assert sorted(p.name for p in judged.iterdir()) == ["000.png", "001.png", "grid.png"]


def test_chat_one_question_and_interactive(ckpt, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "a.png")
    assert main(["chat", "--model", str(ckpt), "--image", str(tmp_path / "a.png"), "--max-new-tokens", "6", "what is it?"]) == 0
    one_shot, notice = capsys.readouterr()
    assert one_shot.strip()
    assert notice == "[cut short after 6 tokens]\n"  # this random model says no EOS in its first 6 tokens
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it?\nand then?\n"))
    assert main(["chat", "--model", str(ckpt), "--image", str(tmp_path / "a.png"), "--max-new-tokens", "6"]) == 0
    session = capsys.readouterr().out
    assert session.count("janus> ") == 2
    assert one_shot.strip() in session  # the first interactive answer equals the one-shot answer (greedy)


def test_convert_round_trip_and_info(ckpt, tmp_path, capsys):
    official, hf, back = tmp_path / "official", tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(ckpt), str(official), "--to", "official"]) == 0
    assert main(["convert", str(official), str(hf), "--to", "transformers"]) == 0
    assert main(["convert", str(hf), str(back), "--to", "native"]) == 0
    assert (back / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert (back / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["info", str(hf)]) == 0
    info = capsys.readouterr().out
    assert "transformers layout" in info and "decoder  2 layers, width 64" in info and "float32" in info


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("janus: error:") and "is not a directory" in err and "Traceback" not in err
    assert main(["generate", "x", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["generate", "a dog", "--rank-by", "questions", "--candidates", "2", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read 'a dog' as objects" in err and "Traceback" not in err


def test_tokenize_images_writes_a_cache_training_can_use(ckpt, tmp_path, capsys):
    from janus.data.codes import CodeCache
    from janus.testing import write_toy_dataset

    manifests = write_toy_dataset(tmp_path / "data")
    assert main(["tokenize-images", *manifests["generation"], "--model", str(ckpt), "--out", str(tmp_path / "codes")]) == 0
    cache = CodeCache.load(tmp_path / "codes")
    assert len(cache.rows) == 4  # the four toy images
