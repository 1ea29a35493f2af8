"""Several ReFTs in one batch: each example edited by its own ReFT (ops.multi_low_rank_edit, ReftModel adapters).

The reference for a mixed batch is each ReFT alone on the same batch (the active adapter, no adapter_names): the base
then runs the same shapes, so on the CPU in fp32 each example's logits and tokens must be bitwise equal.
"""

import hashlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, ops
from reft_fast.core.model import ReftModel
from reft_fast.core.positions import intervention_locations

VOCAB = 64
NEW_TOKENS = 4
# Three ReFTs of different types, ranks, layers, components and position specs (C: two interventions at one site,
# prefix and suffix; B: a NoReFT with a subtracted bias under an activation, two op steps).
REFTS = {
    "A": ([{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 4,
            "act_fn": "relu"}], "f1+l2", True),
    "B": ([{"layer": 1, "component": "mlp_output", "intervention": "nodireft", "low_rank_dimension": 2,
            "act_fn": "tanh"},
           {"layer": 2, "component": "block_output", "intervention": "noreft", "low_rank_dimension": 3,
            "act_fn": "gelu", "add_bias": True}], "l1", False),
    "C": ([{"layer": 0, "component": "block_output", "intervention": "consreft", "low_rank_dimension": 3},
           {"layer": 0, "component": "block_output", "intervention": "lobireft", "low_rank_dimension": 5}],
          "f2+l1", False),
}


def _tiny_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()
    model.generation_config.eos_token_id = None  # always NEW_TOKENS tokens
    model.generation_config.pad_token_id = 0
    return model


