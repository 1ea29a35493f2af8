"""pyreft's README quick-start (steps 1–6), as pyreft writes it, with three changes:

* ``import reft_fast as pyreft`` instead of ``import pyreft``;
* a tiny random Llama and word-level tokenizer (tests/dist/tiny.py) instead of Llama-2-7b-chat, so the layer is 2 (of
  4) instead of 15, and the prompts and answers use the tiny vocabulary;
* step 4 trains with a plain PyTorch loop over the data module instead of ``pyreft.ReftTrainerForCausalLM``, and step
  6 saves without ``save_to_hf_hub`` (no network here).

Everything else (the config, ``set_device``, ``print_trainable_parameters``, the data module, ``generate`` with
``unit_locations`` and a BatchEncoding, saving and loading) is pyreft's code.
"""

import torch
import transformers

import reft_fast as pyreft

from dist.tiny import make_model_dir


def test_pyreft_readme_quickstart_runs_and_generates(tmp_path, capsys):
    device = "cpu"
    model_name_or_path = str(make_model_dir(tmp_path / "tiny-llama"))

    # Step 1: loading the raw LM you want to train with ReFT.
    prompt_no_input_template = """<|user|> %s </s> <|assistant|>"""

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_name_or_path, torch_dtype=torch.bfloat16, device_map=device)

    # get tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        model_name_or_path, model_max_length=2048,
        padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token

    # Step 2: set up the ReFT config by giving details about the interventions we want to learn.
    reft_config = pyreft.ReftConfig(representations={
        "layer": 2, "component": "block_output",
        # alternatively, you can specify as string component access,
        # "component": "model.layers[0].output",
        "low_rank_dimension": 4,
        "intervention": pyreft.LoreftIntervention(embed_dim=model.config.hidden_size,
        low_rank_dimension=4)})
    reft_model = pyreft.get_reft_model(model, reft_config)
    reft_model.set_device(device)
    reft_model.print_trainable_parameters()
    assert "trainable intervention params: 516 || trainable model params: 0" in capsys.readouterr().out

    # Step 3: a few demonstrations of the behavior you want.
    training_examples = [
        ["red green", "one two three"],
        ["blue black", "four five"],
        ["cat dog bird", "sky sea sun moon"],
        ["fish cow", "yes no yes"],
        ["hot cold", "up down left right"],
    ]

    data_module = pyreft.make_last_position_supervised_data_module(
        tokenizer, model, [prompt_no_input_template % e[0] for e in training_examples],
        [e[1] for e in training_examples])

    # Step 4: training (a plain PyTorch loop standing in for ReftTrainerForCausalLM; lr as in pyreft's README).
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data_module["train_dataset"], batch_size=5, shuffle=True,
                                         collate_fn=data_module["data_collator"])
    optimizer = torch.optim.AdamW([p for p in reft_model.parameters() if p.requires_grad], lr=4e-3)
    losses = []
    for _ in range(40):
        for batch in loader:
            _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                intervention_locations=batch["intervention_locations"], labels=batch["labels"])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
    # A random tiny base learns slowly from one edited position; the loss must still move down steadily.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1, losses[::5]

    # Step 5: chat with your ReFT model.
    instruction = "red green"

    # tokenize and prepare the input
    prompt = prompt_no_input_template % instruction
    prompt = tokenizer(prompt, return_tensors="pt").to(device)

    base_unit_location = prompt["input_ids"].shape[-1] - 1  # last position
    _, reft_response = reft_model.generate(
        prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])},
        intervene_on_prompt=True, max_new_tokens=512, do_sample=True,
        eos_token_id=tokenizer.eos_token_id, early_stopping=True
    )
    print(tokenizer.decode(reft_response[0], skip_special_tokens=True))
    assert reft_response.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(reft_response[0, :prompt["input_ids"].shape[1]], prompt["input_ids"][0])

    # Greedily as well (the README samples), to compare with the reloaded model below.
    _, greedy = reft_model.generate(
        prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])},
        intervene_on_prompt=True, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)

    # Step 6: ReFT model sharing (locally: no network here).
    reft_model.set_device("cpu")  # send back to cpu before saving.
    reft_model.save(
        save_directory=str(tmp_path / "reft_to_share"),
    )

    # Generic ReFT model loading.
    reft_model.remove_hooks()  # the trained model leaves the base; the reloaded one takes its place
    reloaded = pyreft.ReftModel.load(
        str(tmp_path / "reft_to_share"), model
    )
    _, again = reloaded.generate(
        prompt, unit_locations={"sources->base": (None, [[[base_unit_location]]])},
        intervene_on_prompt=True, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert torch.equal(again, greedy)
