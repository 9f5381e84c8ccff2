"""Each SFTJob option takes effect: on the peft config, the adapters, the model, the batches, the checkpoints."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from swiftune_train import SFTJob, run_sft_job
from swiftune_train.sft_job import resolve_checkpoint


def _job(model_dir, dataset, output_dir, **overrides):
    settings = dict(
        model=str(model_dir),
        dataset=str(dataset),
        output_dir=str(output_dir),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-2,
        lora_r=4,
        lora_alpha=8,
        gradient_checkpointing=False,
        max_seq_length=64,
    )
    settings.update(overrides)
    return SFTJob(**settings)


class RecordBatches(TrainerCallback):
    """Records what the decoder receives in each forward pass (ids, positions, mask) and the model trained."""

    def __init__(self):
        self.calls = []
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("input_ids", "position_ids", "attention_mask")})


def _run(job):
    return run_sft_job(job, write=lambda line: None)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_dropout_target_modules_and_rslora_reach_the_adapter(tiny_model_dir, tiny_dataset, tmp_path, use_rslora):
    job = _job(
        tiny_model_dir,
        tiny_dataset,
        tmp_path / "out",
        max_steps=1,
        lora_dropout=0.25,
        target_modules=["q_proj", "v_proj"],
        use_rslora=use_rslora,
    )
    result = _run(job)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.25 and config["use_rslora"] is use_rslora
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    adapted = {
        key.split(".lora_")[0].rsplit(".", 1)[-1] for key in load_file(result.adapter_dir / "adapter_model.safetensors")
    }
    assert adapted == {"q_proj", "v_proj"}, "adapters on layers that were not asked for"

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    layer = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_dropout["default"].p == 0.25
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)


def test_full_finetuning_trains_every_weight_and_saves_a_full_model(tiny_model_dir, tiny_dataset, tmp_path):
    recorder = RecordBatches()
    result = _run(
        _job(
            tiny_model_dir,
            tiny_dataset,
            tmp_path / "out",
            full_finetuning=True,
            learning_rate=1e-3,
            callbacks=[recorder],
        )
    )
    assert not hasattr(recorder.model, "peft_config"), "adapters were added to a full fine-tune"
    assert all(p.requires_grad for p in recorder.model.parameters())
    assert result.adapter_dir == tmp_path / "out" / "model"
    assert (result.adapter_dir / "config.json").is_file() and not (result.adapter_dir / "adapter_config.json").exists()
    assert (result.adapter_dir / "tokenizer_config.json").is_file()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.adapter_dir).state_dict()
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"weights that did not train: {unchanged}"


def test_chat_template_changes_the_rendered_text(tiny_model_dir, tiny_dataset, tmp_path):
    texts = {}
    for template in (None, "zephyr"):
        recorder = RecordBatches()
        output = tmp_path / str(template)
        result = _run(
            _job(tiny_model_dir, tiny_dataset, output, max_steps=1, chat_template=template, callbacks=[recorder])
        )
        tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
        texts[template] = tokenizer.decode(recorder.calls[0]["input_ids"][0])
    assert "<|im_start|>user\n" in texts[None] and "<|user|>" not in texts[None]
    assert "<|user|>\n" in texts["zephyr"] and "<|assistant|>\n" in texts["zephyr"]
    assert "<|im_start|>" not in texts["zephyr"]
    saved = AutoTokenizer.from_pretrained(tmp_path / "zephyr" / "adapter")
    rendered = saved.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>\nhi" + saved.eos_token + "\n<|assistant|>\n"


def test_unknown_chat_template_is_refused_before_training(tiny_model_dir, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="chatml"):  # the message lists the registered names
        _run(_job(tiny_model_dir, tiny_dataset, tmp_path / "out", chat_template="no-such-template"))
    assert not (tmp_path / "out" / "adapter").exists()


def test_packing_puts_several_samples_in_a_row_kept_apart(tiny_model_dir, tiny_dataset, tmp_path):
    shapes = {}
    for packing in (False, True):
        recorder = RecordBatches()
        _run(
            _job(
                tiny_model_dir,
                tiny_dataset,
                tmp_path / str(packing),
                max_steps=1,
                packing=packing,
                callbacks=[recorder],
            )
        )
        shapes[packing] = recorder.calls[0]
    plain, packed = shapes[False], shapes[True]
    assert plain["input_ids"].shape[0] == 4 and plain["position_ids"] is None
    # The 4 short conversations of a batch fit one row of max_seq_length=64; their positions restart per sample.
    assert packed["input_ids"].shape[0] < 4
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2 and starts[0] == 0
    mask = packed["attention_mask"]
    assert mask.dim() == 4, "sdpa/eager need the block-diagonal mask"
    # The first token of the second sample may not attend to the first sample.
    assert (mask[0, 0, starts[1], : starts[1]] < 0).all() and mask[0, 0, starts[1], starts[1]] == 0


def test_load_in_8bit_trains_lora_on_int8_layers(tiny_model_dir, tiny_dataset, tmp_path):
    import bitsandbytes as bnb

    recorder = RecordBatches()
    result = _run(
        _job(tiny_model_dir, tiny_dataset, tmp_path / "out", max_steps=1, load_in_8bit=True, callbacks=[recorder])
    )
    base = recorder.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear8bitLt)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# --- save_steps writes checkpoints into output_dir, and resume_from_checkpoint continues a run from one ---


def test_save_steps_writes_checkpoints_and_resume_continues_from_the_step(tiny_model_dir, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    first = _run(_job(tiny_model_dir, tiny_dataset, out, max_steps=4, save_steps=2))
    assert [step for step, _ in first.losses] == [1, 2, 3, 4]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    for name in checkpoints:
        assert (out / name / "adapter_model.safetensors").is_file() and (out / name / "trainer_state.json").is_file()

    resumed = _run(_job(tiny_model_dir, tiny_dataset, out, max_steps=6, resume_from_checkpoint="last"))
    assert [step for step, _ in resumed.losses] == [5, 6]
    from_path = _run(
        _job(
            tiny_model_dir,
            tiny_dataset,
            tmp_path / "other",
            max_steps=6,
            resume_from_checkpoint=str(out / "checkpoint-2"),
        )
    )
    assert [step for step, _ in from_path.losses] == [3, 4, 5, 6]
    # Step 3's loss is computed on the weights and batch of checkpoint-2: the run continued, it did not restart
    # (later steps differ, as the learning-rate schedule now spans 6 steps).
    assert from_path.losses[0][1] == pytest.approx(first.losses[2][1], rel=1e-4)


def test_resume_finds_the_newest_checkpoint_or_says_what_is_missing(tiny_model_dir, tiny_dataset, tmp_path):
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    for value in (True, "true", "last", "LAST"):
        assert resolve_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(None, tmp_path) is None and resolve_checkpoint(False, tmp_path) is None
    assert resolve_checkpoint(tmp_path / "checkpoint-2", "elsewhere") == str(tmp_path / "checkpoint-2")

    empty = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="No checkpoint-N folder to resume from"):
        _run(_job(tiny_model_dir, tiny_dataset, empty, resume_from_checkpoint=True))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(_job(tiny_model_dir, tiny_dataset, empty, resume_from_checkpoint=str(tmp_path / "missing")))
    assert not empty.exists(), "a failed resume wrote something"