def _state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(ReftModel holding A, B, C over one base, the base's hash before any ReFT was attached)."""
    model = _tiny_llama()
    before = _state_hash(model)
    directories = {}
    for index, (name, (representations, positions, share)) in enumerate(REFTS.items()):
        torch.manual_seed(10 + index)
        reft = ReftModel(model, ReftConfig(representations, positions=positions, share_weights=share))
        with torch.no_grad():  # strong edits, so that the tokens visibly depend on them
            for p in reft.interventions.parameters():
                p.add_(torch.randn_like(p))
        directories[name] = tmp_path_factory.mktemp(f"reft_{name}")
        reft.save(directories[name])
        reft.remove_hooks()
    reft_model = ReftModel.load(directories["A"], model)
    for name in ("A", "B", "C"):
        reft_model.load_adapter(directories[name], name)
    return reft_model, before, directories


def _batch():
    """Six prompts of lengths 7, 4, 6, 7, 5, 3, left padded to 7."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 4, 6, 7, 5, 3])
    ids = torch.randint(3, VOCAB, (6, 7), generator=g)
    mask = (torch.arange(7)[None, :] >= (7 - lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}, lengths


NAMES = ["A", None, "B", "C", "A", "C"]


def _alone_locations(name, lengths, width=7):
    representations, positions, share = REFTS[name]
    return intervention_locations(lengths, positions, len(representations), share_weights=share,
                                  offsets=width - lengths)


def _alone(reft_model, name, run):
    """run() with ReFT ``name`` active (None: the plain base), the previously active one restored."""
    active = reft_model.active_adapter
    try:
        if name is None:
            return run(None)
        reft_model.set_adapter(name)
        return run(name)
    finally:
        reft_model.set_adapter(active)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_forward_equals_each_reft_alone(served, backend):
    reft_model, _, _ = served
    base, lengths = _batch()
    reft_model.backend = backend
    try:
        with torch.no_grad():
            _, mixed = reft_model(base, adapter_names=NAMES)
            references = {}
            for name in dict.fromkeys(NAMES):
                references[name] = _alone(reft_model, name, lambda n: reft_model.model(**base) if n is None else
                                          reft_model(base, intervention_locations=_alone_locations(n, lengths))[1])
    finally:
        reft_model.backend = None
    plain = references[None].logits
    for row, name in enumerate(NAMES):
        expected = references[name].logits[row]
        if backend == "torch":
            assert torch.equal(mixed.logits[row], expected), (row, name)
        else:  # the Triton interpreter (fp32 tl.dot, stacked zero-padded parameters): float rounding only
            torch.testing.assert_close(mixed.logits[row], expected, rtol=1e-5, atol=1e-5)
        if name is not None:
            assert not torch.allclose(expected, plain[row], atol=1e-3), f"ReFT {name} does not change row {row}"


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, do_sample=False, num_return_sequences=2)])
def test_mixed_batch_generate_equals_each_reft_alone(served, mode):
    reft_model, _, _ = served
    base, lengths = _batch()
    kwargs = dict(max_new_tokens=NEW_TOKENS, **mode)
    _, mixed = reft_model.generate(base, adapter_names=NAMES, **kwargs)
    copies = mode.get("num_return_sequences", 1)
    for name in dict.fromkeys(NAMES):
        alone = _alone(reft_model, name, lambda n: reft_model.model.generate(**base, **kwargs) if n is None else
                       reft_model.generate(base, intervention_locations=_alone_locations(n, lengths), **kwargs)[1])
        for row in [r for r, given in enumerate(NAMES) if given == name]:
            rows = slice(row * copies, (row + 1) * copies)
            assert torch.equal(mixed[rows], alone[rows]), (row, name)


def test_given_locations_and_sampling(served):
    reft_model, _, _ = served
    base, lengths = _batch()
    names = ["C", "C", "A", None, "A", "B"]
    given = {name: _alone_locations(name, lengths) for name in ("A", "B", "C")}
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=5)
    torch.manual_seed(7)
    _, from_spec = reft_model.generate(base, adapter_names=names, **kwargs)
    torch.manual_seed(7)
    _, from_given = reft_model.generate(base, adapter_names=names, intervention_locations=given, **kwargs)
    assert torch.equal(from_spec, from_given)


def test_loading_switching_deleting_leave_the_base_untouched(served):
    reft_model, before, directories = served
    assert _state_hash(reft_model.model) == before
    assert reft_model.loaded_adapters == ("default", "A", "B", "C")
    reft_model.set_adapter("B")
    assert reft_model.active_adapter == "B" and len(reft_model.interventions) == 2
    reft_model.load_adapter(directories["C"], "C2")
    with pytest.raises(ValueError, match="is the active one"):
        reft_model.delete_adapter("B")
    reft_model.set_adapter("default")
    reft_model.delete_adapter("C2")
    assert reft_model.loaded_adapters == ("default", "A", "B", "C")
    assert _state_hash(reft_model.model) == before
    with torch.no_grad():  # the plain rows of a mixed batch and the plain base agree
        base, _ = _batch()
        _, out = reft_model(base, adapter_names=[None] * 6)
        assert torch.equal(out.logits, reft_model.model(**base).logits)


def test_bad_inputs_say_what_is_wrong(served):
    reft_model, _, directories = served
    base, _ = _batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['Z'\]"):
            reft_model(base, adapter_names=["A", "Z", None, None, None, None])
        with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 6"):
            reft_model(base, adapter_names=["A", "B"])
        with pytest.raises(TypeError, match="adapter_names must be a list"):
            reft_model(base, adapter_names="A")
        with pytest.raises(ValueError, match="not unit_locations"):
            reft_model(base, {"sources->base": (None, [[[0]] * 6])}, adapter_names=["A"] * 6)
    with pytest.raises(RuntimeError, match="inference only"):
        reft_model(base, adapter_names=NAMES)
    with pytest.raises(ValueError, match="unknown adapter 'Z'"):
        reft_model.set_adapter("Z")
    with pytest.raises(ValueError, match="is loaded already"):
        reft_model.load_adapter(directories["A"], "A")


def test_op_each_example_its_own_entry_and_refusals():
    torch.manual_seed(0)
    B, T, d = 5, 7, 16
    h = torch.randn(B, T, d)
    R = torch.linalg.qr(torch.randn(d, 4))[0].T.contiguous()
    edits = [dict(Q=R, W=torch.randn(4, d), b=torch.randn(4), P=R, act="relu"),
             dict(Q=R[:2].contiguous(), b=torch.randn(2)),
             dict(Q=torch.randn(3, d), W=torch.randn(3, d), b=torch.randn(3), act="tanh")]
    positions = [torch.stack([torch.randperm(T)[:n] for _ in range(B)]) for n in (2, 3, 1)]
    edit_index = torch.tensor([0, 2, -1, 1, 0])
    with torch.no_grad():
        out = ops.multi_low_rank_edit(h, positions, edit_index, edits, backend="torch")
        for b, k in enumerate(edit_index.tolist()):
            alone = h if k < 0 else ops.low_rank_edit(h, positions[k], **edits[k], backend="torch")
            assert torch.equal(out[b], alone[b])
        with pytest.raises(ValueError, match="backend 'cuda' cannot edit each example"):
            import os
            os.environ["REFT_FAST_CUDA_SIM"] = "1"
            try:
                ops.multi_low_rank_edit(h, positions, edit_index, edits, backend="cuda")
            finally:
                del os.environ["REFT_FAST_CUDA_SIM"]
        with pytest.raises(ValueError, match=r"edit_index values must be −1 \(untouched\) or an entry 0..2"):
            ops.multi_low_rank_edit(h, positions, torch.tensor([0, 3, -1, 1, 0]), edits)
        with pytest.raises(ValueError, match=r"edits\[1\]: Q has hidden size 8"):
            ops.multi_low_rank_edit(h, positions, edit_index, [edits[0], dict(Q=torch.randn(2, 8)), edits[2]])
    with pytest.raises(RuntimeError, match="inference only"):
        ops.multi_low_rank_edit(h, positions, edit_index, [{**edits[0], "b": edits[0]["b"].requires_grad_()},
                                                           *edits[1:]])


def _word_tokenizer(directory):
    """A real fast tokenizer over a tiny word vocabulary, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def test_cli_generate_serves_a_prompts_file_with_a_reft_per_line(served, tmp_path):
    import json

    from reft_fast.train.cli import main
    from reft_fast.train.generation import generate_answers

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    tokenizer = _word_tokenizer(model_dir)
    prompts = [("w3 w7 w9 w11 w2", "A"), ("w5 w6", None), ("w8 w8 w4 w12", "B"), ("w20 w21 w22", "C"),
               ("w5 w6", "C")]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "reft": n}) + "\n" for p, n in prompts))
    output = tmp_path / "answers.jsonl"
    refts = [arg for name in ("A", "B", "C") for arg in ("--reft", f"{name}={directories[name]}")]
    assert main(["generate", *refts, "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "--output", str(output), "--no-chat-template", "--max-new-tokens", "3", "--batch-size", "4"]) in (0, None)
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(a["prompt"], a["reft"]) for a in answers] == prompts
    for (prompt, name), answer in zip(prompts, answers):  # each the same as that ReFT alone on that prompt
        alone = _alone(reft_model, name, lambda n: generate_answers(
            reft_model.model if n is None else reft_model, tokenizer, [prompt], chat_template=False,
            positions=None if n is None else REFTS[n][1], share_weights=False if n is None else REFTS[n][2],
            max_new_tokens=3))
        assert answer["answer"] == alone[0], (prompt, name)
    assert answers[1]["answer"] != answers[4]["answer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w3", "reft": "Z"}) + "\n")
    assert main(["generate", *refts, "--model", str(model_dir), "--prompts-file", str(bad)]) != 0


def test_cli_generate_encodes_each_prompt_as_its_reft_was_trained(served, tmp_path):
    """A ReFT trained with a system prompt (its train_config.yaml's data.system_prompt) answers a --prompts-file line
    as it does alone; every line was encoded with the first ReFT's settings."""
    import json
    import shutil

    import yaml

    from reft_fast.train.cli import main
    from reft_fast.train.generation import generate_answers

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    tokenizer = _word_tokenizer(model_dir)
    tokenizer.chat_template = "{% for m in messages %}w40 {{ m['content'] }} w41 {% endfor %}w42"
    tokenizer.save_pretrained(model_dir)
    with_system = tmp_path / "B_system"
    shutil.copytree(directories["B"], with_system)
    (with_system / "train_config.yaml").write_text(yaml.safe_dump({"data": {"system_prompt": "w30 w31 w32"}}))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w8 w8 w4 w12", "reft": "B"}) + "\n")
    output = tmp_path / "answers.jsonl"
    assert main(["generate", "--reft", f"A={directories['A']}", "--reft", f"B={with_system}", "--model",
                 str(model_dir), "--prompts-file", str(prompts_file), "--output", str(output),
                 "--max-new-tokens", "3"]) in (0, None)
    (answer,) = [json.loads(line)["answer"] for line in output.read_text().splitlines()]
    alone = _alone(reft_model, "B", lambda n: generate_answers(
        reft_model, tokenizer, ["w8 w8 w4 w12"], system_prompt="w30 w31 w32", positions=REFTS["B"][1],
        share_weights=REFTS["B"][2], max_new_tokens=3))
    unprompted = _alone(reft_model, "B", lambda n: generate_answers(
        reft_model, tokenizer, ["w8 w8 w4 w12"], positions=REFTS["B"][1], share_weights=REFTS["B"][2],
        max_new_tokens=3))
    assert alone != unprompted  # the system prompt changes the answer, so the comparison below can fail
    assert answer == alone[0]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"), ("\n  \n", "no prompts in it"),
    ('{"prompt": "w3", "reft": ["A"]}\n', ":1: unknown ReFT ['A']"),
    ('{"prompt": "w3", "reft": null}\n{"prompt": \n', ":2: not JSON"),
    # a misspelt key was answered by the base alone, silently
    ('{"prompt": "w3", "reft": "A"}\n{"prompt": "w4", "Reft": "B"}\n', ':2: no "reft" field')],
    ids=["missing", "empty", "reft-not-a-name", "malformed", "no-reft-key"])
def test_cli_generate_checks_the_prompts_file_before_loading_anything(served, tmp_path, capsys, content, message):
    """A missing or empty --prompts-file, or a bad line, is a config error naming the file, raised before the base is
    read (the --model given here does not exist, so reading it first would report that instead)."""
    from reft_fast.train.cli import main

    _, _, directories = served
    prompts_file = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts_file.write_text(content)
    refts = [arg for name in ("A", "B") for arg in ("--reft", f"{name}={directories[name]}")]
    assert main(["generate", *refts, "--model", str(tmp_path / "no-model"), "--prompts-file", str(prompts_file)]) == 2
    err = capsys.readouterr().err
    assert str(prompts_file) in err and message in err, err


def test_prompts_file_is_read_as_utf8_jsonl_with_a_bom_and_a_line_separator_in_a_prompt(tmp_path):
    """It was read in the locale's encoding (a BOM then broke the first line's JSON) and split by str.splitlines,
    which also cuts at U+2028 inside a string (JSON writes it unescaped); a file not in UTF-8 is named by its line."""
    import json

    from reft_fast.train.cli import _read_prompts_file
    from reft_fast.train.train_config import ConfigError

    path = tmp_path / "prompts.jsonl"
    prompts = ["caf\u00e9 \u2028 w3", "w4\u0085w5"]
    lines = [json.dumps({"prompt": p, "reft": "A"}, ensure_ascii=False) for p in prompts]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    records, numbers = _read_prompts_file(str(path), {"A": tmp_path})
    assert [r["prompt"] for r in records] == prompts and numbers == [1, 2]
    path.write_bytes(lines[0].encode("utf-8") + b"\n" + '{"prompt": "caf\u00e9"}'.encode("cp1252") + b"\n")
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: not UTF-8 text"):
        _read_prompts_file(str(path), {"A": tmp_path})


def test_cli_generate_output_and_base_only_with_a_prompts_file(served, tmp_path, capsys):
    """--output in a missing folder failed only when the answers were written (a traceback, every answer lost); it is
    made now, as eval makes its own. --output without --prompts-file, and --base-only with it, were ignored."""
    import json

    from reft_fast.train.cli import main

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    _word_tokenizer(model_dir)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w3", "reft": "A"}) + "\n")
    refts = [arg for name in ("A", "B") for arg in ("--reft", f"{name}={directories[name]}")]
    output = tmp_path / "new" / "answers.jsonl"
    assert main(["generate", *refts, "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "--no-chat-template", "--max-new-tokens", "2", "--output", str(output)]) == 0
    assert [json.loads(line)["prompt"] for line in output.read_text().splitlines()] == ["w3"]
    assert main(["generate", "--reft", str(directories["A"]), "--model", str(tmp_path / "no-model"), "--output",
                 str(tmp_path / "answers.jsonl"), "w3"]) == 2
    assert "config error: --output: only with --prompts-file" in capsys.readouterr().err
    # --base-only was ignored with --prompts-file: every line got its ReFT's answer
    assert main(["generate", *refts, "--model", str(model_dir), "--prompts-file", str(prompts_file), "--base-only"]) == 2
    assert 'config error: --base-only: with --prompts-file, a line with "reft": null' in capsys.readouterr().err


def test_cli_generate_names_an_absent_reft_and_an_output_folder_before_loading(served, tmp_path, capsys,
                                                                                monkeypatch):
    """A mistyped relative --reft (also a valid Hub repo id: runs/pirat) was reported as "--model: required"; an
    --output naming a folder failed only when the answers were written (a traceback, every answer lost)."""
    import json

    from reft_fast.train.cli import main

    _, _, directories = served
    monkeypatch.chdir(tmp_path)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w3", "reft": "A"}) + "\n")
    # with several ReFTs the error quotes the whole NAME=DIR (it named the directory alone)
    for refts, quoted in ((["--reft", "A=runs/pirat", "--reft", f"B={directories['B']}"], "A=runs/pirat"),
                          (["--reft", f"A={directories['A']}", "--reft", "B=../pirat"], "B=../pirat"),
                          (["--reft", "runs/pirat"], "runs/pirat")):
        files = ["--prompts-file", str(prompts_file)] if len(refts) > 2 else ["w3"]
        assert main(["generate", *refts, *files]) == 2
        err = capsys.readouterr().err
        assert f"config error: --reft {quoted}: no such directory" in err and "--model: required" not in err, err
    refts = [arg for name in ("A", "B") for arg in ("--reft", f"{name}={directories[name]}")]
    assert main(["generate", *refts, "--model", str(tmp_path / "no-model"), "--prompts-file", str(prompts_file),
                 "--output", str(tmp_path)]) == 2
    assert f"config error: --output {tmp_path}: a directory" in capsys.readouterr().err
    # --output naming the --prompts-file replaced the prompts by the answers
    assert main(["generate", *refts, "--model", str(tmp_path / "no-model"), "--prompts-file", str(prompts_file),
                 "--output", str(prompts_file)]) == 2
    assert f"config error: --output {prompts_file}: the --prompts-file itself" in capsys.readouterr().err
    # --model naming a folder that holds no model (a run directory) was a tokenizer traceback
    assert main(["generate", "--reft", str(directories["A"]), "--model", str(tmp_path), "w3"]) == 2
    assert f"config error: --model {tmp_path}: a folder without config.json" in capsys.readouterr().err


def test_cli_generate_names_a_reft_saved_for_another_base(served, tmp_path, capsys):
    """A --reft trained on another model is a config error naming it (it was ReftModel.load's ValueError, raised
    as a traceback)."""
    import json

    from reft_fast.train.cli import main

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    _word_tokenizer(model_dir)
    other_base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, vocab_size=VOCAB))
    other = ReftModel(other_base, ReftConfig([{"layer": 1, "component": "block_output", "intervention": "loreft",
                                               "low_rank_dimension": 2}], positions="l1"))
    other.save(tmp_path / "other")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w3 w7", "reft": "X"}) + "\n")
    args = ["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file), "--no-chat-template",
            "--max-new-tokens", "2", "--reft", f"A={directories['A']}", "--reft", f"X={tmp_path / 'other'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config error: --reft X={tmp_path / 'other'}: the ReFT model in" in err, err
    assert "saved for a different model" in err and "hidden_size: saved 16, model 32" in err, err


@pytest.mark.parametrize("line, message", [
    ({"prompt": "", "reft": "B"}, ":3: encodes to no tokens"),
    ({"prompt": "w3 " * 14, "reft": None}, ":3: 14 prompt tokens + max_new_tokens 3 exceed the model's 16 positions"),
], ids=["empty", "too-long"])
def test_cli_generate_names_a_prompt_it_cannot_answer(served, tmp_path, capsys, line, message):
    """A prompt with no tokens (an empty one without a chat template) was answered from its padding alone (alone in
    its batch, it failed inside the embedding with a traceback); one that with its answer outgrows the model's
    positions ran past them (a learned position table fails with an IndexError midway, every answer lost). Both are
    config errors naming the prompt's line now, and nothing is written."""
    import json

    from reft_fast.train.cli import main

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    _word_tokenizer(model_dir)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w3 w7", "reft": "A"}) + "\n\n" + json.dumps(line) + "\n")
    output = tmp_path / "out.jsonl"
    refts = [arg for name in ("A", "B") for arg in ("--reft", f"{name}={directories[name]}")]
    assert main(["generate", *refts, "--model", str(model_dir), "--prompts-file", str(prompts_file),
                 "--no-chat-template", "--max-new-tokens", "3", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert f"config error: --prompts-file: {prompts_file}{message}" in err, err
    assert not output.exists()


def test_cli_generate_loads_each_reft_once(served, tmp_path, monkeypatch):
    """The first --reft is the ReFT the model is loaded with; it is not loaded a second time under its name, and
    'default' may only name that first one."""
    import json

    from reft_fast.core.model import ReftModel
    from reft_fast.train.cli import main

    reft_model, _, directories = served
    model_dir = tmp_path / "base"
    reft_model.model.save_pretrained(model_dir)
    _word_tokenizer(model_dir)
    loads = []
    original = ReftModel.load_adapter
    monkeypatch.setattr(ReftModel, "load_adapter",
                        lambda self, directory, name, **kw: (loads.append(name), original(self, directory, name, **kw))[1])
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "w3 w7", "reft": "A"}) + "\n")
    refts = [arg for name in ("A", "B") for arg in ("--reft", f"{name}={directories[name]}")]
    args = ["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file), "--no-chat-template",
            "--max-new-tokens", "2", "--output", str(tmp_path / "out.jsonl")]
    assert main(args[:1] + refts + args[1:]) in (0, None)
    assert loads == ["B"]
    clash = ["--reft", f"A={directories['A']}", "--reft", f"default={directories['B']}"]
    assert main(args[:1] + clash + args[1:]) == 2


def test_mixed_answers_refuses_a_batch_of_none(served, tmp_path):
    """batch_size=0 failed with range()'s "arg 3 must not be zero"."""
    from reft_fast.train.generation import mixed_answers

    reft_model, _, _ = served
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        mixed_answers(reft_model, _word_tokenizer(tmp_path), ["w3"], ["A"], chat_template=False, batch_size=0)


def test_mixed_answers_batch_prompts_of_similar_length_and_keep_their_order(served, tmp_path, monkeypatch):
    """Prompts of 9, 2, 9 and 2 tokens in batches of 2 were padded to 9 twice (in file order); sorted by length, one
    batch is 2 wide. The answers are those of each prompt alone, in the prompts' order."""
    from reft_fast.train.generation import mixed_answers

    reft_model, _, _ = served
    tokenizer = _word_tokenizer(tmp_path)
    prompts = ["w3 w4 w5 w6 w7 w8 w9 w10 w11", "w12 w5", "w9 w8 w7 w6 w5 w4 w3 w12 w13", "w4 w14"]
    names = ["A", "B", None, "C"]
    alone = [mixed_answers(reft_model, tokenizer, [p], [n], chat_template=False, max_new_tokens=4)[0]
             for p, n in zip(prompts, names)]
    widths = []
    generate = type(reft_model).generate

    def recorded(self, base, **kwargs):
        widths.append(base["input_ids"].shape[1])
        return generate(self, base, **kwargs)

    monkeypatch.setattr(type(reft_model), "generate", recorded)
    answers = mixed_answers(reft_model, tokenizer, prompts, names, chat_template=False, max_new_tokens=4,
                            batch_size=2)
    assert sorted(widths) == [2, 9]
    assert answers == alone


def test_moving_the_model_moves_and_switches_mode_of_every_loaded_reft(served):
    _, _, directories = served
    reft_model = ReftModel.load(directories["A"], _tiny_llama())
    reft_model.load_adapter(directories["B"], "B")
    held = reft_model._adapter("B").interventions
    reft_model.eval()
    assert not any(module.training for module in held.modules())
    reft_model.train()
    assert all(module.training for module in held.modules())
    # A device move (meta here: the CPU machine has one device) reaches the held ReFT, as set_adapter needs.
    reft_model.to("meta")
    assert {p.device.type for p in reft_model.interventions.parameters()} == {"meta"}
    assert {p.device.type for p in held.parameters()} == {"meta"}
    assert all(p.dtype == torch.float32 for p in held.parameters())  # the interventions' own rule still holds
    # the held ReFT is still no submodule: the optimizer and state_dict see the active one only
    assert len(list(reft_model.parameters())) == len(list(reft_model.model.parameters())) + len(
        list(reft_model.interventions.parameters()))
